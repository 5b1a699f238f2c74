"""One decoding step on CPU (a single query row, no gradient) of NTK-Attention in a few ops.

Generation calls the operator once per layer and token with ``L = 1``; there the autograd function
and the general merge cost more in Python than the arithmetic (each small op is ~2-3 us, SDPA's whole
call ~20 us per SmolLM2 layer). Here the G query heads of a key/value group become G rows of one
call to PyTorch's CPU flash kernel (no copy of the cache; a single row has no causal structure), and
its ``(O, lse)`` is merged with ``[N | c] = phi(q)^T [Z | k]`` directly:

    out = (e^lse O + N) / (e^lse + c) = (O + w N) / (1 + w c),   w = e^{-lse}  (capped as in the other paths)

``DecodeState`` (``ops.ntk_decode_state``) stacks ``[Z | k]`` per query head once, with the feature
map; an adapter keeps it for every token (``NTKState`` rebuilds it when its parameters change).
Calling it is one step. Where nothing is masked, the value and key head dims agree and the batch is
small (a generation step of every tested model at batch 1 to 8), the compiled ``cpu_decode.cpp``
computes it in one call, with its arguments prepared once per scale and dtype (``cpu_kernel.py``
builds it; random features are computed inside it, other maps are passed in). Otherwise
``decode_ntk_attention`` below computes it; it is also the kernel's reference. Inside a model the
Python around each step costs more than its arithmetic (the model's weights have just flushed the
caches): keeping the arguments made the difference between 0.94x and 0.95-0.96x of the base
model's tokens/s on SmolLM2.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from ..feature_maps import FeatureMap, RandomFeatureMap
from ..utils import additive_mask, compute_dtype, max_exponent
from . import cpu_kernel
from .torch_states import _Fused


def decode_ntk_attention(q, k, v, state, feature_map: FeatureMap, mask, scale: float) -> torch.Tensor:
    """``q [B,H,1,D]``, ``k, v [B,H_kv,S,*]`` (S >= 1), ``state [H, r, D_v+1]`` from ``ntk_decode_state``,
    ``mask`` boolean (True = attend) or additive, broadcastable to ``[B,H,1,S]``, or None."""
    B, H, _, D = q.shape
    H_kv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // H_kv
    if mask is not None and (mask.all() if mask.dtype == torch.bool else not mask.any()):
        mask = None  # nothing masked (generate() passes such masks without padding): the shorter merge
    with torch.autocast("cpu", enabled=False) if torch.is_autocast_enabled("cpu") else nullcontext():
        phi = feature_map(q, scale)  # float32 or float64: the NTK sums need full precision
        # [N | c] of every query head in one batched product, the heads as its batch: [H, B, Dv + 1]
        stats = torch.bmm(phi.view(B, H, -1).transpose(0, 1), state if state.dtype == phi.dtype else state.to(phi.dtype))
    if mask is not None:
        mask = torch.broadcast_to(additive_mask(mask, q.dtype), (B, H, 1, S)).reshape(B, H_kv, G, S).to(q.dtype)
    if Dv != D:  # the kernel wants one head dim (as in torch_states._Fused)
        q, k, v = _Fused._pad_heads(q, k, v)
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.reshape(B, H_kv, G, q.shape[-1]), k, v, 0.0, False, attn_mask=mask, scale=scale)
    dtype = stats.dtype
    weight = lse.reshape(B, H, 1).to(dtype).neg_().clamp_max_(max_exponent(dtype)).exp_()
    stats = stats.transpose(0, 1)  # [B, H, Dv + 1]
    o = o.reshape(B, H, -1)
    if o.shape[-1] != Dv or o.dtype != dtype:
        o = o[..., :Dv].to(dtype)
    if mask is not None:  # a row that sees no key (the kernel reports lse = 0): the NTK term alone
        blind = ~(mask > float("-inf")).any(-1).view(B, H, 1)
        o = o.masked_fill(blind, 0.0)
        weight = weight.masked_fill(blind, math.exp(max_exponent(dtype)))
    den = torch.addcmul(weight.new_ones(()), stats[..., Dv:].clamp_min(0), weight)  # 1 + w max(c, 0)
    out = torch.addcmul(o, stats[..., :Dv], weight).div_(den)
    if mask is not None:  # ... and 0 where it has no mass either (c = 0)
        out = out.masked_fill(blind & (stats[..., Dv:] <= 0), 0.0)
    return out.view(B, H, 1, Dv).to(q.dtype)


# The kernel's per-row loops beat a dozen PyTorch ops for a few rows (batch x heads); for many rows
# the ops' BLAS products and vectorised exp win (SmolLM2's 9 heads, 300 cached tokens, one thread:
# kernel 587 against 752 us at batch 8, 2156 against 1831 us at batch 32).
KERNEL_MAX_ROWS = 96


class DecodeState:
    """``[Z | k]`` stacked per query head (``stacked [H, r, D_v + 1]``) with its feature map, ready for
    generation steps: ``state(q, k, v, mask, scale)`` is ``decode_ntk_attention`` on them, in one
    compiled call where it can (see the module docstring). The caller has checked that the decode
    backend takes the inputs (``ops.ntk_decode_step`` does)."""

    def __init__(self, stacked: torch.Tensor, feature_map: FeatureMap):
        self.stacked, self.feature_map = stacked, feature_map
        self._kernel_args: dict = {}  # (scale, q dtype) -> the kernel's arguments after k and v

    def __call__(self, q, k, v, mask, scale: float) -> torch.Tensor:
        if mask is not None and (mask.all() if mask.dtype == torch.bool else not mask.any()):
            mask = None  # nothing masked (generate() passes such masks without padding)
        small = q.shape[0] * q.shape[1] <= KERNEL_MAX_ROWS
        kernel = cpu_kernel.compiled() if mask is None and small and v.shape[-1] == q.shape[-1] else None
        if kernel is None:
            return decode_ntk_attention(q, k, v, self.stacked, self.feature_map, mask, scale)
        prepared = self._kernel_args.get((scale, q.dtype))
        if prepared is None:
            prepared = self._kernel_args[(scale, q.dtype)] = self._prepare(q, scale)
        state, projection, normalize, cap = prepared
        phi = None
        if projection is None:  # a map the kernel does not compute: phi from here
            with torch.autocast("cpu", enabled=False) if torch.is_autocast_enabled("cpu") else nullcontext():
                phi = self.feature_map(q, scale).to(state.dtype).reshape(q.shape[0], q.shape[1], -1).contiguous()
        return kernel.decode_step(q, k, v, state, phi, projection, normalize, scale, cap)

    def _prepare(self, q, scale: float) -> tuple:
        """``(state, projection, normalize, cap)`` as ``cpu_decode.cpp`` takes them (projection None:
        the caller passes phi)."""
        dtype = compute_dtype(q)
        projection = None
        if type(self.feature_map) is RandomFeatureMap:  # its features are computed inside the kernel
            projection = self.feature_map._scaled_projection(q.shape[-1], q.device, dtype, scale)
        normalize = projection is not None and self.feature_map.normalize
        return self.stacked.to(dtype).contiguous(), projection, normalize, max_exponent(dtype)
