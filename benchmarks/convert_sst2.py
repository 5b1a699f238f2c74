"""A trained prefix adapter, converted to NTK-Attention in closed form with no training.

Loads a folder written by ``ntk-attn train --method prefix``, converts it with ``ntk_from_prefix`` for
each feature map, saves each conversion as an ``ntk-attn train``-style folder (so ``ntk-attn eval``
reads it) and scores the prefix adapter and every conversion on the evaluation data.

    OMP_NUM_THREADS=1 python benchmarks/convert_sst2.py --adapter runs/sst2-prefix/adapter \\
        --data ../shared/data/sst2/dev.tsv --feature-maps elu random:256 random:4096
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ntk_attention.convert import ntk_from_prefix
from ntk_attention.experiments.common import markdown_table, save_json, save_text
from ntk_attention.training import evaluate as E
from ntk_attention.training import models as M


def score(folder: Path, data: str, eval_size: int | None) -> dict:
    parser = argparse.ArgumentParser()
    E.add_arguments(parser)
    argv = ["--adapter", str(folder), "--data", data] + (["--eval-size", str(eval_size)] if eval_size else [])
    return E.evaluate(parser.parse_args(argv))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", type=Path, required=True, help="folder from ntk-attn train --method prefix")
    parser.add_argument("--data", default="../shared/data/sst2/dev.tsv")
    parser.add_argument("--eval-size", type=int, default=None)
    parser.add_argument("--feature-maps", nargs="+", default=["elu", "random:256", "random:4096"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/theory/convert_sst2"))
    args = parser.parse_args()
    prefix_model, _, run = M.load_trained(str(args.adapter))
    if run["method"] != "prefix":
        raise ValueError(f"{args.adapter} holds a {run['method']!r} run; convert a --method prefix run")
    rows = [{"model": "prefix adapter", **score(args.adapter, args.data, args.eval_size)}]
    for spec in args.feature_maps:
        name, _, option = spec.partition(":")
        ntk = ntk_from_prefix(prefix_model, feature_map=name, **({"num_features": int(option)} if option else {}))
        folder = args.out.parent / f"{args.out.name}-{spec.replace(':', '-')}"
        M.save_trained(ntk, "ntk", {**run, "method": "ntk"}, str(folder))
        rows.append({"model": f"closed form, {spec}", **score(folder, args.data, args.eval_size)})
    print(json.dumps(rows, indent=1))
    save_json(args.out.with_suffix(".json"), {"config": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
    save_text(args.out.with_suffix(".md"), markdown_table(
        ["model", "accuracy", "loss"], [[r["model"], r.get("eval_accuracy", r.get("accuracy")), r.get("eval_loss", r.get("loss"))]
                                        for r in rows]))


if __name__ == "__main__":
    main()
