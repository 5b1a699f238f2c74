"""Plain reference implementations: the formulas written out, with the full score matrix.

O(L S) memory. They exist to define the semantics and to test the fast paths
(``ntk_attention``, ``prefix_attention``) against; do not use them for real work.
"""

from __future__ import annotations

import torch

from .feature_maps import get_feature_map
from .utils import additive_mask, causal_bias, compute_dtype, max_exponent, repeat_kv


def visibility_bias(L: int, S: int, causal: bool, attn_mask, device, dtype) -> torch.Tensor:
    """The visibility of input keys as an additive mask broadcastable to [B, H, L, S].

    Causal is bottom-right aligned: query i sees keys j <= i + (S - L).
    """
    bias = torch.zeros(1, 1, L, S, device=device, dtype=dtype)
    if causal:
        bias = bias + causal_bias(L, S, device, dtype)
    if attn_mask is not None:
        bias = bias + additive_mask(attn_mask, dtype).to(dtype)
    return bias


def ntk_attention_naive(q, k, v, z, kvec, feature_map="elu", causal=False, attn_mask=None, scale=None):
    """``(sum_j e^{s_ij} v_j + phi(q_i)^T z) / (sum_j e^{s_ij} + phi(q_i)^T kvec)`` over visible j.

    A row that sees no key and has ``phi(q_i)^T kvec = 0`` returns 0. Where the softmax sum
    underflows and ``phi(q_i)^T kvec = 0``, the NTK term's weight ``e^{-m}`` is capped
    (``utils.max_exponent``): a zero numerator then adds 0 instead of ``inf * 0``.
    """
    fmap = get_feature_map(feature_map)
    H, L, D = q.shape[1], q.shape[2], q.shape[3]
    S = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    dt = compute_dtype(q)
    qc, kc, vc = q.to(dt), repeat_kv(k, H).to(dt), repeat_kv(v, H).to(dt)
    s = scale * qc @ kc.transpose(-1, -2) + visibility_bias(L, S, causal, attn_mask, q.device, dt)
    phi = fmap(qc, scale).to(dt)
    num_ntk = phi @ repeat_kv(z.to(dt), H)  # [B, H, L, D_v]; z per query head or per KV head
    den_ntk = (phi @ repeat_kv(kvec.to(dt).unsqueeze(-1), H)).clamp_min(0)  # [B, H, L, 1]
    # Subtract the row maximum of the scores and of log(den_ntk) so nothing overflows.
    s_max = s.amax(-1, keepdim=True) if S > 0 else torch.full_like(den_ntk, float("-inf"))  # S = 0: no keys
    m = torch.maximum(s_max, den_ntk.log())
    # The shift cancels in num / den, so it carries no gradient (through log 0 it would be NaN).
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    p = torch.exp(s - m)
    e_m = torch.exp((-m).clamp_max(max_exponent(dt)))  # capped as the fast paths cap it
    num = p @ vc + num_ntk * e_m
    den = p.sum(-1, keepdim=True) + den_ntk * e_m
    out = torch.where(den > 0, num / den.clamp_min(torch.finfo(dt).tiny), torch.zeros_like(num))
    return out.to(q.dtype)


def prefix_attention_naive(q, k, v, prefix_k, prefix_v, causal=False, attn_mask=None, scale=None):
    """Softmax attention over ``[prefix; input]``; the prefix is visible to every query."""
    B, H, L, D = q.shape
    S = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    dt = compute_dtype(q)
    m = prefix_k.shape[-2]
    pk = repeat_kv(prefix_k, H).to(dt).expand(B, H, m, D)
    pv = repeat_kv(prefix_v, H).to(dt).expand(B, H, m, prefix_v.shape[-1])
    keys = torch.cat([pk, repeat_kv(k, H).to(dt)], dim=2)
    values = torch.cat([pv, repeat_kv(v, H).to(dt)], dim=2)
    input_bias = visibility_bias(L, S, causal, attn_mask, q.device, dt)
    prefix_bias = torch.zeros(*input_bias.shape[:-1], m, device=q.device, dtype=dt)
    bias = torch.cat([prefix_bias, input_bias], dim=-1)
    s = scale * q.to(dt) @ keys.transpose(-1, -2) + bias
    return (torch.softmax(s, dim=-1) @ values).to(q.dtype)


def prefix_to_ntk_naive(prefix_k, prefix_v, feature_map="elu", scale=None):
    """``z = sum_j phi(kP_j) vP_j^T``, ``kvec = sum_j phi(kP_j)`` per head."""
    fmap = get_feature_map(feature_map)
    scale = prefix_k.shape[-1] ** -0.5 if scale is None else scale
    dt = compute_dtype(prefix_k)
    phi = fmap(prefix_k.to(dt), scale).to(dt)  # [H, m, r]
    return phi.transpose(-1, -2) @ prefix_v.to(dt), phi.sum(-2)

