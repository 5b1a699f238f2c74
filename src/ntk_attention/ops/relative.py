"""NTK-Attention with the prefix mass measured relative to each row's own attention mass.

    out_i = (softmax(s_i) V + phi(q_i)^T z) / (1 + phi(q_i)^T kvec)

This is the NTK formula with both prefix sums scaled by the row's own mass ``sum_j e^{s_ij}``: the
prefix's share of row i is ``c_i / (1 + c_i)``, ``c_i = phi(q_i)^T kvec``, however much mass the row
has. In the absolute form (``ntk_attention``) the same state takes a large share of a row with
little mass (a causal decoder's first tokens, about ``e^0``) and almost none of a row with much
(an encoder row, ``e^6`` and more; long inputs), so one learning rate cannot suit both. Softmax
attention runs through ``torch.nn.functional.scaled_dot_product_attention`` unchanged (any backend,
any mask it takes), so ``z = 0, kvec = 0`` returns exactly what SDPA returns. The reference is
``naive.relative_ntk_attention_naive``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import _check_dropout, _scale
from .checks import check_mask, check_ntk_state, check_qkv
from .feature_maps import FeatureMapLike, get_feature_map


def relative_ntk_attention(
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
) -> torch.Tensor:
    """Shapes and masks as ``ntk_attention`` (q ``[B,H,L,D]``, k/v ``[B,H_kv,S,D]``, z ``[H or H_kv,r,D_v]``,
    kvec ``[H or H_kv,r]``); ``phi(q)^T kvec`` is clamped at 0. Returns ``[B,H,L,D_v]`` in q's dtype."""
    B, H, H_kv, L, S, D, D_v = check_qkv(q, k, v)
    fmap = get_feature_map(feature_map)
    check_ntk_state(z, kvec, H, H_kv, fmap.feature_dim(D), D_v, q, fmap)
    check_mask(attn_mask, B, H, L, S, q.device)
    scale = _scale(scale, D)
    dropout_p = _check_dropout(dropout_p)
    if L == 0:
        return q.new_zeros(B, H, 0, D_v)
    if S == 0:  # no key to attend to: the prefix alone (its values' average), 0 where it has no mass
        attended = q.new_zeros(B, H, L, D_v)
    else:
        if causal and L > S:
            raise ValueError(f"causal attention needs at least as many keys as queries (bottom-right aligned), got L={L}, S={S}")
        plain_causal = causal and L == S and attn_mask is None  # SDPA's own causal path
        mask = attn_mask
        if causal and not plain_causal:  # SDPA's is_causal is top-left aligned; ours is bottom-right (a cache)
            visible = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L)
            mask = (visible if attn_mask is None else visible & attn_mask if attn_mask.dtype == torch.bool
                    else attn_mask.masked_fill(~visible, float("-inf")))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=plain_causal,
                                                  scale=scale, enable_gqa=H != H_kv)
    with torch.autocast(q.device.type, enabled=False):  # the NTK sums in full precision
        phi = fmap(q, scale)
        groups = H // z.shape[0]
        state = torch.cat([z, kvec.unsqueeze(-1)], dim=-1).to(phi.dtype).repeat_interleave(groups, dim=0)
        stats = phi @ state  # [B, H, L, D_v + 1]
        numerator, mass = stats[..., :-1], stats[..., -1:].clamp_min(0)
        out = (attended.to(phi.dtype) + numerator) / (1 + mass)
    return out.to(q.dtype)
