"""Argument checks shared by the fast path and the reference: clear errors before any kernel runs."""

from __future__ import annotations

import torch


def check_tensor(name: str, x, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_qkv(q, k, v) -> tuple[int, int, int, int, int, int, int]:
    """Check ``q [B,H,L,D]``, ``k [B,H_kv,S,D]``, ``v [B,H_kv,S,D_v]``; return (B,H,H_kv,L,S,D,D_v)."""
    check_tensor("q", q, 4, "[B, H, L, D]")
    check_tensor("k", k, 4, "[B, H_kv, S, D]")
    check_tensor("v", v, 4, "[B, H_kv, S, D_v]")
    B, H, L, D = q.shape
    if H == 0 or D == 0 or v.shape[3] == 0:
        raise ValueError(f"heads H and head dims D, D_v must be at least 1, got q {tuple(q.shape)}, v {tuple(v.shape)}")
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch size differs: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads H_kv, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    H_kv = k.shape[1]
    if H_kv == 0 or H % H_kv != 0:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads H_kv={H_kv}")
    if k.shape[3] != D:
        raise ValueError(f"k head dim must equal q head dim D={D}, got k {tuple(k.shape)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length S, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    check_same("k", k, q)
    check_same("v", v, q)
    return B, H, H_kv, L, k.shape[2], D, v.shape[3]


def check_same(name: str, x: torch.Tensor, q: torch.Tensor) -> None:
    if x.device != q.device:
        raise ValueError(f"{name} is on {x.device} but q is on {q.device}; move all inputs to one device")
    if x.dtype != q.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but q has dtype {q.dtype}; cast them to one dtype")


def check_mask(attn_mask, B: int, H: int, L: int, S: int, device) -> None:
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be boolean (True = attend) or an additive float mask, got dtype {attn_mask.dtype}")
    if attn_mask.device != device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {device}")
    try:
        torch.broadcast_shapes(attn_mask.shape, (B, H, L, S))
        ok = attn_mask.dim() <= 4
    except RuntimeError:
        ok = False
    if not ok or torch.broadcast_shapes(attn_mask.shape, (B, H, L, S)) != (B, H, L, S):
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to [B, H, L, S] = {[B, H, L, S]}")


def check_ntk_state(z, kvec, H: int, H_kv: int, r: int, D_v: int, q: torch.Tensor, feature_map) -> None:
    """``z [H or H_kv, r, D_v]``, ``kvec`` with the same head count ``[H or H_kv, r]``."""
    check_tensor("z", z, 3, "[H or H_kv, r, D_v]")
    check_tensor("kvec", kvec, 2, "[H or H_kv, r]")
    heads = z.shape[0] if z.shape[0] in (H, H_kv) else H
    if tuple(z.shape) != (heads, r, D_v):
        raise ValueError(
            f"z must have shape [H or H_kv, r, D_v] = {[H, r, D_v]} or {[H_kv, r, D_v]} for feature map "
            f"{feature_map!r} (r = {r} at head dim {q.shape[-1]}), got {tuple(z.shape)}"
        )
    if tuple(kvec.shape) != (heads, r):
        raise ValueError(f"kvec must have shape [{heads}, r] = {[heads, r]} (z's head count) for feature map "
                         f"{feature_map!r}, got {tuple(kvec.shape)}")
    for name, x in (("z", z), ("kvec", kvec)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")


def check_prefix(prefix_k, prefix_v, H: int, H_kv: int, D: int, D_v: int | None = None) -> None:
    check_tensor("prefix_k", prefix_k, 3, "[H or H_kv, m, D]")
    check_tensor("prefix_v", prefix_v, 3, "[H or H_kv, m, D_v]")
    if prefix_k.shape[0] != prefix_v.shape[0] or prefix_k.shape[1] != prefix_v.shape[1]:
        raise ValueError(f"prefix_k {tuple(prefix_k.shape)} and prefix_v {tuple(prefix_v.shape)} must agree in heads and length m")
    if prefix_k.shape[0] not in (H, H_kv):
        raise ValueError(f"prefix_k must have H={H} or H_kv={H_kv} heads, got {tuple(prefix_k.shape)}")
    if prefix_k.shape[1] < 1:
        raise ValueError(f"prefix length m must be at least 1, got prefix_k {tuple(prefix_k.shape)}")
    if prefix_k.shape[2] != D:
        raise ValueError(f"prefix_k head dim must be D={D}, got {tuple(prefix_k.shape)}")
    if D_v is not None and prefix_v.shape[2] != D_v:
        raise ValueError(f"prefix_v head dim must be D_v={D_v}, got {tuple(prefix_v.shape)}")
