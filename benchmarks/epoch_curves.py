"""The validation score after each epoch of the runs of one ``ntk-attn compare`` call (the metric that
chose their rate and epoch: loss, accuracy or MCC), beside what the call reported: does a method still
gain from more epochs, and does the gap between two methods narrow?

Reads ``<work-dir>/<label>/seed<N>/checkpoints/lr-<rate>/checkpoint-*/trainer_state.json`` (the
Trainer's own log, one evaluation per epoch) for each seed at the row's learning rate, and the call's
``<name>.json`` for the reported scores. With ``--reference`` (a suite result of the same task at
its own budget) the same labels' reported scores per seed are listed beside them.

    python benchmarks/epoch_curves.py --work-dir WORK/NAME --result RESULTS/NAME.json \
        [--reference benchmarks/results/suite/TASK.json] --out OUT.json     # and OUT.md beside it
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ntk_attention.io import write_json, write_text
from ntk_attention.training.checkpoints import CHECKPOINT, checkpoint_folders
from ntk_attention.training.compare.report import row_selection_metric
from ntk_attention.training.fit import epoch_evaluations


def last_trainer_state(rate_folder: Path) -> dict:
    """The trainer_state.json of the folder's last checkpoint (it holds the whole log)."""
    folders = checkpoint_folders(str(rate_folder))
    if not folders:
        raise FileNotFoundError(f"{rate_folder}: no checkpoint-*/trainer_state.json (the run did not finish an epoch)")
    last = max(folders, key=lambda folder: int(CHECKPOINT.match(Path(folder).name)[1]))
    return json.loads((Path(last) / "trainer_state.json").read_text())


def validation_curve(rate_folder: Path, metric: str) -> list[float]:
    """The validation ``metric`` after each epoch of the run in ``rate_folder``."""
    return [scores[metric] for scores in epoch_evaluations(last_trainer_state(rate_folder)["log_history"], metric)]


REPORTED = ("exact_match", "accuracy", "mcc", "perplexity", "loss")  # the first a call's rows report is shown


def curves(work_dir: Path, result: dict, reference: dict | None) -> dict:
    # a call without a suite names the loss as its metric even where the rows report exact match too
    metric = next(name for name in REPORTED if all(f"dev_{name}" in row for row in result["methods"].values()))
    selections = {row_selection_metric(row) for row in result["methods"].values()}
    if len(selections) != 1:
        raise ValueError(f"the rows chose their epochs by different metrics ({', '.join(sorted(selections))})")
    selection = selections.pop()
    rows = {}
    for label, row in result["methods"].items():
        rate = row["learning_rate"]
        folders = [work_dir / label / f"seed{seed}" / "checkpoints" / f"lr-{rate:g}" for seed in row["seeds"]]
        rows[label] = {"learning_rate": rate, "seeds": row["seeds"], "trainable_params": row["trainable_params_excl_head"],
                       "validation_per_epoch": [validation_curve(folder, selection) for folder in folders],
                       "best_epoch_per_seed": row["best_epoch_per_seed"],
                       f"reported_{metric}_per_seed": row[f"dev_{metric}_per_seed"],
                       "reported_loss_per_seed": row.get("dev_loss_per_seed")}
        if reference and label in reference["methods"]:
            earlier = reference["methods"][label]
            rows[label]["reference"] = {"epochs": reference["budget"]["epochs"], "learning_rate": earlier["learning_rate"],
                                        "seeds": earlier["seeds"], f"reported_{metric}_per_seed": earlier[f"dev_{metric}_per_seed"],
                                        "reported_loss_per_seed": earlier.get("dev_loss_per_seed"),
                                        "validation_seed0": earlier["validation_grid"][f"{earlier['learning_rate']:g}"]}
    return {"metric": metric, "selection_metric": selection, "epochs": result["budget"]["epochs"], "command": result["command"],
            "machine": result["machine"], "rows": rows}


def markdown(record: dict, command: str) -> str:
    metric, selection, rows = record["metric"], record["selection_metric"], record["rows"]
    epochs = max(len(curve) for row in rows.values() for curve in row["validation_per_epoch"])
    head = ["variant", "seed", "params", "lr"] + [f"val {selection} ep {e}" for e in range(1, epochs + 1)] + [
        "best epoch", f"{metric} ({record['epochs']:g} ep)", "loss on the reported split"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in rows.items():
        for i, seed in enumerate(row["seeds"]):
            curve = [f"{value:.3f}" for value in row["validation_per_epoch"][i]]
            curve += [""] * (epochs - len(curve))
            reported = (row["reported_loss_per_seed"] or [None] * len(row["seeds"]))[i]
            lines.append("| " + " | ".join([label, str(seed), f"{row['trainable_params']:,}", f"{row['learning_rate']:g}",
                                            *curve, f"{row['best_epoch_per_seed'][i]:g}",
                                            f"{row[f'reported_{metric}_per_seed'][i]:.3f}",
                                            "" if reported is None else f"{reported:.3f}"]) + " |")
    out = [f"Validation {selection} after each epoch (the listed rate), and the reported scores at the best epoch.", "",
           *lines]
    references = {label: row["reference"] for label, row in rows.items() if "reference" in row}
    if references:
        out += ["", f"The same variants in the suite (its own budget; the validation {selection} of its first seed):", "",
                f"| variant | epochs | lr | validation {selection} | {metric} per seed | loss on the reported split per seed |",
                "|---|---|---|---|---|---|"]
        for label, ref in references.items():
            scores = " / ".join(f"{value:.3f}" for value in ref[f"reported_{metric}_per_seed"])
            losses = " / ".join(f"{value:.3f}" for value in ref["reported_loss_per_seed"] or [])
            out.append(f"| {label} | {ref['epochs']:g} | {ref['learning_rate']:g} | {ref['validation_seed0']:.3f} | "
                       f"{scores} | {losses} |")
    out += ["", f"Runs: `{record['command']}`", "", f"Table: `{command}`", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", required=True, type=Path, help="the compare call's <work-dir>/<name>")
    parser.add_argument("--result", required=True, type=Path, help="the compare call's <name>.json")
    parser.add_argument("--reference", type=Path, help="a suite result of the same task (its own budget)")
    parser.add_argument("--out", required=True, type=Path, help="JSON to write; the Markdown goes beside it")
    args = parser.parse_args(argv)
    result = json.loads(args.result.read_text())
    reference = json.loads(args.reference.read_text()) if args.reference else None
    record = curves(args.work_dir, result, reference)
    command = "python benchmarks/epoch_curves.py " + " ".join(
        f"--{name.replace('_', '-')} {value}" for name, value in vars(args).items() if value is not None)
    write_json(str(args.out), record)
    write_text(str(args.out.with_suffix(".md")), markdown(record, command))
    print(markdown(record, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
