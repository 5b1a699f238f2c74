"""Public operator API: NTK-Attention, exact prefix attention, and the closed form between them.

The references with the same semantics are in ``naive.py``; tests compare the two.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from .backends import DECODE, TRITON, select_backend
from .checks import check_mask, check_ntk_state, check_prefix, check_qkv, check_tensor
from .feature_maps import FeatureMapLike, get_feature_map
from .fused.torch_decode import DecodeState
from .fused.torch_fused import MergedAttention
from .utils import additive_mask, repeat_kv


def _fold_groups(q, k, v, ntk_stats, mask, causal):
    """Grouped-query attention without copying k and v: the G query heads that share one key/value
    head become G times more query rows of that head. Valid when rows do not depend on their
    position (no causal mask) and the mask is the same for every head; None where it does not apply.
    """
    B, H, L, D = q.shape
    H_kv = k.shape[1]
    G = H // H_kv
    if G == 1 or causal or (mask is not None and mask.dim() == 4 and mask.shape[1] != 1):
        return None
    if mask is not None and mask.shape[-2] != 1:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        mask = mask.unsqueeze(2).expand(mask.shape[0], 1, G, L, mask.shape[-1]).reshape(mask.shape[0], 1, G * L, mask.shape[-1])

    def fold(x):
        return x.reshape(B, H_kv, G * L, x.shape[-1])

    return fold(q), k, v, fold(ntk_stats), mask


def _check_dropout(dropout_p) -> float:
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def _scale(scale, D: int) -> float:
    if scale is None:
        return D**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    return float(scale)


def ntk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    z: torch.Tensor,
    kvec: torch.Tensor,
    *,
    feature_map: FeatureMapLike = "elu",
    causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = "auto",
) -> torch.Tensor:
    """NTK-Attention: softmax attention over the input plus the infinite-prefix term.

    ``out_i = (sum_j e^{s_ij} v_j + phi(q_i)^T z) / (sum_j e^{s_ij} + phi(q_i)^T kvec)`` over the
    keys j that query i sees (``causal`` bottom-right aligned, ``attn_mask`` bool True = attend or
    additive float); the NTK term is never masked. ``phi(q)^T kvec`` is clamped at 0.

    Shapes: q ``[B,H,L,D]``, k ``[B,H_kv,S,D]``, v ``[B,H_kv,S,D_v]``, z ``[H,r,D_v]``,
    kvec ``[H,r]`` with ``r = feature_map.feature_dim(D)`` (or ``[H_kv,...]``: one state per key/value
    head, shared by its query heads like a GQA prefix); returns ``[B,H,L,D_v]`` in q's dtype.
    ``dropout_p`` drops softmax weights over the input (not the NTK term). ``backend``: ``"auto"``
    (default: a PyTorch fused kernel, else the chunked path; a generation step on CPU: ``"decode"``), or one of ``ops.backends.BACKEND_NAMES``; a named backend that cannot take
    the inputs raises ``BackendRefused`` saying why. Memory is O(L): no L x S matrix is built, except
    the causal mask handed to a torch fused kernel when L != S (decoding over a cache) or an
    ``attn_mask`` that is already one.

    Empty inputs: L = 0 or B = 0 gives an empty output; S = 0 (no keys) gives the NTK term alone,
    ``N / c``, and 0 in rows where also ``c = 0``.
    """
    B, H, H_kv, L, S, D, D_v = check_qkv(q, k, v)
    fmap = get_feature_map(feature_map)
    r = fmap.feature_dim(D)
    check_ntk_state(z, kvec, H, H_kv, r, D_v, q, fmap)
    check_mask(attn_mask, B, H, L, S, q.device)
    scale = _scale(scale, D)
    dropout_p = _check_dropout(dropout_p)
    causal = bool(causal)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, z, kvec))
    chosen = select_backend(q, k, backend=backend, dropout_p=dropout_p, needs_grad=needs_grad,
                            has_mask=attn_mask is not None or (causal and L != S), op="ntk")
    if chosen is TRITON:
        from .fused.triton_ntk import triton_ntk_attention

        return triton_ntk_attention(q, k, v, z, kvec, fmap, causal, additive_mask(attn_mask, q.dtype), scale)

    if chosen is DECODE:
        return ntk_decode_state(z, kvec, H, fmap)(q, k, v, attn_mask, scale)
    # Under autocast these matmuls would run in bfloat16; the NTK sums need full precision.
    with torch.autocast(q.device.type, enabled=False) if torch.is_autocast_enabled(q.device.type) else nullcontext():
        phi = fmap(q, scale)  # [B, H, L, r], float32 or float64
        state = torch.cat([z, kvec.unsqueeze(-1)], dim=-1).to(phi.dtype)
        ntk_stats = phi @ repeat_kv(state, H)  # [N | c]; one state per KV head serves its query heads
    mask = additive_mask(attn_mask, q.dtype)
    folded = _fold_groups(q, k, v, ntk_stats, mask, causal)
    if folded is not None:
        out = MergedAttention.apply(*folded[:3], None, None, *folded[3:], False, scale, dropout_p, chosen, None)
        return out.reshape(B, H, L, D_v)
    return MergedAttention.apply(
        q, repeat_kv(k, H), repeat_kv(v, H), None, None, ntk_stats, mask, causal, scale, dropout_p, chosen, None
    )


def ntk_decode_state(z: torch.Tensor, kvec: torch.Tensor, heads: int, feature_map: FeatureMapLike = "elu") -> DecodeState:
    """``(Z, k)`` prepared for ``ntk_decode_step``: ``[Z | k]`` stacked per query head
    (``.stacked [heads, r, D_v + 1]``) with the feature map; made once and reused for every generated
    token while ``Z`` and ``k`` stay the same (it also keeps the compiled kernel's arguments)."""
    return DecodeState(repeat_kv(torch.cat([z, kvec.unsqueeze(-1)], dim=-1), heads), get_feature_map(feature_map))


def ntk_decode_step(q, k, v, state: DecodeState, *, attn_mask=None, scale: float | None = None):
    """``ntk_attention`` for one generation step (``L = 1``, no gradient, CPU) with a state from
    ``ntk_decode_state``: what ``backend="decode"`` computes, without preparing the state again at
    every layer and token. None where the decode backend does not take the inputs (its refusal says
    why); call ``ntk_attention`` there."""
    stacked = state.stacked
    r = state.feature_map.feature_dim(q.shape[-1])
    if stacked.shape[0] != q.shape[1] or stacked.shape[1] != r or stacked.shape[2] != v.shape[-1] + 1:
        raise ValueError(f"ntk_decode_step: the state is for {stacked.shape[0]} heads, r = {stacked.shape[1]} features "
                         f"and D_v = {stacked.shape[2] - 1} (stacked {tuple(stacked.shape)}), but q is {tuple(q.shape)} "
                         f"(r = {r} for its head dim) and v {tuple(v.shape)}")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, stacked))
    if DECODE.refusal(q, k, dropout_p=0.0, has_mask=attn_mask is not None, op="ntk", needs_grad=needs_grad) is not None:
        return None
    return state(q, k, v, attn_mask, _scale(scale, q.shape[-1]))


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = "auto",
) -> torch.Tensor:
    """Exact softmax attention over ``[prefix; input]``; every query sees the whole prefix.

    ``prefix_k [H or H_kv, m, D]``, ``prefix_v [H or H_kv, m, D_v]`` are shared by the batch;
    ``causal`` and ``attn_mask`` apply to the input keys only. The prefix and the input are two
    attention states merged exactly, so memory is O(L + m) however long the prefix is. ``backend``
    as in ``ntk_attention`` (there is no triton kernel for it). S = 0 gives attention over the
    prefix alone; L = 0 or B = 0 an empty output.
    """
    B, H, H_kv, L, S, D, D_v = check_qkv(q, k, v)
    check_prefix(prefix_k, prefix_v, H, H_kv, D, D_v)
    for name, x in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if x.device != q.device or x.dtype != q.dtype:
            raise ValueError(f"{name} must match q's device and dtype ({q.device}, {q.dtype}), got {x.device}, {x.dtype}")
    check_mask(attn_mask, B, H, L, S, q.device)
    scale = _scale(scale, D)
    causal = bool(causal)
    m = prefix_k.shape[1]
    input_backend = select_backend(q, k, backend=backend, has_mask=attn_mask is not None or (causal and L != S), op="prefix")
    pk = repeat_kv(prefix_k, H).unsqueeze(0).expand(B, H, m, D)
    pv = repeat_kv(prefix_v, H).unsqueeze(0).expand(B, H, m, D_v)
    prefix_backend = select_backend(q, pk, backend=backend, op="prefix")
    return MergedAttention.apply(
        q, repeat_kv(k, H), repeat_kv(v, H), pk, pv, None,
        additive_mask(attn_mask, q.dtype), causal, scale, 0.0, input_backend, prefix_backend,
    )


def prefix_to_ntk(
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    feature_map: FeatureMapLike = "elu",
    scale: float | None = None,
    chunk_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed form of a prefix: ``z = sum_j phi(kP_j) vP_j^T`` ``[H,r,D_v]``, ``kvec = sum_j phi(kP_j)`` ``[H,r]``.

    With an exact feature map (``phi(q).phi(k) = e^{scale q.k}``), ``ntk_attention(q, k, v, z, kvec)``
    equals ``prefix_attention(q, k, v, prefix_k, prefix_v)``; with an approximate one it is the
    approximation studied in the paper. Use the same ``feature_map`` and ``scale`` as the attention
    that will read the result. Sums run over chunks of the prefix, so ``m`` may be very large.
    Results are float32 (float64 for float64 input).
    """
    check_tensor("prefix_k", prefix_k, 3, "[H, m, D]")
    check_tensor("prefix_v", prefix_v, 3, "[H, m, D_v]")
    if prefix_k.shape[:2] != prefix_v.shape[:2]:
        raise ValueError(f"prefix_k {tuple(prefix_k.shape)} and prefix_v {tuple(prefix_v.shape)} must agree in heads and length m")
    if prefix_k.shape[1] < 1:
        raise ValueError(f"prefix length m must be at least 1, got prefix_k {tuple(prefix_k.shape)}")
    if prefix_k.device != prefix_v.device:
        raise ValueError(f"prefix_k is on {prefix_k.device} but prefix_v on {prefix_v.device}")
    fmap = get_feature_map(feature_map)
    scale = _scale(scale, prefix_k.shape[-1])
    z = kvec = 0
    for start in range(0, prefix_k.shape[1], chunk_size):
        phi = fmap(prefix_k[:, start:start + chunk_size], scale)
        z = z + phi.transpose(-1, -2) @ prefix_v[:, start:start + chunk_size].to(phi.dtype)
        kvec = kvec + phi.sum(-2)
    return z, kvec
