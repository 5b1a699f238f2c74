"""The merged-state path: softmax states from ``torch_states.py`` merged exactly with the NTK state.

Softmax states ``(O_i, lse_i)`` over disjoint key sets and one linear state ``(N, c)`` (the NTK term,
``N = phi(q)^T Z``, ``c = phi(q)^T k >= 0``) combine as

    T = log(sum_i e^{lse_i} + c),   w_i = e^{lse_i - T},   beta = e^{-T}
    out = sum_i w_i O_i + beta N

Backward: the gradient reaching the scores of state i through both ``O_i`` and ``lse_i`` is the
standard attention backward called with ``grad_out = w_i g`` and the merged ``out``, since
``dL/ds_ij = w_i p_ij (g . v_j - g . out)``. The rest is ``dN = beta g``, ``dc = -beta (g . out)``,
computed here rather than by autograd through ``log c``, which is ``0 * inf = NaN`` at ``c = 0``
(the identity start).
"""

from __future__ import annotations

import torch

from ..utils import max_exponent


def merge_weights(lses: list[torch.Tensor], den: torch.Tensor | None):
    """Weights ``w_i`` of each softmax state and ``beta`` of the linear state, all [B, H, L, 1].

    The weights are exact whatever the size of the scores. ``beta`` is capped where the softmax
    part underflows and ``c = 0`` (rows masked with ``finfo.min``, as HF writes masks): there
    ``e^{-T}`` would be inf and ``inf * N`` NaN at ``N = 0``; with the cap a zero ``N`` adds 0 and a
    non-zero one a huge finite term, the size the formula asks for. (An absolute floor on the
    denominator would instead shrink rows whose scores are all below ``log(floor)``.)
    """
    total = lses[0]
    for lse in lses[1:]:
        total = torch.logaddexp(total, lse)
    if den is not None:
        total = torch.logaddexp(total, torch.log(den))  # log 0 = -inf is fine here
    dead = torch.isneginf(total)  # sees no key and c = 0: output 0, gradient 0
    weights = [torch.exp(lse - total).masked_fill(dead, 0).unsqueeze(-1) for lse in lses]
    beta = torch.exp((-total).clamp_max(max_exponent(total.dtype))).masked_fill(dead, 0).unsqueeze(-1)
    return weights, beta


class MergedAttention(torch.autograd.Function):
    """Softmax attention over ``(k, v)`` [and an unmasked ``(prefix_k, prefix_v)``] merged with the NTK term.

    Heads must already match (``k``, ``prefix_k`` expanded to ``[B, H, *, D]``). ``input_backend``
    and ``prefix_backend`` are the ``torch_states`` kernels chosen by ``ops.backends``. ``ntk_stats``
    ``[B,H,L,Dv+1]`` is ``phi(q)^T [Z | k]``, i.e. ``N`` and ``c`` in one tensor (one matmul), or
    None; ``c`` is clamped at 0 here. It is float32/float64: the NTK term is kept in full precision
    next to a bfloat16 input.
    """

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, ntk_stats, mask, causal, scale, dropout_p, input_backend, prefix_backend):
        states = [(input_backend, k, v, mask, causal, dropout_p)]
        if prefix_k is not None:
            states.append((prefix_backend, prefix_k, prefix_v, None, False, 0.0))
        outs, lses, rngs = [], [], []
        for b, kk, vv, mm, cc, dp in states:
            o, lse, rng = b.forward(q, kk, vv, mm, cc, scale, dp)
            outs.append(o)
            lses.append(lse)
            rngs.append(rng)
        num = den = None
        if ntk_stats is not None:
            num, den = ntk_stats[..., :-1], ntk_stats[..., -1].clamp_min(0)
        weights, beta = merge_weights(lses, den)
        acc = beta * num if num is not None else 0
        for w, o in zip(weights, outs):
            acc = torch.addcmul(acc, w, o) if torch.is_tensor(acc) else w * o
        out = acc.to(q.dtype)

        ctx.states = [(b, mm, cc, dp, rng) for (b, _, _, mm, cc, dp), rng in zip(states, rngs)]
        ctx.scale = scale
        ctx.has_prefix, ctx.has_linear = prefix_k is not None, num is not None
        kv = [t for (_, kk, vv, *_) in states for t in (kk, vv)]
        den_positive = ntk_stats[..., -1:] >= 0 if num is not None else None
        ctx.save_for_backward(q, out, beta, den_positive, *kv, *lses, *weights)
        return out

    @staticmethod
    def backward(ctx, g):
        q, out, beta, den_positive, *rest = ctx.saved_tensors
        n = len(ctx.states)
        kv, lses, weights = rest[: 2 * n], rest[2 * n: 3 * n], rest[3 * n:]
        dq = None
        grads_kv = []
        for i, (b, mask, causal, dropout_p, rng) in enumerate(ctx.states):
            gi = (weights[i] * g).to(q.dtype)
            dqi, dki, dvi = b.backward(gi, q, kv[2 * i], kv[2 * i + 1], out, lses[i], mask, causal, ctx.scale, dropout_p, rng)
            dq = dqi if dq is None else dq + dqi
            grads_kv += [dki, dvi]
        d_stats = None
        if ctx.has_linear:
            gf = g.to(beta.dtype)
            dden = -beta * torch.linalg.vecdot(gf, out.to(gf.dtype)).unsqueeze(-1)
            # where, not a product: dden overflows to inf in rows whose c is clamped (0 * inf = NaN)
            d_stats = torch.cat([beta * gf, torch.where(den_positive, dden, 0)], dim=-1)
        dk, dv = grads_kv[0], grads_kv[1]
        dpk, dpv = (grads_kv[2], grads_kv[3]) if ctx.has_prefix else (None, None)
        return dq, dk, dv, dpk, dpv, d_stats, None, None, None, None, None, None
