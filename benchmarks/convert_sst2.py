"""A trained prefix adapter, converted to NTK-Attention in closed form with no training.

Loads a folder written by ``ntk-attn train --method prefix``, converts it with ``ntk_from_prefix`` for
each feature map, saves each conversion as an ``ntk-attn train``-style folder (so ``ntk-attn eval``
reads it) and scores the prefix adapter and every conversion on the evaluation data; with
``--finetune-epochs`` each conversion is also fine-tuned briefly (AdamW, as ``ntk-attn train``) and
scored again.

    OMP_NUM_THREADS=1 python benchmarks/convert_sst2.py --adapter runs/sst2-prefix/adapter \\
        --data ../shared/data/sst2/dev.tsv --feature-maps elu taylor random:256 random:4096
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from ntk_attention.convert import ntk_from_prefix
from ntk_attention.experiments.common import markdown_table, save_json, save_text
from ntk_attention.training import data as D
from ntk_attention.training import evaluate as E
from ntk_attention.training import models as M
from ntk_attention.training.fit import FitSettings, make_trainer
from ntk_attention.training.train import encode


def score(folder: Path, data: str, eval_size: int | None) -> dict:
    parser = argparse.ArgumentParser()
    E.add_arguments(parser)
    argv = ["--adapter", str(folder), "--data", data] + (["--eval-size", str(eval_size)] if eval_size else [])
    return E.evaluate(parser.parse_args(argv))


def finetune(model, tokenizer, run: dict, args) -> None:
    """A short fine-tune of a converted adapter (and head) on HF Trainer, as ``ntk-attn train`` does."""
    table = D.load_table(args.finetune_data)
    table = table.select(range(min(args.finetune_size, len(table))))
    columns = D.Columns(label=run.get("label_column", "label"))
    encoded = encode(table, tokenizer, "classification", columns, run.get("max_length") or 128, args.finetune_data)
    with tempfile.TemporaryDirectory() as scratch:
        settings = FitSettings(output_dir=scratch, task="classification", learning_rate=args.finetune_lr,
                               head_learning_rate=1e-3, epochs=args.finetune_epochs)
        make_trainer(model, tokenizer, settings, run.get("head_modules", []), train_data=encoded).train()
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", type=Path, required=True, help="folder from ntk-attn train --method prefix")
    parser.add_argument("--data", default="../shared/data/sst2/dev.tsv")
    parser.add_argument("--eval-size", type=int, default=None)
    parser.add_argument("--feature-maps", nargs="+", default=["elu", "taylor", "random:256", "random:4096"],
                        help="elu, taylor[:degree], random:num_features")
    parser.add_argument("--finetune-epochs", type=float, default=0, help="also fine-tune each conversion (0: no)")
    parser.add_argument("--finetune-data", default=D.embedded_sst2("train"))
    parser.add_argument("--finetune-size", type=int, default=2000)
    parser.add_argument("--finetune-lr", type=float, default=0.03)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/theory/convert_sst2"))
    parser.add_argument("--adapters-dir", type=Path, default=Path("runs/theory-sst2-conversions"),
                        help="where the converted adapters are saved (large; not results)")
    args = parser.parse_args()
    prefix_model, tokenizer, run = M.load_trained(str(args.adapter))
    if run["method"] != "prefix":
        raise ValueError(f"{args.adapter} holds a {run['method']!r} run; convert a --method prefix run")
    rows = [{"variant": "prefix adapter", **score(args.adapter, args.data, args.eval_size)}]
    for spec in args.feature_maps:
        name, _, option = spec.partition(":")  # elu, taylor[:degree], random:num_features
        options = {({"taylor": "degree"}).get(name, "num_features"): int(option)} if option else {}
        ntk = ntk_from_prefix(prefix_model, feature_map=name, **options)
        folder = args.adapters_dir / f"{args.out.name}-{spec.replace(':', '-')}"
        M.save_trained(ntk, "ntk", {**run, "method": "ntk"}, str(folder))
        rows.append({"variant": f"closed form, {spec}", **score(folder, args.data, args.eval_size)})
        if args.finetune_epochs > 0:
            finetune(ntk, tokenizer, run, args)
            tuned = folder.parent / f"{folder.name}-finetuned"
            M.save_trained(ntk, "ntk", {**run, "method": "ntk"}, str(tuned))
            rows.append({"variant": f"closed form, {spec}, then {args.finetune_epochs:g} epoch(s) on "
                                    f"{args.finetune_size} rows", **score(tuned, args.data, args.eval_size)})
    print(json.dumps(rows, indent=1))
    save_json(args.out.with_suffix(".json"), {"config": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
    save_text(args.out.with_suffix(".md"), markdown_table(
        ["variant", "accuracy", "loss"], [[r["variant"], r.get("eval_accuracy", r.get("accuracy")), r.get("eval_loss", r.get("loss"))]
                                          for r in rows]))


if __name__ == "__main__":
    main()
