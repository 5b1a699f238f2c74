"""Which kernel computes the operator, and why the others refuse the inputs.

Backends, in the order ``"auto"`` tries them:

- ``"triton"`` (``fused/triton_ntk.py``): one kernel for softmax attention, the NTK term and their
  merge; CUDA only in ``"auto"`` (on CPU tensors it runs only under Triton's interpreter,
  ``TRITON_INTERPRET=1``, for tests). ``ntk_attention`` only.
- ``"flash-cuda"``, ``"fused-cuda"``, ``"fused-cpu"`` (``fused/torch_states.py``): PyTorch's fused
  attention kernels for the softmax state, merged with the NTK state or a prefix in
  ``fused/torch_fused.py``. ``"fused"`` asks for whichever of these takes the inputs.
- ``"chunked"``: the same merge over a pure-PyTorch loop on key blocks; takes everything.

``select_backend`` returns the backend or, for an explicitly requested one that cannot take the
inputs, raises ``BackendRefused`` with the reason; ``backend_refusals`` lists every reason.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

from .fused.torch_states import Chunked, FlashCUDA, FusedCPU, FusedCUDA

TORCH_FUSED = (FlashCUDA(), FusedCUDA(), FusedCPU())
CHUNKED = Chunked()


class BackendRefused(ValueError):
    """An explicitly requested backend cannot take the inputs; the message says why."""


class Triton:
    """The fused Triton kernel; ``triton`` is imported only when it runs."""

    name = "triton"
    # Largest head dim the kernel keeps in one tile (q, k, v blocks live in registers / shared memory).
    max_head_dim = 256

    @classmethod
    def refusal(cls, q, k, dropout_p, has_mask, op="ntk") -> str | None:
        if op != "ntk":
            return "only ntk_attention has a triton kernel (prefix_attention uses the torch kernels)"
        if importlib.util.find_spec("triton") is None:
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
        if q.shape[0] == 0 or q.shape[-2] == 0 or k.shape[-2] == 0:
            return "an empty batch or sequence (B, L or S = 0)"
        return None


TRITON = Triton()
BACKENDS = {b.name: b for b in (TRITON, *TORCH_FUSED, CHUNKED)}
BACKEND_NAMES = ("auto", "fused", *BACKENDS)


def backend_refusals(q, k, *, dropout_p: float = 0.0, has_mask: bool = False, op: str = "ntk") -> dict[str, str | None]:
    """Each backend's reason to refuse these inputs, or None where it takes them.

    ``has_mask``: an attention mask is given, or ``causal`` with ``L != S`` (which the torch kernels
    take only as a mask). ``op``: ``"ntk"`` or ``"prefix"``.
    """
    out = {}
    for name, b in BACKENDS.items():
        out[name] = b.refusal(q, k, dropout_p, has_mask, op) if b is TRITON else b.refusal(q, k, dropout_p, has_mask)
    return out


def select_backend(q, k, *, backend: str | None = "auto", dropout_p: float = 0.0, has_mask: bool = False, op: str = "ntk"):
    """The backend that will compute the call (an object with ``.name``).

    ``"auto"`` (or None): triton on CUDA where it takes the inputs, else the first torch fused
    kernel that does, else chunked. A named backend that refuses raises ``BackendRefused``
    ("triton: float64 not supported ...").
    """
    backend = "auto" if backend is None else backend
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; expected one of {list(BACKEND_NAMES)}")
    reasons = backend_refusals(q, k, dropout_p=dropout_p, has_mask=has_mask, op=op)
    if backend == "auto":
        order = ([TRITON] if q.device.type == "cuda" else []) + [*TORCH_FUSED, CHUNKED]
        return next(b for b in order if reasons[b.name] is None)
    if backend == "fused":
        taken = [b for b in TORCH_FUSED if reasons[b.name] is None]
        if not taken:
            raise BackendRefused("fused: no torch fused kernel takes these inputs: "
                                 + "; ".join(f"{b.name}: {reasons[b.name]}" for b in TORCH_FUSED))
        return taken[0]
    if reasons[backend] is not None:
        raise BackendRefused(f"{backend}: {reasons[backend]}")
    return BACKENDS[backend]
