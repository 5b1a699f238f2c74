"""NTK-Attention in one Triton kernel: softmax over key blocks, the NTK term and their merge.

Forward, per tile of BLOCK_M query rows of one head: ``phi(q)`` from the query tile (the ELU map;
other feature maps hand the kernel ``phi(q)^T [Z | k]`` computed by PyTorch), ``N = phi^T Z``,
``c = max(phi^T k, 0)``, then FlashAttention's online softmax over key blocks of the head's
key/value head (grouped-query attention reads k and v in place), and at the end the exact merge in
log space (docs: ``fused/torch_fused.py``):

    T = logaddexp(lse, log c),   out = e^{lse - T} O + e^{-T} N      (e^{-T} capped, 0 where T = -inf)

``T`` is stored per row. Backward: the merged attention is softmax attention whose weights are
``p_ij = e^{s_ij - T_i}``, so dq, dk, dv are FlashAttention's backward with ``T`` in place of the
log-sum-exp and ``delta_i = g_i . out_i``; one program per key block of a key/value head sums over
the query heads of its group (no atomics). ``dN = e^{-T} g``, ``dc = -e^{-T} (g . out)`` (0 where
``c`` was clamped) reach ``phi``, ``Z`` and ``k`` through PyTorch's autograd around the kernel.

Causal is bottom-right aligned (query i sees keys j <= i + S - L); an additive mask (bool masks
arrive as 0 / -inf) is read with its broadcast strides. float32 dot products run in IEEE precision
(no TF32), so float32 results match the reference to ~1e-6.

Import this module only through ``ops.backends`` (it needs ``triton``). With ``TRITON_INTERPRET=1``
set before it is imported, the kernels run on CPU tensors under Triton's interpreter (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import max_exponent, repeat_kv

INTERPRETED = bool(triton.knobs.runtime.interpret)


@triton.jit
def _logaddexp(a, b):
    mx = tl.maximum(a, b)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    return mx_safe + tl.log(tl.exp(a - mx_safe) + tl.exp(b - mx_safe))


@triton.jit
def _tile(base, rows, cols, s_row, s_col, n_rows, n_cols):
    """The [len(rows), len(cols)] tile at base + rows * s_row + cols * s_col, 0 outside the bounds."""
    return tl.load(base + rows[:, None] * s_row + cols[None, :] * s_col,
                   mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _scores(q, k_t, mask_ptrs, offs_m, offs_n, L, S, scale,
            CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """Scaled scores [BLOCK_M, BLOCK_N] of a query tile against a key block, -inf where not visible."""
    s = tl.dot(q, k_t, input_precision=PRECISION) * scale
    visible = (offs_m[:, None] < L) & (offs_n[None, :] < S)
    if HAS_MASK:
        s += tl.load(mask_ptrs, mask=visible, other=0.0).to(tl.float32)
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None] + (S - L))
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _forward_kernel(
    Q, K, V, Z, KV, STATS, MASK, OUT, T,
    sqb, sqh, sql, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
    szh, szr, szd, skvh, skvr, sstb, ssth, sstl, sstd,
    smb, smh, sml, sms, sob, soh, sol, sod,
    H, G, GS, L, S, D, DV, scale, sqrt_scale, max_exp,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, ELU: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < L
    q = _tile(Q + b * sqb + h * sqh, offs_m, offs_d, sql, sqd, L, D)

    # The NTK statistics N [BLOCK_M, DV] and c [BLOCK_M], in float32.
    if ELU:
        x = q.to(tl.float32) * sqrt_scale
        phi = tl.where(x > 0, x + 1.0, tl.exp(x))  # ELU(x) + 1; r = D, so offs_d indexes features
        phi = tl.where(offs_d[None, :] < D, phi, 0.0)
        hs = h // GS
        z = _tile(Z + hs * szh, offs_d, offs_dv, szr, szd, D, DV)
        num = tl.dot(phi, z, input_precision="ieee")
        kv = tl.load(KV + hs * skvh + offs_d * skvr, mask=offs_d < D, other=0.0)
        c = tl.sum(phi * kv[None, :], axis=1)
    else:
        st = STATS + b * sstb + h * ssth + offs_m * sstl
        num = _tile(STATS + b * sstb + h * ssth, offs_m, offs_dv, sstl, sstd, L, DV)
        c = tl.load(st + DV * sstd, mask=row_ok, other=0.0)
    c = tl.maximum(c, 0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    hi = S
    if CAUSAL:  # later key blocks are not visible to any row of this tile
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M + S - L)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_base = MASK + b * smb + h * smh + offs_m[:, None] * sml
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_t = _tile(k_base, offs_d, offs_n, skd, sks, D, S)
        s = _scores(q, k_t, m_base + offs_n[None, :] * sms, offs_m, offs_n, L, S, scale, CAUSAL, HAS_MASK, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tile(v_base, offs_n, offs_dv, svs, svd, S, DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # Merge with the NTK state: acc is relative to e^{m_i}, so w O = acc e^{m_i - T}.
    total = _logaddexp(m_i + tl.log(l_i), tl.log(c))
    dead = total == float("-inf")  # no visible key and c = 0: output 0
    total_safe = tl.where(dead, 0.0, total)
    w = tl.where(dead, 0.0, tl.exp(m_i - total_safe))
    beta = tl.where(dead, 0.0, tl.exp(tl.minimum(-total_safe, max_exp)))
    out = acc * w[:, None] + num * beta[:, None]
    tl.store(OUT + b * sob + h * soh + offs_m[:, None] * sol + offs_dv[None, :] * sod, out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(T + bh * L + offs_m, total, mask=row_ok)


@triton.jit
def _dq_kernel(
    Q, K, V, MASK, DO, T, DELTA, DQ,
    sqb, sqh, sql, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
    smb, smh, sml, sms, sdob, sdoh, sdol, sdod,
    H, G, L, S, D, DV, scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < L
    q = _tile(Q + b * sqb + h * sqh, offs_m, offs_d, sql, sqd, L, D)
    do = _tile(DO + b * sdob + h * sdoh, offs_m, offs_dv, sdol, sdod, L, DV)
    t = tl.load(T + bh * L + offs_m, mask=row_ok, other=0.0)
    t = tl.where(t == float("-inf"), 0.0, t)  # dead rows see no key: p = 0 already
    delta = tl.load(DELTA + bh * L + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M + S - L)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_base = MASK + b * smb + h * smh + offs_m[:, None] * sml
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_t = _tile(k_base, offs_d, offs_n, skd, sks, D, S)
        v_t = _tile(v_base, offs_dv, offs_n, svd, svs, DV, S)
        s = _scores(q, k_t, m_base + offs_n[None, :] * sms, offs_m, offs_n, L, S, scale, CAUSAL, HAS_MASK, PRECISION)
        p = tl.exp(s - t[:, None])
        dp = tl.dot(do, v_t, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=PRECISION)
    tl.store(DQ + bh * L * D + offs_m[:, None] * D + offs_d[None, :], dq * scale,
             mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dkdv_kernel(
    Q, K, V, MASK, DO, T, DELTA, DK, DV_OUT,
    sqb, sqh, sql, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
    smb, smh, sml, sms, sdob, sdoh, sdol, sdod,
    H, H_KV, G, L, S, D, DV, scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // H_KV
    hk = bhk % H_KV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < S
    k_t = _tile(K + b * skb + hk * skh, offs_d, offs_n, skd, sks, D, S)
    v = _tile(V + b * svb + hk * svh, offs_n, offs_dv, svs, svd, S, DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo = 0
    if CAUSAL:  # earlier query rows see none of these keys
        lo = tl.maximum(0, pid_n * BLOCK_N - (S - L))
        lo = (lo // BLOCK_M) * BLOCK_M
    for g in range(0, G):
        h = hk * G + g
        bh = b * H + h
        m_head = MASK + b * smb + h * smh
        for start_m in range(lo, L, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < L
            q = _tile(Q + b * sqb + h * sqh, offs_m, offs_d, sql, sqd, L, D)
            do = _tile(DO + b * sdob + h * sdoh, offs_m, offs_dv, sdol, sdod, L, DV)
            t = tl.load(T + bh * L + offs_m, mask=row_ok, other=0.0)
            t = tl.where(t == float("-inf"), 0.0, t)
            delta = tl.load(DELTA + bh * L + offs_m, mask=row_ok, other=0.0)
            s = _scores(q, k_t, m_head + offs_m[:, None] * sml + offs_n[None, :] * sms, offs_m, offs_n, L, S, scale,
                        CAUSAL, HAS_MASK, PRECISION)
            p = tl.exp(s - t[:, None])  # [BLOCK_M, BLOCK_N]
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    base = bhk * S
    tl.store(DK + (base + offs_n[:, None]) * D + offs_d[None, :], dk * scale, mask=col_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DV_OUT + (base + offs_n[:, None]) * DV + offs_dv[None, :], dv, mask=col_ok[:, None] & (offs_dv[None, :] < DV))


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _tiles(L: int, D: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N). Small tiles under the interpreter so tiny test shapes span several."""
    if INTERPRETED:
        return 16, 16
    block_m = 16 if L <= 16 else 64  # a decode step has one query row
    return block_m, (64 if D <= 64 else 32)


def _mask_strides(mask, shape):
    if mask is None:
        return None, (0, 0, 0, 0)
    full = torch.broadcast_to(mask, shape)  # a view: broadcast dims get stride 0
    return full, full.stride()


class _TritonNTK(torch.autograd.Function):
    """Inputs as ``ntk_attention`` checked them; ``z, kvec`` (ELU, in-kernel phi) or ``stats``."""

    @staticmethod
    def forward(ctx, q, k, v, z, kvec, stats, mask, causal, scale, fmap):
        B, H, L, D = q.shape
        H_kv, S, DV = k.shape[1], k.shape[2], v.shape[-1]
        elu = stats is None
        out = torch.empty(B, H, L, DV, device=q.device, dtype=q.dtype)
        total = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
        full_mask, ms = _mask_strides(mask, (B, H, L, S))
        if elu:
            zz, kk = z.float().contiguous(), kvec.float().contiguous()
            st, sts = q, (0, 0, 0, 0)
        else:
            zz, kk, st = q, q, stats.contiguous()
            sts = st.stride()
        block_m, block_n = _tiles(L, D)
        precision = "ieee" if q.dtype == torch.float32 else None
        _forward_kernel[(triton.cdiv(L, block_m), B * H)](
            q, k, v, zz, kk, st, full_mask if full_mask is not None else q, out, total,
            *q.stride(), *k.stride(), *v.stride(),
            *(zz.stride() if elu else (0, 0, 0)), *(kk.stride() if elu else (0, 0)), *sts,
            *ms, *out.stride(),
            H, H // H_kv, H // (zz.shape[0] if elu else H), L, S, D, DV, scale, scale**0.5, max_exponent(torch.float32),
            CAUSAL=causal, HAS_MASK=full_mask is not None, ELU=elu, PRECISION=precision,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block(D), BLOCK_DV=_block(DV),
        )
        ctx.causal, ctx.scale, ctx.fmap, ctx.elu = causal, scale, fmap, elu
        ctx.save_for_backward(q, k, v, z, kvec, stats, full_mask, out, total)
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, z, kvec, stats, full_mask, out, total = ctx.saved_tensors
        B, H, L, D = q.shape
        H_kv, S, DV = k.shape[1], k.shape[2], v.shape[-1]
        g = g.contiguous()
        gf = g.float()
        delta = torch.linalg.vecdot(gf, out.float()).contiguous()  # [B, H, L]
        dq = torch.empty(B, H, L, D, device=q.device, dtype=torch.float32)
        dk = torch.empty(B, H_kv, S, D, device=q.device, dtype=torch.float32)
        dv = torch.empty(B, H_kv, S, DV, device=q.device, dtype=torch.float32)
        ms = full_mask.stride() if full_mask is not None else (0, 0, 0, 0)
        mask_arg = full_mask if full_mask is not None else q
        block_m, block_n = _tiles(L, D)
        common = dict(CAUSAL=ctx.causal, HAS_MASK=full_mask is not None,
                      PRECISION="ieee" if q.dtype == torch.float32 else None,
                      BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block(D), BLOCK_DV=_block(DV))
        strides = (*q.stride(), *k.stride(), *v.stride(), *ms, *g.stride())
        _dq_kernel[(triton.cdiv(L, block_m), B * H)](
            q, k, v, mask_arg, g, total, delta, dq, *strides, H, H // H_kv, L, S, D, DV, ctx.scale, **common)
        _dkdv_kernel[(triton.cdiv(S, block_n), B * H_kv)](
            q, k, v, mask_arg, g, total, delta, dk, dv, *strides, H, H_kv, H // H_kv, L, S, D, DV, ctx.scale, **common)

        # The NTK state's share, in PyTorch: dN = beta g, dc = -beta (g . out) where c was not clamped.
        dead = torch.isneginf(total)
        beta = torch.exp((-total).clamp_max(max_exponent(torch.float32))).masked_fill(dead, 0).unsqueeze(-1)
        d_num = beta * gf
        d_den = -beta * delta.unsqueeze(-1)
        dz = dkvec = d_stats = None
        if ctx.elu:
            with torch.enable_grad(), torch.autocast(q.device.type, enabled=False):
                q_, z_, kvec_ = (t.detach().requires_grad_() for t in (q, z, kvec))
                state = torch.cat([z_, kvec_.unsqueeze(-1)], dim=-1).float()
                st = ctx.fmap(q_, ctx.scale) @ repeat_kv(state, H)
                d_st = torch.cat([d_num, torch.where(st[..., -1:] >= 0, d_den, 0)], dim=-1)
                dq_phi, dz, dkvec = torch.autograd.grad(st, (q_, z_, kvec_), d_st)
            dq = dq + dq_phi
        else:
            d_stats = torch.cat([d_num, torch.where(stats[..., -1:] >= 0, d_den, 0)], dim=-1)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dz, dkvec, d_stats, None, None, None, None


def triton_ntk_attention(q, k, v, z, kvec, fmap, causal: bool, mask, scale: float) -> torch.Tensor:
    """``ntk_attention`` on the Triton kernel; arguments already checked (``mask`` additive or None)."""
    from ..feature_maps import EluFeatureMap

    if type(fmap) is EluFeatureMap:  # phi computed in the kernel from the query tile
        return _TritonNTK.apply(q, k, v, z, kvec, None, mask, causal, scale, fmap)
    with torch.autocast(q.device.type, enabled=False):  # other maps: phi^T [Z | k] by PyTorch
        phi = fmap(q, scale)
        stats = phi @ repeat_kv(torch.cat([z, kvec.unsqueeze(-1)], dim=-1).to(phi.dtype), q.shape[1])
    return _TritonNTK.apply(q, k, v, None, None, stats.float(), mask, causal, scale, fmap)
