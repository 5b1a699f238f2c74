"""The one attention function every adapted model runs through.

transformers (5.x) looks up ``config._attn_implementation`` in ``ALL_ATTENTION_FUNCTIONS`` on every
forward and calls the function with the head tensors after rotary embeddings and after the KV-cache
update. We register one function per mask format we understand ("sdpa": boolean masks that may be
None for plain causal/full attention; "eager": additive float masks), each paired with the mask
builder of that format. The function finds the adapter layer hung on the attention module
(``module.attention_adapter``, a PEFT tuner layer) and lets its active adapter compute the attention;
modules without an active adapter run the model's original implementation, so disabled adapters
give the base model exactly.
"""

from __future__ import annotations

import inspect
import re
import sys
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

ADAPTER_ATTR = "attention_adapter"
HOOK_PREFIX = "ntk_adapter_"
SUPPORTED_BASE_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass(frozen=True)
class HeadGeometry:
    """Head counts and sizes of one attention module, known before anything runs."""

    heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int


def hook_name(base_implementation: str) -> str:
    return HOOK_PREFIX + base_implementation


def base_implementation_of(hooked: str) -> str:
    return hooked[len(HOOK_PREFIX):] if hooked.startswith(HOOK_PREFIX) else hooked


def _original_attention(base_implementation: str, module: nn.Module):
    if base_implementation == "sdpa":
        return sdpa_attention_forward
    # "eager" is not in the registry: each modeling file defines its own eager_attention_forward.
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise TypeError(f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__}; load the model with attn_implementation='sdpa'")
    return fn


def _make_hook(base_implementation: str):
    # The argument order of transformers' attention functions (sdpa_attention_forward, eager_attention_forward).
    def adapter_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        layer = getattr(module, ADAPTER_ATTR, None)
        state = None if layer is None else layer.active_state()
        if state is None:
            fn = _original_attention(base_implementation, module)
            return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
        for name in ("softcap", "position_bias"):
            if kwargs.get(name) is not None:
                raise NotImplementedError(f"{type(module).__name__} passes {name!r} to attention; NTK/prefix adapters do not support it yet")
        check_query(module, layer.geometry, query, value)
        device = query.device.type
        if torch.is_autocast_enabled(device):  # as autocast does for sdpa: one lower-precision dtype
            dtype = torch.get_autocast_dtype(device)
            query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        q_len, kv_len = query.shape[2], key.shape[2]
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        # Same rule as transformers' sdpa integration: a None mask means "plain causal" only for a
        # multi-token query; a single decoding query sees every cached key.
        causal = bool(q_len > 1 and attention_mask is None and is_causal)
        if causal and kv_len > q_len:  # prefill into an empty static cache: the tail is unused
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        out = state(query, key, value, attention_mask=attention_mask, causal=causal, dropout=dropout, scale=scale)
        return out.transpose(1, 2).contiguous(), None

    adapter_attention.__name__ = f"adapter_attention_{base_implementation}"
    return adapter_attention


_REGISTERED: set[str] = set()


def register_hooks() -> None:
    """Register the adapter attention (once per process) for each base implementation we can wrap."""
    for base, mask_fn in (("sdpa", sdpa_mask), ("eager", eager_mask)):
        name = hook_name(base)
        if name not in _REGISTERED:
            AttentionInterface.register(name, _make_hook(base))
            AttentionMaskInterface.register(name, mask_fn)
            _REGISTERED.add(name)


_USES_INTERFACE: dict[type, bool] = {}


def uses_attention_interface(module: nn.Module) -> bool:
    """True for attention modules whose forward dispatches through ``ALL_ATTENTION_FUNCTIONS``."""
    cls = type(module)
    if cls not in _USES_INTERFACE:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            source = ""
        _USES_INTERFACE[cls] = "ALL_ATTENTION_FUNCTIONS" in source
    return _USES_INTERFACE[cls]


def layer_index(module_name: str) -> int | None:
    """The layer number in a module path (``model.layers.3.self_attn`` -> 3), as PEFT reads it."""
    match = re.search(r"\.(\d+)(\.|$)", "." + module_name)
    return int(match.group(1)) if match else None


def head_geometry(module: nn.Module, config) -> HeadGeometry:
    heads = next((getattr(module, a) for a in ("num_heads", "num_attention_heads") if isinstance(getattr(module, a, None), int)), None)
    heads = heads or config.num_attention_heads
    head_dim = next((getattr(module, a) for a in ("head_dim", "attention_head_size") if isinstance(getattr(module, a, None), int)), None)
    head_dim = head_dim or getattr(config, "head_dim", None) or config.hidden_size // heads
    groups = getattr(module, "num_key_value_groups", 1)
    v_head_dim = getattr(module, "v_head_dim", None) or head_dim
    return HeadGeometry(heads=heads, kv_heads=heads // groups, head_dim=head_dim, v_head_dim=v_head_dim)


def find_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every attention module that goes through the interface, in model order; a clear error if none."""
    found = [(name, m) for name, m in model.named_modules() if hasattr(m, "config") and uses_attention_interface(m)]
    if not found:
        raise TypeError(
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface "
            "(no submodule calls ALL_ATTENTION_FUNCTIONS), so NTK/prefix adapters cannot attach to it; "
            "models such as Llama, Qwen2, Mistral, GPT-2, BERT, RoBERTa and ViT do"
        )
    return found


def check_query(module: nn.Module, geometry: HeadGeometry, query: torch.Tensor, value: torch.Tensor) -> None:
    if query.shape[1] != geometry.heads or query.shape[-1] != geometry.head_dim or value.shape[-1] != geometry.v_head_dim:
        raise RuntimeError(
            f"{type(module).__name__}: adapter built for {geometry} but attention got query {tuple(query.shape)}, "
            f"value {tuple(value.shape)}; the model's head layout changed after the adapter was attached"
        )
