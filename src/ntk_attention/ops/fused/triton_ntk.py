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
the query heads of its group (no atomics). The dq kernel also computes ``delta`` and the NTK share,
``dN = e^{-T} g`` and ``dc = -e^{-T} (g . out)`` (0 where ``c`` was clamped): with the ELU map it adds
``(dN Z^T + dc k^T) phi'(q)`` to dq and writes each tile's ``phi^T dN``, ``phi^T dc`` (summed into dZ,
dk by PyTorch, deterministically); with other maps it writes ``[dN | dc]`` for autograd through
``phi``.

Causal is bottom-right aligned (query i sees keys j <= i + S - L); an additive mask (bool masks
arrive as 0 / -inf) is read with its broadcast strides. float32 dot products run as ``tf32x3``
(three TF32 tensor-core products), so float32 results match the reference to ~1e-6.

Import this module only through ``ops.backends`` (it needs ``triton``). With ``TRITON_INTERPRET=1``
set before it is imported, the kernels run on CPU tensors under Triton's interpreter (tests).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..utils import max_exponent, repeat_kv

INTERPRETED = bool(triton.knobs.runtime.interpret)
# How float32 dot products run: "tf32x3" keeps float32's accuracy (~1e-6) on tensor cores (IEEE FMA
# loops were 40x slower than SDPA on an H200). The feature-map products (phi^T Z, once per tile) stay
# "ieee": tf32x3 on their float32 [D, D_v] state needs more shared memory than a Hopper block has at D = 128.
FLOAT32_PRECISION = "tf32x3"
PHI_PRECISION = "ieee"
# Launch configurations forced by benchmarks/triton_kernel.py --sweep: {"forward" | "dq" | "dkdv": {...}}.
TILES_OVERRIDE: dict[str, dict] = {}


@triton.jit
def _logaddexp(a, b):
    mx = tl.maximum(a, b)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    return mx_safe + tl.log(tl.exp(a - mx_safe) + tl.exp(b - mx_safe))


@triton.jit
def _load(ptrs, rows, cols, n_rows, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """A 2-D tile, 0 outside the bounds that are checked (unchecked loads are the fast ones)."""
    if CHECK_ROWS and CHECK_COLS:
        x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    elif CHECK_ROWS:
        x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        x = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _scores(q, k_t, mask_ptrs, offs_m, offs_n, L, S, scale,
            CHECKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """Scaled scores [BLOCK_M, BLOCK_N] of a query tile against a key block. ``CHECKED``: the block
    may hold keys past S or (causal) keys some rows must not see, set to -inf; unchecked blocks are
    wholly visible to every row of the tile (the bulk of the work, without the compares)."""
    s = tl.dot(q, k_t, input_precision=PRECISION) * scale
    if HAS_MASK:
        s += tl.load(mask_ptrs, mask=(offs_m[:, None] < L) & (offs_n[None, :] < S), other=0.0).to(tl.float32)
    if CHECKED:
        visible = offs_n[None, :] < S
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + (S - L))
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def _key_ranges(m0, L, S, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the query tile starting at row m0: key blocks [0, full) are visible to all of its rows,
    [full, hi) need the checks. Causal is bottom-right aligned: row i sees keys j <= i + S - L."""
    if CAUSAL:
        hi = tl.minimum(S, m0 + BLOCK_M + S - L)
        full = (tl.maximum(0, m0 + S - L + 1) // BLOCK_N) * BLOCK_N
    else:
        hi = S
        full = (S // BLOCK_N) * BLOCK_N
    return full, hi


@triton.jit
def _forward_blocks(acc, l_i, m_i, q, k_base, v_base, m_base, offs_m, offs_d, offs_dv, lo, hi,
                    L, S, D, DV, skd, sks, svs, svd, sms, scale,
                    CHECKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                    CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr, BLOCK_N: tl.constexpr):
    """FlashAttention's online softmax over the key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_t = _load(k_base + offs_d[:, None] * skd + offs_n[None, :] * sks, offs_d, offs_n, D, S, CHECK_D, CHECKED)
        s = _scores(q, k_t, m_base + offs_n[None, :] * sms, offs_m, offs_n, L, S, scale, CHECKED, CAUSAL, HAS_MASK,
                    PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(v_base + offs_n[:, None] * svs + offs_dv[None, :] * svd, offs_n, offs_dv, S, DV, CHECKED, CHECK_DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _forward_kernel(
    Q, K, V, Z, KV, STATS, MASK, OUT, T,
    sqb, sqh, sql, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
    szh, szr, szd, skvh, skvr, sstb, ssth, sstl, sstd,
    smb, smh, sml, sms, sob, soh, sol, sod,
    H, G, GS, L, S, D, DV, scale, sqrt_scale, max_exp,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, ELU: tl.constexpr, PRECISION: tl.constexpr,
    PHI_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < L
    q = _load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :] * sqd, offs_m, offs_d, L, D, True, CHECK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_base = MASK + b * smb + h * smh + offs_m[:, None] * sml
    full, hi = _key_ranges(m0, L, S, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _forward_blocks(acc, l_i, m_i, q, k_base, v_base, m_base, offs_m, offs_d, offs_dv, 0, full,
                                    L, S, D, DV, skd, sks, svs, svd, sms, scale,
                                    False, CAUSAL, HAS_MASK, PRECISION, CHECK_D, CHECK_DV, BLOCK_N)
    acc, l_i, m_i = _forward_blocks(acc, l_i, m_i, q, k_base, v_base, m_base, offs_m, offs_d, offs_dv, full, hi,
                                    L, S, D, DV, skd, sks, svs, svd, sms, scale,
                                    True, CAUSAL, HAS_MASK, PRECISION, CHECK_D, CHECK_DV, BLOCK_N)

    # The NTK statistics N [BLOCK_M, DV] and c [BLOCK_M], in float32: after the key loop, so that they
    # hold no registers during it.
    if ELU:
        x = q.to(tl.float32) * sqrt_scale
        phi = tl.where(x > 0, x + 1.0, tl.exp(x))  # ELU(x) + 1; r = D, so offs_d indexes features
        phi = tl.where(offs_d[None, :] < D, phi, 0.0)
        hs = h // GS
        z = _load(Z + hs * szh + offs_d[:, None] * szr + offs_dv[None, :] * szd, offs_d, offs_dv, D, DV, CHECK_D, CHECK_DV)
        num = tl.dot(phi, z, input_precision=PHI_PRECISION)
        kv = tl.load(KV + hs * skvh + offs_d * skvr, mask=offs_d < D, other=0.0)
        c = tl.sum(phi * kv[None, :], axis=1)
    else:
        st = STATS + b * sstb + h * ssth
        num = _load(st + offs_m[:, None] * sstl + offs_dv[None, :] * sstd, offs_m, offs_dv, L, DV, True, CHECK_DV)
        c = tl.load(st + offs_m * sstl + DV * sstd, mask=row_ok, other=0.0)
    c = tl.maximum(c, 0.0)

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
def _dq_blocks(dq, q, do, t, delta, k_base, v_base, m_base, offs_m, offs_d, offs_dv, lo, hi,
               L, S, D, DV, skd, sks, svs, svd, sms, scale,
               CHECKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
               CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq of the query tile over the key blocks [lo, hi): the weights p = e^{s - T} recomputed."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_t = _load(k_base + offs_d[:, None] * skd + offs_n[None, :] * sks, offs_d, offs_n, D, S, CHECK_D, CHECKED)
        v_t = _load(v_base + offs_dv[:, None] * svd + offs_n[None, :] * svs, offs_dv, offs_n, DV, S, CHECK_DV, CHECKED)
        s = _scores(q, k_t, m_base + offs_n[None, :] * sms, offs_m, offs_n, L, S, scale, CHECKED, CAUSAL, HAS_MASK,
                    PRECISION)
        p = tl.exp(s - t[:, None])
        dp = tl.dot(do, v_t, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=PRECISION)
    return dq


@triton.jit
def _dq_kernel(
    Q, K, V, MASK, DO, OUT, T, DELTA, DQ, Z, KV, STATS, DZ_PART, DKV_PART, DSTATS,
    sqb, sqh, sql, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
    smb, smh, sml, sms, sdob, sdoh, sdol, sdod, sob, soh, sol, sod,
    szh, szr, szd, skvh, skvr, sstb, ssth, sstl, sstd,
    H, G, GS, L, S, D, DV, scale, sqrt_scale, max_exp,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, ELU: tl.constexpr, PRECISION: tl.constexpr,
    PHI_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr,
):
    """dq of one query tile, and the NTK state's share of the gradient: ``delta = g . out`` (stored
    for the dk/dv kernel), ``dN = beta g``, ``dc = -beta delta`` (0 where ``c`` was clamped), with
    ``beta = e^{-T}``. ELU: ``dq += (dN Z^T + dc k^T) phi'(q)`` and this tile's ``phi^T dN``,
    ``phi^T dc`` as partial sums of dZ, dk (summed by PyTorch: no atomics, deterministic); other
    maps: ``[dN | dc]`` is written out for PyTorch's autograd through ``phi``."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < L
    q = _load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :] * sqd, offs_m, offs_d, L, D, True, CHECK_D)
    do = _load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdol + offs_dv[None, :] * sdod, offs_m, offs_dv, L, DV,
               True, CHECK_DV)
    out = _load(OUT + b * sob + h * soh + offs_m[:, None] * sol + offs_dv[None, :] * sod, offs_m, offs_dv, L, DV,
                True, CHECK_DV)
    delta = tl.sum(do.to(tl.float32) * out.to(tl.float32), axis=1)
    tl.store(DELTA + bh * L + offs_m, delta, mask=row_ok)
    total = tl.load(T + bh * L + offs_m, mask=row_ok, other=float("-inf"))
    dead = total == float("-inf")  # no visible key and c = 0 (or a row past L)
    t = tl.where(dead, 0.0, total)  # p = 0 there already

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_base = MASK + b * smb + h * smh + offs_m[:, None] * sml
    full, hi = _key_ranges(m0, L, S, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_blocks(dq, q, do, t, delta, k_base, v_base, m_base, offs_m, offs_d, offs_dv, 0, full,
                    L, S, D, DV, skd, sks, svs, svd, sms, scale, False, CAUSAL, HAS_MASK, PRECISION, CHECK_D, CHECK_DV,
                    BLOCK_N)
    dq = _dq_blocks(dq, q, do, t, delta, k_base, v_base, m_base, offs_m, offs_d, offs_dv, full, hi,
                    L, S, D, DV, skd, sks, svs, svd, sms, scale, True, CAUSAL, HAS_MASK, PRECISION, CHECK_D, CHECK_DV,
                    BLOCK_N)
    dq = dq * scale

    beta = tl.where(dead, 0.0, tl.exp(tl.minimum(-t, max_exp)))
    d_num = do.to(tl.float32) * beta[:, None]
    if ELU:
        x = q.to(tl.float32) * sqrt_scale
        phi = tl.where(x > 0, x + 1.0, tl.exp(x))
        phi = tl.where(row_ok[:, None] & (offs_d[None, :] < D), phi, 0.0)
        hs = h // GS
        z = _load(Z + hs * szh + offs_d[:, None] * szr + offs_dv[None, :] * szd, offs_d, offs_dv, D, DV, CHECK_D, CHECK_DV)
        kv = tl.load(KV + hs * skvh + offs_d * skvr, mask=offs_d < D, other=0.0)
        c_raw = tl.sum(phi * kv[None, :], axis=1)
        d_den = tl.where(c_raw >= 0, -beta * delta, 0.0)
        d_phi = tl.dot(d_num, tl.trans(z), input_precision=PHI_PRECISION) + d_den[:, None] * kv[None, :]
        dq += d_phi * tl.where(x > 0, 1.0, tl.exp(x)) * sqrt_scale
        part = bh * tl.num_programs(0) + pid_m
        dz = tl.dot(tl.trans(phi), d_num, input_precision=PHI_PRECISION)  # [BLOCK_D, BLOCK_DV]
        tl.store(DZ_PART + part * BLOCK_D * BLOCK_DV + offs_d[:, None] * BLOCK_DV + offs_dv[None, :], dz)
        tl.store(DKV_PART + part * BLOCK_D + offs_d, tl.sum(phi * d_den[:, None], axis=0))
    else:
        st = STATS + b * sstb + h * ssth + offs_m * sstl
        c_raw = tl.load(st + DV * sstd, mask=row_ok, other=0.0)
        d_den = tl.where(c_raw >= 0, -beta * delta, 0.0)
        dst = DSTATS + (bh * L + offs_m) * (DV + 1)
        tl.store(dst[:, None] + offs_dv[None, :], d_num, mask=row_ok[:, None] & (offs_dv[None, :] < DV))
        tl.store(dst + DV, d_den, mask=row_ok)
    tl.store(DQ + bh * L * D + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dkdv_blocks(dk, dv, k_t, v, q_base, do_base, t_base, delta_base, m_head, offs_n, offs_d, offs_dv, lo, hi,
                 L, S, D, DV, sql, sqd, sdol, sdod, sml, sms, scale,
                 CHECKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                 CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """The query blocks [lo, hi) of one head against one key block. Rows past L load as 0 and add 0;
    keys past S only reach their own (unstored) rows of dk and dv."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < L
        q = _load(q_base + offs_m[:, None] * sql + offs_d[None, :] * sqd, offs_m, offs_d, L, D, True, CHECK_D)
        do = _load(do_base + offs_m[:, None] * sdol + offs_dv[None, :] * sdod, offs_m, offs_dv, L, DV, True, CHECK_DV)
        t = tl.load(t_base + offs_m, mask=row_ok, other=0.0)
        t = tl.where(t == float("-inf"), 0.0, t)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        s = _scores(q, k_t, m_head + offs_m[:, None] * sml + offs_n[None, :] * sms, offs_m, offs_n, L, S, scale,
                    CHECKED, CAUSAL, HAS_MASK, PRECISION)
        p = tl.exp(s - t[:, None])  # [BLOCK_M, BLOCK_N]
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q, K, V, MASK, DO, T, DELTA, DK, DV_OUT,
    sqb, sqh, sql, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
    smb, smh, sml, sms, sdob, sdoh, sdol, sdod,
    H, H_KV, G, L, S, D, DV, scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // H_KV
    hk = bhk % H_KV
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < S
    k_t = _load(K + b * skb + hk * skh + offs_d[:, None] * skd + offs_n[None, :] * sks, offs_d, offs_n, D, S,
                CHECK_D, True)
    v = _load(V + b * svb + hk * svh + offs_n[:, None] * svs + offs_dv[None, :] * svd, offs_n, offs_dv, S, DV,
              True, CHECK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    # Query blocks [lo, mid) see part of this key block (causal), [mid, L) all of it.
    lo = 0
    mid = 0
    if CAUSAL:
        lo = (tl.maximum(0, n0 - (S - L)) // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(tl.maximum(0, n0 + BLOCK_N - 1 - (S - L)), BLOCK_M) * BLOCK_M
        mid = tl.maximum(lo, tl.minimum(mid, tl.cdiv(L, BLOCK_M) * BLOCK_M))
    for g in range(0, G):
        h = hk * G + g
        bh = b * H + h
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        m_head = MASK + b * smb + h * smh
        dk, dv = _dkdv_blocks(dk, dv, k_t, v, q_base, do_base, T + bh * L, DELTA + bh * L, m_head, offs_n, offs_d,
                              offs_dv, lo, mid, L, S, D, DV, sql, sqd, sdol, sdod, sml, sms, scale,
                              True, CAUSAL, HAS_MASK, PRECISION, CHECK_D, CHECK_DV, BLOCK_M)
        dk, dv = _dkdv_blocks(dk, dv, k_t, v, q_base, do_base, T + bh * L, DELTA + bh * L, m_head, offs_n, offs_d,
                              offs_dv, mid, L, L, S, D, DV, sql, sqd, sdol, sdod, sml, sms, scale,
                              False, CAUSAL, HAS_MASK, PRECISION, CHECK_D, CHECK_DV, BLOCK_M)
    base = bhk * S
    tl.store(DK + (base + offs_n[:, None]) * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DV_OUT + (base + offs_n[:, None]) * DV + offs_dv[None, :], dv.to(DV_OUT.dtype.element_ty), mask=col_ok[:, None] & (offs_dv[None, :] < DV))


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _head_blocks(D: int, DV: int) -> dict:
    """Tile widths of the head dims, and whether loads must check them (D not a power of two)."""
    return dict(BLOCK_D=_block(D), BLOCK_DV=_block(DV), CHECK_D=_block(D) != D, CHECK_DV=_block(DV) != DV)


def _tiles(kernel: str, L: int, D: int, dtype: torch.dtype, capability: int = 90) -> dict:
    """Launch configuration of one kernel (``"forward"``, ``"dq"``, ``"dkdv"``): tile sizes, warps and
    pipeline stages; ``capability`` as 80 for sm_80. In half precision the forward (D = 64 and 128)
    and dk/dv (D = 64) take the best of an H200 sweep (benchmarks/results/triton-h200/sweep.json); the
    rest are sized to fit the shared memory of Hopper (227 KiB) and Ampere (163 KiB) blocks
    (tests/ops/test_triton_compile.py). Small tiles under the interpreter, so that tiny test shapes
    span several."""
    if kernel in TILES_OVERRIDE:
        return dict(TILES_OVERRIDE[kernel])
    if INTERPRETED:
        return dict(BLOCK_M=16, BLOCK_N=16)
    half, hopper = dtype != torch.float32, capability >= 90
    if kernel == "forward":
        if half:
            m, n, warps, stages = 128, (64 if D <= 64 or not hopper else 128), 8, (3 if hopper else 2)
        else:
            m, n, warps, stages = (64 if D <= 64 else 32), 32, (4 if D <= 64 else 8), 2
    elif kernel == "dq":
        m, n, warps, stages = (128, 32, 4, 3) if half and D <= 64 else ((64 if D <= 64 else 32), 32, 4, 2)
    else:
        m, n, warps, stages = (64, 64, 4, 3) if half and D <= 64 else (32, 64 if half or D <= 64 else 32, 4, 2)
    if L <= 16:  # a decode step: one query row
        m = 16
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)


def _capability(q: torch.Tensor) -> int:
    if q.device.type != "cuda":
        return 90  # the interpreter: tiles do not depend on it
    major, minor = torch.cuda.get_device_capability(q.device)
    return 10 * major + minor


def _mask_strides(mask, shape):
    if mask is None:
        return None, (0, 0, 0, 0)
    full = torch.broadcast_to(mask, shape)  # a view: broadcast dims get stride 0
    return full, full.stride()


def _precision(dtype: torch.dtype):
    return FLOAT32_PRECISION if dtype == torch.float32 else None


class _TritonNTK(torch.autograd.Function):
    """Inputs as ``ntk_attention`` checked them; ``z, kvec`` (ELU, in-kernel phi) or ``stats``."""

    @staticmethod
    def forward(ctx, q, k, v, z, kvec, stats, mask, causal, scale):
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
        cfg = _tiles("forward", L, D, q.dtype, _capability(q))
        with _tiles_must_fit(q):
            _forward_kernel[(triton.cdiv(L, cfg["BLOCK_M"]), B * H)](
                q, k, v, zz, kk, st, full_mask if full_mask is not None else q, out, total,
                *q.stride(), *k.stride(), *v.stride(),
                *(zz.stride() if elu else (0, 0, 0)), *(kk.stride() if elu else (0, 0)), *sts,
                *ms, *out.stride(),
                H, H // H_kv, H // (zz.shape[0] if elu else H), L, S, D, DV, scale, scale**0.5, max_exponent(torch.float32),
                CAUSAL=causal, HAS_MASK=full_mask is not None, ELU=elu, PRECISION=_precision(q.dtype),
                PHI_PRECISION=PHI_PRECISION, **_head_blocks(D, DV), **cfg,
            )
        ctx.causal, ctx.scale, ctx.elu = causal, scale, elu
        ctx.save_for_backward(q, k, v, z, kvec, stats, full_mask, out, total)
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, z, kvec, stats, full_mask, out, total = ctx.saved_tensors
        B, H, L, D = q.shape
        H_kv, S, DV = k.shape[1], k.shape[2], v.shape[-1]
        g = g.contiguous()
        # written with contiguous indexing, whatever the inputs' strides (a model's q is a transposed view)
        dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
        delta = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
        ms = full_mask.stride() if full_mask is not None else (0, 0, 0, 0)
        mask_arg = full_mask if full_mask is not None else q
        heads = _head_blocks(D, DV)
        common = dict(CAUSAL=ctx.causal, HAS_MASK=full_mask is not None, PRECISION=_precision(q.dtype), **heads)
        strides = (*q.stride(), *k.stride(), *v.stride(), *ms, *g.stride())
        cfg = _tiles("dq", L, D, q.dtype, _capability(q))
        grid_m = triton.cdiv(L, cfg["BLOCK_M"])
        if ctx.elu:
            zz, kk = z.float().contiguous(), kvec.float().contiguous()
            dz_part = torch.empty(B * H, grid_m, heads["BLOCK_D"], heads["BLOCK_DV"], device=q.device, dtype=torch.float32)
            dkv_part = torch.empty(B * H, grid_m, heads["BLOCK_D"], device=q.device, dtype=torch.float32)
            st, d_stats, sts = q, q, (0, 0, 0, 0)
            state_strides = (*zz.stride(), *kk.stride())
        else:
            zz = kk = dz_part = dkv_part = q
            st = stats.contiguous()
            d_stats = torch.empty(B, H, L, DV + 1, device=q.device, dtype=torch.float32)
            sts, state_strides = st.stride(), (0, 0, 0, 0, 0)
        with _tiles_must_fit(q):
            _dq_kernel[(grid_m, B * H)](
                q, k, v, mask_arg, g, out, total, delta, dq, zz, kk, st, dz_part, dkv_part, d_stats,
                *strides, *out.stride(), *state_strides, *sts,
                H, H // H_kv, H // (zz.shape[0] if ctx.elu else H), L, S, D, DV, ctx.scale, ctx.scale**0.5,
                max_exponent(torch.float32), ELU=ctx.elu, PHI_PRECISION=PHI_PRECISION, **common, **cfg)
        cfg = _tiles("dkdv", L, D, q.dtype, _capability(q))
        with _tiles_must_fit(q):
            _dkdv_kernel[(triton.cdiv(S, cfg["BLOCK_N"]), B * H_kv)](
                q, k, v, mask_arg, g, total, delta, dk, dv, *strides, H, H_kv, H // H_kv, L, S, D, DV, ctx.scale,
                **common, **cfg)
        dz = dkvec = None
        if ctx.elu:  # per query head, then summed over the heads that share a state
            H_state = z.shape[0]
            dz = dz_part.view(B, H, grid_m, *dz_part.shape[-2:]).sum((0, 2))[:, :D, :DV]
            dz = dz.view(H_state, H // H_state, D, DV).sum(1).to(z.dtype)
            dkvec = dkv_part.view(B, H, grid_m, -1).sum((0, 2))[:, :D].view(H_state, H // H_state, D).sum(1).to(kvec.dtype)
            d_stats = None
        return dq, dk, dv, dz, dkvec, d_stats, None, None, None


def triton_ntk_attention(q, k, v, z, kvec, fmap, causal: bool, mask, scale: float) -> torch.Tensor:
    """``ntk_attention`` on the Triton kernel; arguments already checked (``mask`` additive or None)."""
    from ..feature_maps import EluFeatureMap

    if type(fmap) is EluFeatureMap:  # phi computed in the kernel from the query tile
        return _TritonNTK.apply(q, k, v, z, kvec, None, mask, causal, scale)
    with torch.autocast(q.device.type, enabled=False):  # other maps: phi^T [Z | k] by PyTorch
        phi = fmap(q, scale)
        stats = phi @ repeat_kv(torch.cat([z, kvec.unsqueeze(-1)], dim=-1).to(phi.dtype), q.shape[1])
    return _TritonNTK.apply(q, k, v, None, None, stats.float(), mask, causal, scale)


@contextlib.contextmanager
def _tiles_must_fit(q: torch.Tensor):
    """Triton's out-of-shared-memory error at a launch, said in the library's terms."""
    try:
        yield
    except triton.runtime.errors.OutOfResources as e:  # a GPU with less shared memory than the tiles assume
        gpu = torch.cuda.get_device_name(q.device) if q.is_cuda else q.device
        raise RuntimeError(f"triton: the kernel's tiles do not fit this GPU ({gpu}, "
                           f"head dim {q.shape[-1]}, {q.dtype}): {e}. Use backend='auto' (PyTorch's fused kernels)."
                           ) from e
