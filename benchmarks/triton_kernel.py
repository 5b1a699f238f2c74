"""The Triton kernel on a GPU: exactness at full-size tiles, speed against SDPA, and a tile sweep.

For each dtype, head dim and length (causal, B = 1): forward and forward+backward time of
PyTorch's SDPA (its flash kernel in bf16/fp16, memory-efficient in float32), NTK-Attention on the
merged-state path (``backend="auto"``) and on the Triton kernel (``backend="triton"``), as medians of
``triton.testing.do_bench``. Before timing, the Triton result and its gradients are compared with the
merged-state path on the same inputs with a non-zero ``Z, k`` (relative error in the max norm).

``--sweep`` also times the Triton kernel under each tile configuration of ``SWEEP`` (forward alone
for the forward kernel's, forward+backward for the backward kernels'), to choose
``triton_ntk.TILES``.

    python benchmarks/triton_kernel.py --out runs/triton-kernel.json
    python benchmarks/triton_kernel.py --dtypes bfloat16 --head-dims 64 --lengths 4096 --sweep --out ...
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time

import torch
import triton
import triton.testing

from ntk_attention import get_feature_map, ntk_attention
from ntk_attention.ops.fused import triton_ntk

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, most promising first (the sweep has a time limit).
SWEEP = {
    "forward": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3),
                (128, 64, 4, 4), (128, 128, 8, 2), (64, 64, 4, 2)],
    "dq": [(128, 32, 4, 3), (128, 32, 4, 5), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 3)],
    "dkdv": [(32, 128, 4, 3), (32, 128, 4, 5), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3), (16, 128, 4, 3)],
}


def inputs(B, H, L, D, dtype, seed=0, state_scale=0.0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=dtype, generator=gen).requires_grad_() for _ in range(3))
    z = (torch.randn(H, D, D, device="cuda", generator=gen) * state_scale).requires_grad_()
    kvec = (torch.rand(H, D, device="cuda", generator=gen) * state_scale).requires_grad_()
    g = torch.randn(B, H, L, D, device="cuda", dtype=dtype, generator=gen)
    return q, k, v, z, kvec, g


def kernel(q, k, v, z, kvec):
    """The Triton path of ``ntk_attention(..., causal=True, backend="triton")`` (ELU map), called
    directly: the benchmark also measures the inputs the backend refuses."""
    return triton_ntk.triton_ntk_attention(q, k, v, z, kvec, get_feature_map("elu"), True, None, q.shape[-1] ** -0.5)


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def exactness(B, H, L, D, dtype):
    """Max-norm relative error of the Triton kernel against the merged-state path, value and grads.

    Calls the kernel below ``ntk_attention``'s backend choice, so that it also measures what
    ``backend="triton"`` refuses (half-precision gradients at D > 64 missed the reference once)."""
    q, k, v, z, kvec, g = inputs(B, H, L, D, dtype, seed=1, state_scale=0.3)
    errs = {}
    outs = {}
    for backend in ("auto", "triton"):
        out = kernel(q, k, v, z, kvec) if backend == "triton" else ntk_attention(q, k, v, z, kvec, causal=True)
        grads = torch.autograd.grad(out, (q, k, v, z, kvec), g)
        outs[backend] = (out, *grads)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dz", "dkvec"), outs["triton"], outs["auto"]):
        errs[name] = rel_err(a, b)
    return errs


def timed(fn, backward: bool, g):
    def run():
        out = fn()
        if backward:
            out.backward(g)
    return triton.testing.do_bench(run, warmup=10, rep=60, return_mode="median")


def methods(q, k, v, z, kvec):
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    auto = lambda: ntk_attention(q, k, v, z, kvec, causal=True)  # noqa: E731
    tri = lambda: kernel(q, k, v, z, kvec)  # noqa: E731
    return {"sdpa": sdpa, "ntk": auto, "ntk-triton": tri}


def sweep(record, row, tri, g, until):
    """Each kernel's configurations in turn, the others at their defaults; failures (shared memory,
    registers) are recorded, not raised."""
    for kernel, configs in SWEEP.items():
        for m, n, w, st in configs:
            if time.perf_counter() > until:
                return
            cfg = dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st)
            triton_ntk.TILES_OVERRIDE[kernel] = cfg
            t0 = time.perf_counter()
            try:
                ms, err = timed(tri, kernel != "forward", g), None
            except Exception as e:  # noqa: BLE001
                ms, err = None, f"{type(e).__name__}: {str(e)[:160]}"
            finally:
                triton_ntk.TILES_OVERRIDE.pop(kernel)
            entry = {k: row[k] for k in ("dtype", "D", "L")} | {"kernel": kernel, **cfg, "ms": ms, "error": err,
                                                                 "wall_s": round(time.perf_counter() - t0, 1)}
            record["sweep"].append(entry)
            print(f"  sweep {entry}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sweep", action="store_true", help="time the tile configurations of SWEEP (bfloat16 and float16 only)")
    p.add_argument("--sweep-seconds", type=float, default=120, help="stop sweeping after this long")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (the kernel's CPU tests run under Triton's interpreter: tests/ops/test_triton.py)")
    record = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(), "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
              "batch": args.batch, "heads": args.heads, "causal": True, "rows": [], "sweep": []}

    def save():
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, args.out)

    sweep_until = time.perf_counter() + args.sweep_seconds
    for dtype_name, D in itertools.product(args.dtypes, args.head_dims):
        dtype = getattr(torch, dtype_name)
        for L in (300, 1000):  # 300: where half-precision dk missed the reference at D = 128
            errs = exactness(1, 4, L, D, dtype)
            print(f"{dtype_name} D={D} exactness (L={L}, H=4) against the merged-state path:",
                  {k: f"{v:.1e}" for k, v in errs.items()}, flush=True)
            record.setdefault("exactness", []).append({"dtype": dtype_name, "D": D, "L": L, **errs})
        for L in args.lengths:
            q, k, v, z, kvec, g = inputs(args.batch, args.heads, L, D, dtype)
            row = {"dtype": dtype_name, "D": D, "L": L}
            for name, fn in methods(q, k, v, z, kvec).items():
                row[f"{name}_fwd_ms"] = timed(fn, False, g)
                row[f"{name}_fwdbwd_ms"] = timed(fn, True, g)
            for kind in ("fwd", "fwdbwd"):
                row[f"triton_over_sdpa_{kind}"] = row[f"ntk-triton_{kind}_ms"] / row[f"sdpa_{kind}_ms"]
                row[f"auto_over_sdpa_{kind}"] = row[f"ntk_{kind}_ms"] / row[f"sdpa_{kind}_ms"]
            record["rows"].append(row)
            print(f"{dtype_name} D={D} L={L}: " + "  ".join(
                f"{n} {row[f'{n}_fwd_ms']:.3f}/{row[f'{n}_fwdbwd_ms']:.3f} ms" for n in ("sdpa", "ntk", "ntk-triton"))
                + f"  triton/sdpa fwd {row['triton_over_sdpa_fwd']:.2f} fwd+bwd {row['triton_over_sdpa_fwdbwd']:.2f}",
                flush=True)
            save()
            if args.sweep and time.perf_counter() < sweep_until:
                sweep(record, row, methods(q, k, v, z, kvec)["ntk-triton"], g, sweep_until)
                save()
            del q, k, v, z, kvec, g
    save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
