"""Which kernel computes the operator, and why the others refuse the inputs.

Backends (``"auto"`` tries all but ``"triton"``, in this order):

- ``"triton"`` (``fused/triton_ntk.py``): one kernel for softmax attention, the NTK term and their
  merge; asked for by name only (``backend="triton"``): on an H200 it was faster than the others in
  the float32 forward but slower in bfloat16 (benchmarks/results/triton-h200/). ``ntk_attention``
  only.
- ``"flash-cuda"``, ``"fused-cuda"``, ``"fused-cpu"`` (``fused/torch_states.py``): PyTorch's fused
  attention kernels for the softmax state, merged with the NTK state or a prefix in
  ``fused/torch_fused.py``. ``"fused"`` asks for whichever of these takes the inputs.
- ``"decode"`` (``fused/torch_decode.py``): a single query row without gradient on CPU (a
  generation step): one flash-kernel call and a few ops, where the overhead of the general path
  would dominate; without a mask, one call of a small compiled C++ kernel (``fused/cpu_decode.cpp``).
- ``"chunked"``: the same merge over a pure-PyTorch loop on key blocks; takes everything.

``select_backend`` returns the backend or, for an explicitly requested one that cannot take the
inputs, raises ``BackendRefused`` with the reason; ``backend_refusals`` lists every reason.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

import torch

from .fused.torch_states import Chunked, FlashCUDA, FusedCPU, FusedCUDA

TORCH_FUSED = (FlashCUDA(), FusedCUDA(), FusedCPU())
CHUNKED = Chunked()


class BackendRefused(ValueError):
    """An explicitly requested backend cannot take the inputs; the message says why."""


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


class Decode:
    """One query row, no gradient: the formula written out (``fused/torch_decode.py``)."""

    name = "decode"

    @staticmethod
    def refusal(q, k, *, dropout_p, has_mask, op, needs_grad) -> str | None:
        if op != "ntk":
            return "ntk_attention only"
        if needs_grad:
            return "inference only (no backward), and the inputs need gradients"
        if q.shape[-2] != 1:
            return f"a single query row (L = 1), got L = {q.shape[-2]}"
        if q.device.type != "cpu":
            return f"CPU only (on CUDA the fused kernels take a generation step), the inputs are on {q.device.type}"
        if q.dtype not in (torch.float32, torch.float64, torch.bfloat16):
            return f"{q.dtype} not supported (float32, float64, bfloat16)"
        if dropout_p > 0:
            return "no attention dropout"
        if q.shape[0] == 0 or k.shape[-2] == 0:
            return "an empty batch or sequence (B or S = 0)"
        return None


class Triton:
    """The fused Triton kernel; ``triton`` is imported only when it runs."""

    name = "triton"
    # Largest head dim the kernel keeps in one tile (q, k, v blocks live in registers / shared memory).
    max_head_dim = 256
    # Half-precision gradients passed the GPU tests up to this head dim (128 failed one shape).
    verified_half_grad_head_dim = 64

    @classmethod
    def refusal(cls, q, k, *, dropout_p, has_mask, op, needs_grad) -> str | None:
        if op != "ntk":
            return "only ntk_attention has a triton kernel (prefix_attention uses the torch kernels)"
        if not _triton_installed():
            return "triton is not installed (pip install 'ntk-attention[triton]')"
        if q.device.type == "cpu":
            # The kernels are interpreted or compiled when their module is imported.
            loaded = sys.modules.get("ntk_attention.ops.fused.triton_ntk")
            if loaded is not None and not loaded.INTERPRETED:
                return "not on CUDA, and the kernels were compiled for the GPU (set TRITON_INTERPRET=1 before first use)"
            if loaded is None and os.environ.get("TRITON_INTERPRET") != "1":
                return "not on CUDA and TRITON_INTERPRET unset (the interpreter runs it on CPU, for tests)"
        elif q.device.type != "cuda":
            return f"needs CUDA (or CPU under TRITON_INTERPRET=1), the inputs are on {q.device.type}"
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"{q.dtype} not supported (float32, float16, bfloat16)"
        if dropout_p > 0:
            return "no attention dropout in the triton kernel"
        if max(q.shape[-1], k.shape[-1]) > cls.max_head_dim:
            return f"head dim {q.shape[-1]} above {cls.max_head_dim}"
        if needs_grad and q.dtype != torch.float32 and q.shape[-1] > cls.verified_half_grad_head_dim:
            return (f"gradients in {q.dtype} at head dim {q.shape[-1]} (above {cls.verified_half_grad_head_dim}) are "
                    "refused: on an H200 the key gradient missed the reference in one tested shape "
                    "(benchmarks/results/triton-h200/tests.log); float32, or the forward alone, are exact there")
        if q.shape[0] == 0 or q.shape[-2] == 0 or k.shape[-2] == 0:
            return "an empty batch or sequence (B, L or S = 0)"
        return None


TRITON = Triton()
DECODE = Decode()
BACKENDS = {b.name: b for b in (TRITON, DECODE, *TORCH_FUSED, CHUNKED)}
BACKEND_NAMES = ("auto", "fused", *BACKENDS)


def backend_refusals(q, k, *, dropout_p: float = 0.0, has_mask: bool = False, op: str = "ntk",
                     needs_grad: bool = False) -> dict[str, str | None]:
    """Each backend's reason to refuse these inputs, or None where it takes them.

    ``has_mask``: an attention mask is given, or ``causal`` with ``L != S`` (which the torch kernels
    take only as a mask). ``op``: ``"ntk"`` or ``"prefix"``. ``needs_grad``: a backward will run.
    """
    args = dict(dropout_p=dropout_p, has_mask=has_mask, op=op, needs_grad=needs_grad)
    return {name: b.refusal(q, k, **args) for name, b in BACKENDS.items()}


def select_backend(q, k, *, backend: str | None = "auto", dropout_p: float = 0.0, has_mask: bool = False,
                   op: str = "ntk", needs_grad: bool = False):
    """The backend that will compute the call (an object with ``.name``).

    ``"auto"`` (or None): decode for a generation step on CPU, else the first torch fused kernel that takes them, else chunked. A named backend
    that refuses raises ``BackendRefused`` ("triton: torch.float64 not supported ...").
    """
    backend = "auto" if backend is None else backend
    args = dict(dropout_p=dropout_p, has_mask=has_mask, op=op, needs_grad=needs_grad)
    if backend == "auto":  # first taker, asked in order (this runs at every layer and token)
        return next(b for b in (DECODE, *TORCH_FUSED, CHUNKED) if b.refusal(q, k, **args) is None)
    if backend == "fused":
        reasons = {b.name: b.refusal(q, k, **args) for b in TORCH_FUSED}
        taken = [b for b in TORCH_FUSED if reasons[b.name] is None]
        if not taken:
            raise BackendRefused("fused: no torch fused kernel takes these inputs: "
                                 + "; ".join(f"{name}: {why}" for name, why in reasons.items()))
        return taken[0]
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {list(BACKEND_NAMES)}")
    reason = BACKENDS[backend].refusal(q, k, **args)
    if reason is not None:
        raise BackendRefused(f"{backend}: {reason}")
    return BACKENDS[backend]
