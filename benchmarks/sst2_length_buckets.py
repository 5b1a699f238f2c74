"""Dev accuracy by sentence length: where do trained SST-2 adapters lose?

SST-2's training rows are mostly short phrases, its dev rows full sentences. A prefix (real or
NTK) adds a fixed attention mass per query while the input's own mass ``sum_l e^{s_il}`` grows with
the length, so a prefix-style adapter may fade on long inputs where LoRA does not. This scores each
adapter folder (written by ``ntk-attn train``) on the evaluation file, split into length quartiles
(tokens, from the first adapter's tokenizer), and reports the token lengths of the training file.

    OMP_NUM_THREADS=1 python benchmarks/sst2_length_buckets.py \\
        --adapters ntk=RUNS/ntk/seed0/adapter lora=RUNS/lora/seed0/adapter ... \\
        --data ../shared/data/sst2/dev.tsv --train-data ../shared/data/sst2/train.tsv
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

import torch

from ntk_attention.experiments.common import markdown_table, save_json, save_text
from ntk_attention.training import data as D
from ntk_attention.training import models as M


def token_lengths(tokenizer, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, truncation=True, max_length=512)["input_ids"]]


def predictions(model, tokenizer, texts: list[str], batch_size: int = 64) -> list[int]:
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=512,
                              return_tensors="pt")
            out += model(**batch).logits.argmax(-1).tolist()
    return out


def bucket_edges(lengths: list[int], buckets: int) -> list[int]:
    """Upper edges of ``buckets`` groups of about equal size (the last edge is the maximum)."""
    cuts = statistics.quantiles(lengths, n=buckets, method="inclusive")
    return sorted({round(c) for c in cuts}) + [max(lengths)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", nargs="+", required=True, metavar="LABEL=FOLDER")
    parser.add_argument("--data", required=True, help="evaluation file (TSV/CSV/JSON lines with sentence, label)")
    parser.add_argument("--train-data", help="training file, for its length distribution")
    parser.add_argument("--buckets", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="sst2_length_buckets")
    args = parser.parse_args()
    folders = dict(spec.split("=", 1) for spec in args.adapters)
    for label, folder in folders.items():
        if not Path(folder).is_dir():
            raise SystemExit(f"--adapters {label}={folder}: not a folder")

    table = D.load_table(args.data)
    column = D.text_column(table, D.Columns(), args.data)
    texts, labels = list(table[column]), [int(label) for label in table["label"]]
    lengths = None
    command = shlex.join(["python", *sys.argv])
    rows, record = [], {"command": command, "data": args.data, "adapters": folders, "methods": {}}
    for label, folder in folders.items():
        model, tokenizer, run = M.load_trained(folder)
        if lengths is None:
            lengths = token_lengths(tokenizer, texts)
            edges = bucket_edges(lengths, args.buckets)
            groups = [[i for i, n in enumerate(lengths) if (edges[b - 1] if b else 0) < n <= edges[b]]
                      for b in range(len(edges))]
            if args.train_data:
                train = D.load_table(args.train_data)
                train_lengths = token_lengths(tokenizer, list(train[D.text_column(train, D.Columns(), args.train_data)]))
                record["train_length_median"] = statistics.median(train_lengths)
            record["eval_length_median"] = statistics.median(lengths)
            record["bucket_upper_edges"] = edges
        hits = [p == y for p, y in zip(predictions(model, tokenizer, texts), labels)]
        per_bucket = [sum(hits[i] for i in group) / len(group) for group in groups]
        record["methods"][label] = {"method": run["method"], "accuracy": sum(hits) / len(hits),
                                    "accuracy_per_bucket": per_bucket}
        print(label, f"{sum(hits) / len(hits):.3f}", [f"{a:.3f}" for a in per_bucket], flush=True)
    names = [f"tokens <= {edge} (n={len(group)})" for edge, group in zip(edges, groups)]
    for label, result in record["methods"].items():
        rows.append([label, f"{result['accuracy']:.3f}", *[f"{a:.3f}" for a in result["accuracy_per_bucket"]]])
    note = (f"Command: `{command}`\n\nDev accuracy by token length (median {record['eval_length_median']} tokens"
            + (f"; training rows: median {record['train_length_median']}" if args.train_data else "") + ").\n\n")
    out = Path(args.out)
    save_json(out / f"{args.name}.json", record)
    save_text(out / f"{args.name}.md", note + markdown_table(["adapter", "all", *names], rows))
    print(note + markdown_table(["adapter", "all", *names], rows))


if __name__ == "__main__":
    main()
