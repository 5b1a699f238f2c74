"""Small helpers shared by the reference (``naive.py``) and the fast paths: one of each."""

from __future__ import annotations

import math

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other dtype is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def causal_bias(L: int, S: int, device, dtype) -> torch.Tensor:
    """Additive bottom-right causal mask [L, S]: query i sees keys j <= i + S - L."""
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    return torch.zeros(L, S, device=device, dtype=dtype).masked_fill(j > i + (S - L), float("-inf"))


def additive_mask(attn_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = attend) as 0 / -inf in ``dtype``; a float mask or None as it is."""
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(~attn_mask, float("-inf"))


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat the head dim (dim -3: ``[B, H_kv, S, D]`` or ``[H_kv, r, D_v]``) up to ``heads`` for
    grouped-query attention; autograd sums the groups back."""
    return x if x.shape[-3] == heads else x.repeat_interleave(heads // x.shape[-3], dim=-3)


def max_exponent(dtype: torch.dtype) -> float:
    """Cap on the exponent of ``e^{-T}``, the NTK term's weight: where the softmax part underflows
    and ``c = 0`` it would overflow (``inf * 0 = NaN`` for a zero numerator). Room is left for
    ``beta * g`` in the backward."""
    return 0.9 * math.log(torch.finfo(dtype).max)
