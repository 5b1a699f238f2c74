"""Fast paths beside the reference (``ops/naive.py``), chosen by ``ops.backends.select_backend``.

- ``torch_states.py``: one softmax attention state ``(O, lse)`` and its backward from PyTorch's fused
  kernels, or a chunked pure-PyTorch loop.
- ``torch_fused.py``: those states merged exactly with the NTK state (or a prefix) in log space.
- ``torch_decode.py``: a generation step on CPU (one query row, no gradient) in a few ops; where it
  can, one call of ``cpu_decode.cpp``, compiled on first use by ``cpu_kernel.py``.
- ``triton_ntk.py``: the whole of NTK-Attention in one Triton kernel (needs the ``triton`` extra).
"""
