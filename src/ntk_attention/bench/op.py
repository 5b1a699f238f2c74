"""``ntk-attn bench op``: forward+backward time and peak memory of the operator.

Compares NTK-Attention with plain SDPA (the floor: attention without any prefix), the naive
reference (``ops/naive.py``, the formula with the full score matrix) and exact prefix attention
with ``m`` prefix tokens. Timings are medians of interleaved repeats (every method runs once per
round, so a slow-down of the machine hits all of them alike). Peak memory: on CUDA the allocator's
peak; on CPU the growth of the resident set of a fresh process during one run (sampled).

    ntk-attn bench op                      # B=1, H=8, D=64, causal, float32, L up to 16k
    python -m ntk_attention.bench.op --lengths 1024 2048 --repeats 5

Rows: ``ntk`` is the default backend (``"auto"``: PyTorch's fused kernels merged with the NTK state);
on CUDA with triton installed ``ntk-triton`` is the one-kernel Triton path (``backend="triton"``) beside it.
Results go to ``runs/bench-op/`` unless ``--out-dir`` names a folder.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ntk_attention.io import save_figure, write_json, write_text
from ntk_attention.ops import backend_refusals, ntk_attention, prefix_attention, select_backend
from ntk_attention.ops.naive import ntk_attention_naive


def make_case(method: str, L: int, m: int, args) -> callable:
    """A zero-argument function that runs forward + backward once."""
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(args.device, dtype).requires_grad_()

    B, H, D = args.batch, args.heads, args.head_dim
    q, k, v = rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D)
    z = torch.zeros(H, D, D, device=args.device, requires_grad=True)
    kvec = torch.zeros(H, D, device=args.device, requires_grad=True)
    if method == "sdpa":
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    elif method == "ntk":
        fn = lambda: ntk_attention(q, k, v, z, kvec, causal=True)  # noqa: E731
    elif method == "ntk-triton":
        fn = lambda: ntk_attention(q, k, v, z, kvec, causal=True, backend="triton")  # noqa: E731
    elif method == "naive":
        fn = lambda: ntk_attention_naive(q, k, v, z, kvec, "elu", True, None)  # noqa: E731
    elif method == "prefix":
        pk, pv = rnd(H, m, D), rnd(H, m, D)
        fn = lambda: prefix_attention(q, k, v, pk, pv, causal=True)  # noqa: E731
    else:
        raise ValueError(f"unknown method {method!r}")

    def run():
        fn().sum().backward()
        if args.device == "cuda":
            torch.cuda.synchronize()

    return run


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_worker(method, L, m, args, queue):
    """Growth of the resident set during one run, sampled every 0.2 ms by a thread.

    ru_maxrss cannot serve: its high-water mark is set by the imports, above what a run adds.
    """
    import threading

    torch.set_num_threads(args.threads)
    run = make_case(method, L, m, args)
    base = peak = _current_rss_mb()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _current_rss_mb())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    run()
    done.set()
    sampler.join()
    queue.put(peak - base)


def peak_memory_mb(method: str, L: int, m: int, args) -> float:
    if args.device == "cuda":
        run = make_case(method, L, m, args)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        run()
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss_worker, args=(method, L, m, args, queue))
    proc.start()
    proc.join()
    return queue.get() if proc.exitcode == 0 else float("nan")


def _probe(args) -> torch.Tensor:
    return torch.empty(args.batch, args.heads, 2, args.head_dim, device=args.device, dtype=getattr(torch, args.dtype))


def ntk_backend(args) -> str:
    """The backend ``"auto"`` picks for the benchmark's inputs (recorded in the setup)."""
    return select_backend(_probe(args), _probe(args), needs_grad=True).name  # forward + backward


def triton_takes(args) -> bool:
    """Whether ``backend="triton"`` takes the benchmark's inputs (triton installed, a GPU, its dtypes)."""
    return backend_refusals(_probe(args), _probe(args), needs_grad=True)["triton"] is None


def cases_for_length(L: int, args) -> list[tuple[str, int]]:
    cases = [("sdpa", 0), ("ntk", 0)]
    if args.device == "cuda" and triton_takes(args):
        cases.append(("ntk-triton", 0))
    if L <= args.naive_max_length:
        cases.append(("naive", 0))
    for ratio in args.prefix_ratios:
        m = int(L * ratio)
        if m >= 1 and L * m <= args.prefix_max_work:
            cases.append(("prefix", m))
    return cases


def label(method: str, m: int, L: int) -> str:
    return f"prefix m={m / L:g}L" if method == "prefix" else method


def benchmark(args) -> dict:
    torch.set_num_threads(args.threads)
    rows = []
    for L in args.lengths:
        cases = cases_for_length(L, args)
        runs = {case: make_case(*case[:1], L, case[1], args) for case in cases}
        times = {case: [] for case in cases}
        for case in cases:  # warm-up
            runs[case]()
        for _ in range(args.repeats):
            for case in cases:
                t0 = time.perf_counter()
                runs[case]()
                times[case].append(time.perf_counter() - t0)
        del runs
        for method, m in cases:
            row = {
                "L": L, "method": method, "m": m, "label": label(method, m, L),
                "ms": 1000 * statistics.median(times[(method, m)]),
                "peak_mb": peak_memory_mb(method, L, m, args) if args.memory else None,
            }
            rows.append(row)
            print(f"L={L:>6} {row['label']:<18} {row['ms']:>10.1f} ms   peak {row['peak_mb'] if row['peak_mb'] is not None else float('nan'):>8.1f} MB", flush=True)
    return {"rows": rows, "ratios": ratios(rows), "setup": setup(args)}


def ratios(rows: list[dict]) -> dict:
    """Per length: time of each method over NTK-Attention's (and NTK over SDPA)."""
    out = {}
    for L in sorted({r["L"] for r in rows}):
        at = {r["label"]: r["ms"] for r in rows if r["L"] == L}
        out[str(L)] = {"ntk_over_sdpa": at["ntk"] / at["sdpa"]}
        out[str(L)].update({f"{name}_over_ntk": ms / at["ntk"] for name, ms in at.items() if name not in ("ntk", "sdpa")})
    return out


def setup(args) -> dict:
    info = {
        "command": (f"ntk-attn bench op --lengths {' '.join(map(str, args.lengths))} --device {args.device} "
                    f"--dtype {args.dtype} --threads {args.threads} --repeats {args.repeats}"),
        "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim, "dtype": args.dtype,
        "causal": True, "repeats": args.repeats, "threads": args.threads, "device": args.device,
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "processor": platform.processor(), "ntk_backend": ntk_backend(args),
    }
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def table(result: dict) -> str:
    rows = result["rows"]
    lengths = sorted({r["L"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    lines = ["| method | " + " | ".join(f"L={L}" for L in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for name in labels:
        cells = []
        for L in lengths:
            hit = [r for r in rows if r["L"] == L and r["label"] == name]
            if not hit:
                cells.append("-")
                continue
            r = hit[0]
            mem = f", {r['peak_mb']:.0f} MB" if r["peak_mb"] is not None else ""
            cells.append(f"{r['ms']:.0f} ms{mem}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["label"] for r in rows):
        pts = sorted((r["L"], r["ms"], r["peak_mb"]) for r in rows if r["label"] == name)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        if pts[0][2] is not None:
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=name)
    s = result["setup"]
    for ax, ylabel in zip(axes, ("forward+backward time (ms, median)", "peak memory (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"B={s['batch']} H={s['heads']} D={s['head_dim']} causal {s['dtype']} on {s['device']} "
                 f"({s.get('gpu', str(s['cpu_count']) + ' CPU cores')}, {s['threads']} threads)", fontsize=9)
    fig.tight_layout()
    save_figure(path, fig)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--prefix-ratios", type=float, nargs="+", default=[0.25, 1, 4, 16], help="prefix length m as a multiple of L")
    p.add_argument("--prefix-max-work", type=float, default=2048 * 2048 * 16, help="skip prefix cases with L*m above this")
    p.add_argument("--naive-max-length", type=int, default=4096, help="the naive reference builds L x L matrices")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    p.add_argument("--out-dir", "--out", dest="out", type=Path, default=Path("runs/bench-op"),
                   help="folder for the results (default runs/bench-op; nothing is written into the repository unless named)")
    p.add_argument("--name", default=None, help="file stem; default bench-op-<device>")


def run(args) -> int:
    result = benchmark(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"bench-op-{args.device}"
    write_json(args.out / f"{stem}.json", result)
    md = table(result)
    write_text(args.out / f"{stem}.md", f"Command: `{result['setup']['command']}`\n\n{md}\n")
    plot(result, args.out / f"{stem}.png")
    print("\n" + md)
    print("\nratios:", {L: {k: round(v, 2) for k, v in r.items()} for L, r in result["ratios"].items()})
    print(f"\nwrote {args.out / stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
