"""Closed-form conversions: a trained prefix, or a long text, becomes an NTK-Attention adapter.

A prefix of m tokens enters attention only through ``sum_j e^{s(q, kP_j)} vP_j`` and
``sum_j e^{s(q, kP_j)}``; with a feature map ``phi`` both collapse into ``Z = sum_j phi(kP_j) vP_j^T``
and ``k = sum_j phi(kP_j)`` (``prefix_to_ntk``), ``r d_v + r`` numbers per head whatever m is.

    ntk = ntk_from_prefix(prefix_model, feature_map="random:num_features=1024")
    ntk = compress_context(model, tokenizer, long_text, feature_map="elu")

``prefix_from_peft`` turns a PEFT prefix-tuning model into this library's exact prefix adapter and
``context_prefix`` keeps a text's keys and values as an exact prefix (the KV cache as an adapter);
both are what the NTK conversions approximate.

Positions. Rotary models rotate keys by their position. The hook-based adapters see the input at
positions 0, 1, ...; a PEFT prefix model sees it at m, m+1, ... with unrotated prefix keys, so
those keys are rotated by -m here; a text's keys are computed at positions -T ... -1, so that the
input that follows sits where it would after the text. Models with absolute position embeddings
(GPT-2) cannot be shifted that way: call the converted model with ``position_ids`` offset by m.
"""

from __future__ import annotations

import copy
import sys
import warnings

import torch
from torch import nn

from peft import PeftModel, get_peft_model

from .ops import get_feature_map, prefix_to_ntk
from .tuners import NTKConfig, PrefixConfig, adapter_states
from .tuners.attention_hook import ADAPTER_ATTR, find_attention_modules
from .tuners.config import AdapterConfig
from .tuners.model import transformers_model
from .tuners.ntk.config import fold_feature_options

__all__ = ["ntk_from_prefix", "compress_context", "prefix_from_peft", "context_prefix", "prefix_tensors"]


# ----------------------------------------------------------------------------------------------
# reading prefixes


def _ours(model: nn.Module) -> AdapterConfig | None:
    """The active NTK/prefix adapter config of a PEFT model, else None."""
    if not isinstance(model, PeftModel):
        return None
    config = model.peft_config.get(model.active_adapter)
    return config if isinstance(config, AdapterConfig) else None


def prefix_tensors(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The prefix keys and values ``[kv_heads, m, d]`` of each adapted attention layer, in model order.

    ``model``: a PEFT model with a ``PrefixConfig`` adapter, or a PEFT prefix-tuning model (keys
    rotated by -m on rotary models, see the module notes). Detached float32 copies.
    """
    config = _ours(model)
    if config is not None:
        if not isinstance(config, PrefixConfig):
            raise TypeError(f"expected a prefix adapter (PrefixConfig), got a {type(config).__name__} adapter")
        return [(s.prefix_k.detach().float().clone(), s.prefix_v.detach().float().clone()) for s in adapter_states(model)]
    peft_type = str(getattr(getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None)), "peft_type", ""))
    if "PREFIX_TUNING" not in peft_type:
        raise TypeError(
            f"expected a PEFT model with a PrefixConfig adapter or a PEFT prefix-tuning model, got {type(model).__name__}"
            + (f" ({peft_type})" if peft_type else "")
        )
    with torch.no_grad():
        cache = model.get_prompt(batch_size=1)
    layers = [(layer.keys[0].float(), layer.values[0].float()) for layer in cache.layers]
    base = model.get_base_model()
    m = layers[0][0].shape[1]
    return [(rotate_keys(base, name, k, -m), v) for (name, _), (k, v) in zip(find_attention_modules(base), layers)]


def rotary_embedding(model: nn.Module):
    return next((module for name, module in model.named_modules() if name.endswith("rotary_emb")), None)


def rotate_keys(model: nn.Module, module_name: str, keys: torch.Tensor, position: int) -> torch.Tensor:
    """Rotate ``keys [kv_heads, m, d]`` as if each sat at ``position`` (no-op without rotary embeddings)."""
    rotary = rotary_embedding(model)
    if rotary is None:
        if position:
            warnings.warn(f"{type(model).__name__} has no rotary embedding; the prefix's position offset of {-position} "
                          "is not applied to the keys: call the converted model with position_ids shifted by it")
        return keys
    attention = model.get_submodule(module_name)
    apply_rotary = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb")
    positions = torch.full((1, keys.shape[1]), position, device=keys.device)
    cos, sin = rotary(keys[None], positions)
    _, rotated = apply_rotary(keys[None], keys[None], cos, sin)
    return rotated[0]


# ----------------------------------------------------------------------------------------------
# building adapters from per-layer tensors


def _fresh_base(model: nn.Module) -> nn.Module:
    """A deep copy of the model underneath ``model`` without any adapter (``model`` is left as it is)."""
    if _ours(model) is not None:
        return copy.deepcopy(model).unload()
    if hasattr(model, "peft_config"):
        if getattr(model, "modules_to_save", None):
            raise ValueError("PEFT prefix models with modules_to_save are not supported: convert a model whose only "
                             "trained part is the prefix, or train the prefix with this library's PrefixConfig")
        return copy.deepcopy(model.get_base_model())
    return copy.deepcopy(model)


def _copy_trained_heads(source: nn.Module, target: PeftModel) -> None:
    """Trained heads (modules_to_save / task_type) go along with a converted adapter."""
    if _ours(source) is None:
        return
    theirs = source.state_dict()
    with torch.no_grad():
        for name, param in target.named_parameters():
            if ".modules_to_save." in name and name in theirs:
                param.copy_(theirs[name])


def _adapter_fields(model: nn.Module) -> dict:
    cfg = _ours(model)
    if cfg is None:
        return {}
    heads = sorted(set(cfg.modules_to_save or [])) or None
    return {"task_type": cfg.task_type, "modules_to_save": heads, "layers_to_transform": cfg.layers_to_transform}


def _prefix_adapter(base: nn.Module, tensors, fields: dict) -> PeftModel:
    model = get_peft_model(base, PrefixConfig(num_virtual_tokens=tensors[0][0].shape[1], **fields))
    with torch.no_grad():
        for state, (k, v) in zip(adapter_states(model), tensors):
            state.prefix_k.copy_(k)
            state.prefix_v.copy_(v)
    return model


def _adapted_modules(model: PeftModel) -> list[tuple[nn.Module, nn.Module]]:
    """(attention module, the active adapter's state) in model order."""
    name = model.active_adapter
    pairs = [(module, getattr(module, ADAPTER_ATTR, None)) for _, module in find_attention_modules(model.get_base_model())]
    return [(module, layer.states[name]) for module, layer in pairs if layer is not None and name in layer.states]


def _ntk_adapter(base: nn.Module, tensors, config: NTKConfig) -> PeftModel:
    if config.rank is not None:
        raise ValueError("the closed form gives a full Z: leave rank=None (a low-rank Z can be fitted afterwards)")
    fmap = config.build_feature_map()
    if not fmap.nonnegative:
        raise ValueError(f"feature map {fmap!r} has a kernel phi(q).phi(k) that can be negative (degree-1 Taylor: 1 + s), "
                         "so the denominator phi(q)^T k of the conversion can be <= 0; use taylor degree 2, elu or random")
    model = get_peft_model(base, config)
    with torch.no_grad():
        for (module, layer), (k, v) in zip(_adapted_modules(model), tensors):
            groups = layer.k.shape[0] // k.shape[0]  # per query head: repeat each KV head; per_kv_head: 1
            z, kvec = prefix_to_ntk(k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0),
                                    feature_map=fmap, scale=getattr(module, "scaling", None))
            layer.set_ntk_state(z, kvec)
    return model


def _ntk_config(m: int, fields: dict, feature_map: str, options: dict) -> NTKConfig:
    """NTK config of a conversion: Z and k stored as averages over the m prefix tokens (``virtual_prefix_length = m``).

    Feature maps with signed components (Taylor) give a ``k = sum phi(K)`` with negative entries, so
    it is stored unconstrained (``k_parametrization="signed"``) unless the caller chose otherwise.
    Feature-map keywords (``num_features``, ``degree``, ``seed`` / ``feature_seed``) join the spec.
    """
    options = fold_feature_options({"feature_map": feature_map, **options})
    fmap = get_feature_map(options["feature_map"])
    options = {"k_parametrization": "nonneg" if fmap.positive_features else "signed", **options}
    return NTKConfig(virtual_prefix_length=float(m), **fields, **options)


# ----------------------------------------------------------------------------------------------
# public conversions


def prefix_from_peft(peft_model: nn.Module) -> PeftModel:
    """This library's exact prefix adapter with the prefix of a PEFT prefix-tuning model (same outputs)."""
    return _prefix_adapter(_fresh_base(peft_model), prefix_tensors(peft_model), {})


def ntk_from_prefix(prefix_model: nn.Module, feature_map: str = "elu", **feature_options) -> PeftModel:
    """An NTK-Attention model whose ``(Z, k)`` is the closed form of ``prefix_model``'s prefix, per layer and head.

    prefix_model: a PEFT model with a ``PrefixConfig`` adapter (its trained heads come along) or a PEFT
        prefix-tuning model on a decoder. It is not modified: the result wraps a copy of its base.
    feature_map, feature_options: a feature-map spec (``"elu"``, ``"random:num_features=1024"``,
        ``"taylor:degree=2"``; or the name with ``num_features`` / ``seed`` / ``degree`` keywords) and
        other NTKConfig fields such as ``feature_dropout``. Exact up to the feature map's approximation of ``e^{q.k}``:
        ``taylor`` replaces it by ``1 + s + s^2/2`` (close for small logits; ``k`` is stored signed),
        ``random`` is unbiased, ``elu`` is not an approximation at all (a starting point for
        fine-tuning rather than a copy). Taylor degree 1 is refused: ``1 + s`` can make the
        denominator negative.
    """
    tensors = prefix_tensors(prefix_model)
    fields = _adapter_fields(prefix_model)
    config = _ntk_config(tensors[0][0].shape[1], fields, feature_map, feature_options)
    model = _ntk_adapter(_fresh_base(prefix_model), tensors, config)
    _copy_trained_heads(prefix_model, model)
    return model


def context_tensors(model: nn.Module, tokenizer, text: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values ``[kv_heads, T, d]`` of ``text`` in every attention layer, as the KV cache holds them,
    computed at positions -T ... -1 so that an input at positions 0, 1, ... follows the text."""
    base = transformers_model(model)
    if isinstance(model, PeftModel):
        raise TypeError("compress a text with the plain transformers model, not one that already has an adapter")
    if not isinstance(text, str) or not text:
        raise ValueError("text must be a non-empty string")
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(base.device)
    T = ids.shape[1]
    with torch.no_grad():
        out = base(input_ids=ids, position_ids=torch.arange(-T, 0, device=ids.device)[None], use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values  # renamed in transformers 5.x
    return [(layer.keys[0].float(), layer.values[0].float()) for layer in cache.layers]


def context_prefix(model: nn.Module, tokenizer, text: str) -> PeftModel:
    """``text``'s keys and values as an exact prefix adapter: the model then answers as if ``text`` came first."""
    return _prefix_adapter(copy.deepcopy(model), context_tensors(model, tokenizer, text), {})


def compress_context(model: nn.Module, tokenizer, text: str, feature_map: str = "elu", **feature_options) -> PeftModel:
    """Run ``text`` through the frozen ``model`` once and keep, per layer and head, ``Z = sum phi(K) V^T`` and
    ``k = sum phi(K)`` instead of its KV cache (keys after rotary embedding, as the cache stores them).

    Returns an NTK model (a copy of ``model`` with the adapter) whose state has ``r d_v + r`` numbers per
    query head, whatever the length of the text; ``feature_map`` and ``feature_options`` as in
    ``ntk_from_prefix``.
    """
    tensors = context_tensors(model, tokenizer, text)
    config = _ntk_config(tensors[0][0].shape[1], {}, feature_map, feature_options)
    return _ntk_adapter(copy.deepcopy(model), tensors, config)
