"""Closed-form conversions: a trained prefix, or a long text, becomes an NTK-Attention adapter.

A prefix of m tokens enters attention only through ``sum_j e^{s(q, kP_j)} vP_j`` and
``sum_j e^{s(q, kP_j)}``; with a feature map ``phi`` both collapse into ``Z = sum_j phi(kP_j) vP_j^T``
and ``k = sum_j phi(kP_j)`` (``prefix_to_ntk``), ``r d_v + r`` numbers per head whatever m is.

    ntk = ntk_from_prefix(prefix_model, feature_map="random", num_features=1024)
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

from .ops import prefix_to_ntk
from .tuners import NTKConfig, NTKModel, PrefixConfig, get_ntk_model
from .tuners.attention_hook import ADAPTER_ATTR, find_attention_modules
from .tuners.model import transformers_model

__all__ = ["ntk_from_prefix", "compress_context", "prefix_from_peft", "context_prefix", "prefix_tensors"]


# ----------------------------------------------------------------------------------------------
# reading prefixes


def prefix_tensors(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The prefix keys and values ``[kv_heads, m, d]`` of each adapted attention layer, in model order.

    ``model``: an ``NTKModel`` with a ``PrefixConfig`` adapter, or a PEFT prefix-tuning model (keys
    rotated by -m on rotary models, see the module notes). Detached float32 copies.
    """
    if isinstance(model, NTKModel):
        if model.adapter_config.method != "prefix":
            raise TypeError(f"expected a prefix adapter (PrefixConfig), got an adapter of method {model.adapter_config.method!r}")
        return [(layer.prefix_k.detach().float().clone(), layer.prefix_v.detach().float().clone()) for layer in model.adapter_layers()]
    peft_type = str(getattr(getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None)), "peft_type", ""))
    if "PREFIX_TUNING" not in peft_type:
        raise TypeError(
            f"expected an NTKModel with a PrefixConfig adapter or a PEFT prefix-tuning model, got {type(model).__name__}"
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
    if isinstance(model, NTKModel):
        return copy.deepcopy(model).unload()
    if hasattr(model, "peft_config"):
        if getattr(model, "modules_to_save", None):
            raise ValueError("PEFT prefix models with modules_to_save are not supported: convert a model whose only "
                             "trained part is the prefix, or train the prefix with this library's PrefixConfig")
        return copy.deepcopy(model.get_base_model())
    return copy.deepcopy(model)


def _copy_trained_heads(source: nn.Module, target: NTKModel) -> None:
    """Trained heads (modules_to_save / task_type) go along with a converted adapter."""
    if not isinstance(source, NTKModel):
        return
    theirs = source.adapter_state_dict()
    with torch.no_grad():
        for name, param in target.adapter_state_dict().items():
            if name in theirs and ".ntk_adapter." not in f".{name}":
                param.copy_(theirs[name])


def _adapter_fields(model: nn.Module) -> dict:
    if isinstance(model, NTKModel):
        cfg = model.adapter_config
        return {"task_type": cfg.task_type, "modules_to_save": cfg.modules_to_save, "layers_to_transform": cfg.layers_to_transform}
    return {}


def _prefix_adapter(base: nn.Module, tensors, fields: dict) -> NTKModel:
    model = get_ntk_model(base, PrefixConfig(num_virtual_tokens=tensors[0][0].shape[1], **fields))
    with torch.no_grad():
        for layer, (k, v) in zip(model.adapter_layers(), tensors):
            layer.prefix_k.copy_(k)
            layer.prefix_v.copy_(v)
    return model


def _adapted_modules(model: NTKModel) -> list[tuple[nn.Module, nn.Module]]:
    """(attention module, its adapter layer) in model order."""
    pairs = [(module, getattr(module, ADAPTER_ATTR, None)) for _, module in find_attention_modules(model.base_model)]
    return [(module, layer) for module, layer in pairs if layer is not None]


def _ntk_adapter(base: nn.Module, tensors, config: NTKConfig) -> NTKModel:
    if config.rank is not None:
        raise ValueError("the closed form gives a full Z: leave rank=None (a low-rank Z can be fitted afterwards)")
    fmap = config.build_feature_map()
    if not fmap.nonnegative:
        raise ValueError(f"feature map {fmap!r} has a kernel phi(q).phi(k) that can be negative (degree-1 Taylor: 1 + s), "
                         "so the denominator phi(q)^T k of the conversion can be <= 0; use taylor degree 2, elu or random")
    model = get_ntk_model(base, config)
    with torch.no_grad():
        for (module, layer), (k, v) in zip(_adapted_modules(model), tensors):
            groups = layer.k.shape[0] // k.shape[0]  # per query head: repeat each KV head; per_kv_head: 1
            z, kvec = prefix_to_ntk(k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0),
                                    feature_map=fmap, scale=getattr(module, "scaling", None))
            layer.set_ntk_state(z, kvec)
    return model


def _ntk_config(m: int, fields: dict, feature_map: str, options: dict) -> NTKConfig:
    """NTK config of a conversion: Z and k stored as averages over the m prefix tokens (``virtual_prefix_length = m``).

    Taylor features have signed components, so their ``k = sum phi(K)`` is stored unconstrained
    (``k_parametrization="signed"``) unless the caller chose otherwise.
    """
    options = {"k_parametrization": "signed" if feature_map == "taylor" else "nonneg", **options}
    return NTKConfig(feature_map=feature_map, virtual_prefix_length=float(m), **fields, **options)


# ----------------------------------------------------------------------------------------------
# public conversions


def prefix_from_peft(peft_model: nn.Module) -> NTKModel:
    """This library's exact prefix adapter with the prefix of a PEFT prefix-tuning model (same outputs)."""
    return _prefix_adapter(_fresh_base(peft_model), prefix_tensors(peft_model), {})


def ntk_from_prefix(prefix_model: nn.Module, feature_map: str = "elu", **feature_options) -> NTKModel:
    """An NTK-Attention model whose ``(Z, k)`` is the closed form of ``prefix_model``'s prefix, per layer and head.

    prefix_model: an ``NTKModel`` with a ``PrefixConfig`` adapter (its trained heads come along) or a PEFT
        prefix-tuning model on a decoder. It is not modified: the result wraps a copy of its base.
    feature_map, feature_options: as ``NTKConfig`` takes them (``"elu"``; ``"random"`` with
        ``num_features`` and ``feature_seed``; ``"taylor"`` with ``degree=2``; other NTKConfig fields such
        as ``feature_dropout`` too). Exact up to the feature map's approximation of ``e^{q.k}``:
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
    if isinstance(model, NTKModel):
        raise TypeError("compress a text with the plain transformers model, not one that already has an adapter")
    if not isinstance(text, str) or not text:
        raise ValueError("text must be a non-empty string")
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(base.device)
    T = ids.shape[1]
    with torch.no_grad():
        out = base(input_ids=ids, position_ids=torch.arange(-T, 0, device=ids.device)[None], use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values  # renamed in transformers 5.x
    return [(layer.keys[0].float(), layer.values[0].float()) for layer in cache.layers]


def context_prefix(model: nn.Module, tokenizer, text: str) -> NTKModel:
    """``text``'s keys and values as an exact prefix adapter: the model then answers as if ``text`` came first."""
    return _prefix_adapter(copy.deepcopy(model), context_tensors(model, tokenizer, text), {})


def compress_context(model: nn.Module, tokenizer, text: str, feature_map: str = "elu", **feature_options) -> NTKModel:
    """Run ``text`` through the frozen ``model`` once and keep, per layer and head, ``Z = sum phi(K) V^T`` and
    ``k = sum phi(K)`` instead of its KV cache (keys after rotary embedding, as the cache stores them).

    Returns an NTK model (a copy of ``model`` with the adapter) whose state has ``r d_v + r`` numbers per
    query head, whatever the length of the text; ``feature_map`` and ``feature_options`` as in
    ``ntk_from_prefix``.
    """
    tensors = context_tensors(model, tokenizer, text)
    config = _ntk_config(tensors[0][0].shape[1], {}, feature_map, feature_options)
    return _ntk_adapter(copy.deepcopy(model), tensors, config)
