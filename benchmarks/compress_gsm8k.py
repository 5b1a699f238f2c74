"""In-context examples compressed into (Z, k): how much of their gain survives?

SmolLM2-135M (local GGUF) on GSM8K: answer-token loss of test problems given (a) k worked examples in
front (``context_prefix``: the examples' exact keys and values, the same as writing them into the
prompt), (b) nothing, (c) the same examples compressed by ``compress_context`` into
``Z = sum phi(K) V^T``, ``k = sum phi(K)`` per layer and head. Reports the share of the in-context
gain that survives, ``(loss_none - loss_compressed) / (loss_none - loss_examples)``, and the numbers
each variant keeps (KV cache: 2 x layers x kv_heads x T x d; NTK state: layers x heads x (r d + r)).

    OMP_NUM_THREADS=1 python benchmarks/compress_gsm8k.py --shots 1 4 16 --test 16
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import torch

from ntk_attention import adapter_states
from ntk_attention.bench.generate import load_model
from ntk_attention.convert import compress_context, context_prefix
from ntk_attention.experiments.common import markdown_table, save_json, save_text
from ntk_attention.training.models import load_tokenizer

CALCULATOR = re.compile(r"<<[^>]*>>")


def read_jsonl(path: Path, count: int) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            if len(rows) == count:
                break
            row = json.loads(line)
            rows.append({"question": row["question"], "answer": CALCULATOR.sub("", row["answer"])})
    return rows


def worked_example(row: dict) -> str:
    return f"Question: {row['question']}\nAnswer: {row['answer']}\n\n"


def answer_loss(model, tokenizer, row: dict) -> float:
    """Mean negative log-likelihood of the answer tokens after ``Question: ...\\nAnswer:``."""
    head = tokenizer(f"Question: {row['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
    tail = tokenizer(" " + row["answer"], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([head + tail])
    labels = torch.tensor([[-100] * len(head) + tail])
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).loss.item()


def mean_loss(model, tokenizer, rows) -> float:
    return statistics.fmean(answer_loss(model, tokenizer, row) for row in rows)


def feature_options(spec: str) -> tuple[str, dict]:
    name, _, option = spec.partition(":")
    return name, ({"num_features": int(option)} if option else {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/gsm8k"))
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 4, 16], help="worked examples k in the context")
    parser.add_argument("--test", type=int, default=16, help="test problems scored")
    parser.add_argument("--feature-maps", nargs="+", default=["elu", "random:1024"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/theory/compress_gsm8k"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model(None, None, "cpu")
    folder = model.config._name_or_path
    tokenizer = load_tokenizer(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")
    cfg = model.config
    layers, heads, kv_heads = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // heads
    examples = read_jsonl(args.data / "train.jsonl", max(args.shots))
    tests = read_jsonl(args.data / "test.jsonl", args.test)
    start = time.perf_counter()
    none = mean_loss(model, tokenizer, tests)
    rows = [{"shots": 0, "variant": "none", "loss": none, "tokens": 0, "numbers": 0}]
    for k in args.shots:
        context = "".join(worked_example(r) for r in examples[:k])
        T = len(tokenizer(context)["input_ids"])
        full = mean_loss(context_prefix(model, tokenizer, context), tokenizer, tests)
        rows.append({"shots": k, "variant": "examples in the prompt", "loss": full, "tokens": T,
                     "numbers": 2 * layers * kv_heads * T * d, "gain_kept": 1.0})
        for spec in args.feature_maps:
            name, options = feature_options(spec)
            compressed = compress_context(model, tokenizer, context, feature_map=name, **options)
            r = adapter_states(compressed)[0].z.shape[1]
            loss = mean_loss(compressed, tokenizer, tests)
            rows.append({"shots": k, "variant": f"compressed, {spec}", "loss": loss, "tokens": T,
                         "numbers": layers * heads * (r * d + r),
                         "gain_kept": (none - loss) / (none - full) if none != full else float("nan")})
            del compressed
        print(rows[-1 - len(args.feature_maps):], flush=True)
    record = {"config": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
              "seconds": time.perf_counter() - start,
              "machine": "shared 2-core CPU machine, OMP_NUM_THREADS=1, float32 (GGUF Q4_1 de-quantised)"}
    save_json(args.out.with_suffix(".json"), record)
    table = markdown_table(["worked examples k", "variant", "answer-token loss", "context tokens T", "numbers kept",
                            "gain kept"],
                           [[r["shots"], r["variant"], r["loss"], r["tokens"], r["numbers"], r.get("gain_kept", "-")]
                            for r in rows])
    save_text(args.out.with_suffix(".md"), f"SmolLM2-135M-Instruct, GSM8K, {args.test} test problems.\n\n" + table)
    print(table)


if __name__ == "__main__":
    main()
