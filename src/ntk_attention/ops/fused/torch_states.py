"""Softmax attention that also returns its log-sum-exp, with an explicit backward.

An "attention state" is ``(O, lse)``: the normalised softmax output over some keys and the
log-sum-exp of its scores per query row. States over disjoint keys (the input, a prefix) and the
linear NTK state merge exactly (``torch_fused.py``). Each backend here computes one state and its
backward in O(L) memory:

- ``FusedCPU``: PyTorch's flash-attention kernel for CPU (private aten op).
- ``FusedCUDA``: PyTorch's memory-efficient CUDA kernel (private aten op).
- ``Chunked``: pure PyTorch, a loop over key blocks; used where the fused kernels are missing or
  refuse the inputs (dropout on CPU, unusual dtypes). It is also the readable version of the math.

Conventions: ``q [B,H,L,D]``, ``k [B,H,S,D]``, ``v [B,H,S,Dv]`` with the same head count (GQA is
expanded by the caller); ``mask`` additive float broadcastable to ``[B,H,L,S]`` or None; ``causal``
bottom-right aligned. ``lse`` is float32 (float64 for float64 inputs) and ``-inf`` for a row that
sees no key, whose ``O`` is 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..utils import causal_bias, compute_dtype


def _dead_rows(mask: torch.Tensor | None, shape) -> torch.Tensor | None:
    """Rows [B,H,L] that see no key at all under an additive mask (None without a mask)."""
    if mask is None:
        return None
    return torch.broadcast_to(~(mask > float("-inf")).any(-1), shape[:3])


class Chunked:
    """Online softmax over key blocks; backward recomputes each block (FlashAttention's scheme)."""

    name = "chunked"

    @staticmethod
    def refusal(q, k, *, dropout_p, has_mask, op, needs_grad) -> str | None:
        return None

    # Elements of one [B, H, L, block] score tile; bounds the extra memory whatever L and S are.
    tile_elements = 1 << 21

    def block_size(self, B, H, L, S) -> int:
        return max(16, min(S, self.tile_elements // max(1, B * H * L)))

    def _blocks(self, L, S, causal, B, H):
        """(index, key start, key stop, first query row that sees the block)."""
        blk = self.block_size(B, H, L, S)
        for index, start in enumerate(range(0, S, blk)):
            row0 = min(L, max(0, start - (S - L))) if causal else 0  # rows above see none of it
            yield index, start, min(S, start + blk), row0

    def _scores(self, q_rows, k_blk, mask, causal, start, row0, L, S, scale, dt):
        s = (q_rows @ k_blk.transpose(-1, -2)).to(dt).mul_(scale)
        stop = start + k_blk.shape[-2]
        if mask is not None:
            s = s + (mask[..., start:stop] if mask.shape[-2] == 1 else mask[..., row0:, start:stop]).to(dt)
        if causal:
            i = torch.arange(row0, L, device=s.device)[:, None]
            j = torch.arange(start, stop, device=s.device)[None, :]
            s.masked_fill_(j > i + (S - L), float("-inf"))
        return s

    def _keep(self, seed, block_index, shape, dropout_p, device):
        gen = torch.Generator(device=device).manual_seed(seed + block_index)
        return torch.rand(shape, generator=gen, device=device) >= dropout_p

    def forward(self, q, k, v, mask, causal, scale, dropout_p=0.0):
        B, H, L, _ = q.shape
        S = k.shape[-2]
        dt = compute_dtype(q)
        seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0 else 0
        m = torch.full((B, H, L, 1), float("-inf"), device=q.device, dtype=dt)
        denom = torch.zeros(B, H, L, 1, device=q.device, dtype=dt)
        acc = torch.zeros(B, H, L, v.shape[-1], device=q.device, dtype=dt)
        for index, start, stop, row0 in self._blocks(L, S, causal, B, H):
            if row0 == L:
                continue
            s = self._scores(q[..., row0:, :], k[..., start:stop, :], mask, causal, start, row0, L, S, scale, dt)
            m_old = m[..., row0:, :]
            m_new = torch.maximum(m_old, s.amax(-1, keepdim=True))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = s.sub_(m_safe).exp_()
            correction = torch.exp(m_old - m_safe)
            denom[..., row0:, :] = denom[..., row0:, :] * correction + p.sum(-1, keepdim=True)
            if dropout_p > 0:
                p = p * self._keep(seed, index, p.shape, dropout_p, q.device) / (1.0 - dropout_p)
            acc[..., row0:, :] = acc[..., row0:, :] * correction + p @ v[..., start:stop, :].to(dt)
            m[..., row0:, :] = m_new
        lse = (m + denom.log()).squeeze(-1)
        out = torch.where(denom > 0, acc / denom.clamp_min(torch.finfo(dt).tiny), torch.zeros_like(acc))
        return out.to(q.dtype), lse, seed

    def backward(self, grad_out, q, k, v, out, lse, mask, causal, scale, dropout_p, seed):
        B, H, L, _ = q.shape
        S = k.shape[-2]
        dt = compute_dtype(q)
        g = grad_out.to(dt)
        delta = (g * out.to(dt)).sum(-1, keepdim=True)  # D_i = g_i . out_i
        lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1)
        dq = torch.zeros(q.shape, device=q.device, dtype=dt)
        dk = torch.zeros(k.shape, device=q.device, dtype=dt)
        dv = torch.zeros(v.shape, device=q.device, dtype=dt)
        qc = q.to(dt)
        for index, start, stop, row0 in self._blocks(L, S, causal, B, H):
            if row0 == L:
                continue
            k_blk, v_blk, q_rows, g_rows = k[..., start:stop, :].to(dt), v[..., start:stop, :].to(dt), qc[..., row0:, :], g[..., row0:, :]
            p = self._scores(q_rows, k_blk, mask, causal, start, row0, L, S, scale, dt).sub_(lse_safe[..., row0:, :]).exp_()
            dp = g_rows @ v_blk.transpose(-1, -2)
            if dropout_p > 0:
                keep = self._keep(seed, index, p.shape, dropout_p, q.device) / (1.0 - dropout_p)
                dv[..., start:stop, :] = (p * keep).transpose(-1, -2) @ g_rows
                dp = dp * keep
            else:
                dv[..., start:stop, :] = p.transpose(-1, -2) @ g_rows
            ds = dp.sub_(delta[..., row0:, :]).mul_(p).mul_(scale)
            dq[..., row0:, :] += ds @ k_blk
            dk[..., start:stop, :] = ds.transpose(-1, -2) @ q_rows
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _empty(q, k) -> bool:
    return q.shape[0] == 0 or q.shape[-2] == 0 or k.shape[-2] == 0


class _Fused:
    """Shared handling for the fused kernels: mask building, equal head dims, rows that see nothing."""

    EMPTY = "an empty batch or sequence (B, L or S = 0) would crash the kernel (the CPU one with SIGFPE)"

    @staticmethod
    def _kernel_mask(q, k, mask, causal):
        """(additive mask in q's dtype or None, is_causal for the kernel, which is top-left aligned)."""
        L, S = q.shape[-2], k.shape[-2]
        kernel_causal = causal and mask is None and L == S
        if causal and not kernel_causal:
            cb = causal_bias(L, S, q.device, q.dtype)
            mask = cb if mask is None else mask + cb
        return (None if mask is None else mask.to(q.dtype)), kernel_causal

    @staticmethod
    def _pad_heads(q, k, v):
        # The kernels want one head dim: zero-padding q/k does not change scores, and zero-padding v
        # only adds output columns that are sliced off.
        D, Dv = q.shape[-1], v.shape[-1]
        if Dv > D:
            q, k = F.pad(q, (0, Dv - D)), F.pad(k, (0, Dv - D))
        elif D > Dv:
            v = F.pad(v, (0, D - Dv))
        return q, k, v

    def forward(self, q, k, v, mask, causal, scale, dropout_p=0.0):
        Dv = v.shape[-1]
        full_mask, kernel_causal = self._kernel_mask(q, k, mask, causal)
        out, kernel_lse, rng = self._kernel_forward(*self._pad_heads(q, k, v), full_mask, kernel_causal, scale, dropout_p)
        lse = kernel_lse[..., : q.shape[-2]].to(compute_dtype(q))
        dead = _dead_rows(full_mask, q.shape)
        if dead is not None:  # the kernels report lse = 0 (CPU) for rows that see nothing
            lse = lse.masked_fill(dead, float("-inf"))
            out = out.masked_fill(dead.unsqueeze(-1), 0.0)
        # The backward gets the kernel's own lse (its shape and its values for dead rows) and the
        # mask built here, rather than building it again.
        return out[..., :Dv], lse, (kernel_lse, rng, full_mask, kernel_causal)

    def backward(self, grad_out, q, k, v, out, lse, mask, causal, scale, dropout_p, saved):
        D, Dv = q.shape[-1], v.shape[-1]
        kernel_lse, rng, full_mask, kernel_causal = saved
        if D > Dv:
            grad_out, out = F.pad(grad_out, (0, D - Dv)), F.pad(out, (0, D - Dv))
        dq, dk, dv = self._kernel_backward(grad_out.contiguous(), *self._pad_heads(q, k, v), out.contiguous(),
                                           kernel_lse, full_mask, kernel_causal, scale, dropout_p, rng)
        return dq[..., :D], dk[..., :D], dv[..., :Dv]


class FusedCPU(_Fused):
    name = "fused-cpu"

    @classmethod
    def refusal(cls, q, k, *, dropout_p, has_mask, op, needs_grad) -> str | None:
        if q.device.type != "cpu":
            return f"a CPU kernel, the inputs are on {q.device.type}"
        if dropout_p > 0:
            return "no dropout in the CPU kernel"
        if q.dtype not in (torch.float32, torch.float64, torch.bfloat16):
            return f"{q.dtype} not supported (float32, float64, bfloat16)"
        return cls.EMPTY if _empty(q, k) else None

    def _kernel_forward(self, q, k, v, mask, causal, scale, dropout_p):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask, scale=scale
        )
        return out, lse, None

    def _kernel_backward(self, grad_out, q, k, v, out, lse, mask, causal, scale, dropout_p, rng):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale
        )


class FusedCUDA(_Fused):
    name = "fused-cuda"

    @classmethod
    def refusal(cls, q, k, *, dropout_p, has_mask, op, needs_grad) -> str | None:
        if q.device.type != "cuda":
            return f"a CUDA kernel, the inputs are on {q.device.type}"
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"{q.dtype} not supported (float32, float16, bfloat16)"
        return cls.EMPTY if _empty(q, k) else None

    @staticmethod
    def _aligned(mask, q, k):
        """The kernel wants a full-shape bias whose rows start 16-element aligned (as SDPA pads it)."""
        if mask is None:
            return None
        B, H, L, S = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        padded = torch.zeros(B, H, L, S + (-S) % 16, device=q.device, dtype=q.dtype)
        padded[..., :S] = mask
        return padded[..., :S]

    def _kernel_forward(self, q, k, v, mask, causal, scale, dropout_p):
        mask = self._aligned(mask, q, k)
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, mask, True, dropout_p, causal, scale=scale
        )
        return out, lse, (seed, offset)

    def _kernel_backward(self, grad_out, q, k, v, out, lse, mask, causal, scale, dropout_p, rng):
        mask = self._aligned(mask, q, k)
        # In half precision the kernel reads `out` in its own [B, L, H, D] memory layout (seen on
        # an H100, torch 2.11: a [B, H, L, D]-contiguous `out` gives garbage dq and dk).
        out = out.transpose(1, 2).contiguous().transpose(1, 2)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            grad_out, q, k, v, mask, out, lse, rng[0], rng[1], dropout_p, [True, True, True, False], causal, scale=scale,
        )
        return dq, dk, dv


class FlashCUDA(_Fused):
    """PyTorch's flash-attention CUDA kernel: half precision, no mask (the usual causal LM case)."""

    name = "flash-cuda"

    @classmethod
    def refusal(cls, q, k, *, dropout_p, has_mask, op, needs_grad) -> str | None:
        if q.device.type != "cuda":
            return f"a CUDA kernel, the inputs are on {q.device.type}"
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"{q.dtype} not supported (float16, bfloat16)"
        if has_mask:
            return "no attention mask (nor causal with L != S) in the flash kernel"
        if q.shape[-1] > 256:
            return f"head dim {q.shape[-1]} above 256"
        return cls.EMPTY if _empty(q, k) else None

    def _kernel_forward(self, q, k, v, mask, causal, scale, dropout_p):
        if mask is not None:
            raise ValueError("flash-cuda takes no attention mask; use fused-cuda or chunked")
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, dropout_p, causal, False, scale=scale
        )
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)

    def _kernel_backward(self, grad_out, q, k, v, out, lse, mask, causal, scale, dropout_p, rng):
        cum_q, cum_k, max_q, max_k, seed, offset = rng
        blhd = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731  the kernel's layout
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            blhd(grad_out), q, k, v, blhd(out), lse, cum_q, cum_k, max_q, max_k, dropout_p, causal, seed, offset, scale=scale
        )

