"""One decoding step on CPU (a single query row, no gradient) of NTK-Attention in a few ops.

Generation calls the operator once per layer and token with ``L = 1``; there the autograd function
and the general merge cost more in Python than the arithmetic (about 150 us against SDPA's 20 us
per SmolLM2 layer, each small op ~2-3 us). Here the G query heads of a key/value group become G
rows of one call to PyTorch's CPU flash kernel (no copy of the cache; a single row has no causal
structure), and its ``(O, lse)`` is merged with the NTK state directly:

    T = logaddexp(lse, log c),   out = e^{lse - T} O + e^{-T} N      (e^{-T} capped as in the other paths)
"""

from __future__ import annotations

import torch

from ..utils import max_exponent
from .torch_states import _Fused


def decode_ntk_attention(q, k, v, ntk_stats, mask, scale: float) -> torch.Tensor:
    """``q [B,H,1,D]``, ``k, v [B,H_kv,S,*]`` (S >= 1), ``ntk_stats [B,H,1,D_v+1]`` (``[N | c]``,
    float32 or float64), ``mask`` additive, broadcastable to ``[B,H,1,S]``, or None."""
    B, H, _, D = q.shape
    H_kv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // H_kv
    if mask is not None:
        mask = torch.broadcast_to(mask, (B, H, 1, S)).reshape(B, H_kv, G, S).to(q.dtype)
    if Dv != D:  # the kernel wants one head dim (as in torch_states._Fused)
        q, k, v = _Fused._pad_heads(q, k, v)
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.reshape(B, H_kv, G, q.shape[-1]), k, v, 0.0, False, attn_mask=mask, scale=scale)
    stats = ntk_stats.reshape(B, H_kv, G, Dv + 1)
    lse = lse.unsqueeze(-1).to(stats.dtype)
    if mask is not None:  # the kernel reports lse = 0 for a row that sees no key
        lse = lse.masked_fill(~(mask > float("-inf")).any(-1, keepdim=True), float("-inf"))
    total = torch.logaddexp(lse, stats[..., -1:].clamp_min(0).log_())
    beta = torch.exp((-total).clamp_max_(max_exponent(stats.dtype)))
    out = torch.addcmul(o[..., :Dv].to(stats.dtype) * (lse - total).exp_(), stats[..., :-1], beta)
    if mask is not None:  # T = -inf: no visible key and c = 0, output 0
        out = out.masked_fill(torch.isneginf(total), 0.0)
    return out.reshape(B, H, 1, Dv).to(q.dtype)

