"""The Triton kernels compile for NVIDIA GPUs, without a GPU.

The interpreter (test_triton.py) checks the arithmetic, but it runs the kernels as Python: a kernel
that the compiler refuses (a constexpr that is not one, shared memory past the chip's) passes there.
Here every kernel is compiled to machine code for Hopper (sm_90) and Ampere (sm_80) with Triton's
own ptxas, with the tiles the launcher picks there, bfloat16 and float32, head dims 64 and 128, and
their shared memory is checked against the chip's (a launch past it fails: seen on an H200).
"""

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'ntk-attention[triton]')")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ntk_attention.ops.fused import triton_ntk  # noqa: E402

if triton_ntk.INTERPRETED:
    pytest.skip("TRITON_INTERPRET=1: the kernels are interpreted in this process", allow_module_level=True)

FLOATS = {"scale", "sqrt_scale", "max_exp"}
FLOAT32_BUFFERS = {"Z", "KV", "STATS", "T", "DELTA", "DZ_PART", "DKV_PART", "DSTATS"}
TENSORS = {"Q", "K", "V", "MASK", "OUT", "DO", "DQ", "DK", "DV_OUT"}  # in the inputs' dtype
# Shared memory a block may use: 227 KiB on sm_90, 163 KiB on sm_80.
SHARED_LIMIT = {90: 232448, 80: 166912}


def compile_kernel(fn, dtype: torch.dtype, constexprs: dict, cfg: dict, capability: int):
    short = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in TENSORS:
            signature[name] = f"*{short}"
        elif name in FLOAT32_BUFFERS:
            signature[name] = "*fp32"
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
    source = ASTSource(fn, signature, constexprs={**constexprs, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]})
    options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


# The specializations that need the most shared memory (a mask and the ELU map in the kernel) on
# both architectures, and the statistics from PyTorch (other feature maps) once.
CASES = [(90, dtype, D, True) for dtype in (torch.bfloat16, torch.float32) for D in (64, 128)]
CASES += [(80, dtype, 128, True) for dtype in (torch.bfloat16, torch.float32)] + [(90, torch.bfloat16, 64, False)]


@pytest.mark.parametrize("capability,dtype,D,elu", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_kernels_compile_for_the_gpu(capability, dtype, D, elu):
    heads = triton_ntk._head_blocks(D, D)
    common = dict(CAUSAL=True, HAS_MASK=elu, PRECISION=triton_ntk._precision(dtype), **heads)
    with_map = dict(ELU=elu, PHI_PRECISION=triton_ntk.PHI_PRECISION)
    for name, fn, extra in (("forward", triton_ntk._forward_kernel, with_map), ("dq", triton_ntk._dq_kernel, with_map),
                            ("dkdv", triton_ntk._dkdv_kernel, {})):
        cfg = triton_ntk._tiles(name, 4096, D, dtype, capability)
        kernel = compile_kernel(fn, dtype, {**common, **extra}, cfg, capability)
        assert kernel.asm.get("cubin"), f"{name}: no machine code"
        assert kernel.metadata.shared <= SHARED_LIMIT[capability], (
            f"{name} {cfg}: {kernel.metadata.shared} bytes of shared memory, above sm_{capability}'s "
            f"{SHARED_LIMIT[capability]}")
