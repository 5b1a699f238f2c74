"""Validation loss after each epoch of the runs of one ``ntk-attn compare`` call, beside what the call
reported: does a method still gain from more epochs, and does the gap between two methods narrow?

Reads ``<work-dir>/<label>/seed<N>/checkpoints/lr-<rate>/checkpoint-*/trainer_state.json`` (the
Trainer's own log, one evaluation per epoch) for the learning rate each run chose, and the call's
``<name>.json`` for the reported scores. With ``--reference`` (a suite result of the same task at
its own budget) the same labels' reported means are listed beside them.

    python benchmarks/epoch_curves.py --work-dir WORK/NAME --result RESULTS/NAME.json \
        [--reference benchmarks/results/suite/TASK.json] --out OUT.json     # and OUT.md beside it
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ntk_attention.io import write_json, write_text


def last_trainer_state(rate_folder: Path) -> dict:
    """The trainer_state.json of the folder's last checkpoint (it holds the whole log)."""
    states = sorted(rate_folder.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    if not states:
        raise FileNotFoundError(f"{rate_folder}: no checkpoint-*/trainer_state.json (the run did not finish an epoch)")
    return json.loads(states[-1].read_text())


def epoch_losses(state: dict) -> list[float]:
    """Validation loss after each epoch, in order."""
    return [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry]


REPORTED = ("exact_match", "accuracy", "mcc", "perplexity", "loss")  # the first a call's rows report is shown


def curves(work_dir: Path, result: dict, reference: dict | None) -> dict:
    # a call without a suite names the loss as its metric even where the rows report exact match too
    metric = next(name for name in REPORTED if all(f"dev_{name}" in row for row in result["methods"].values()))
    rows = {}
    for label, row in result["methods"].items():
        seed, rate = row["seeds"][0], row["learning_rate"]
        state = last_trainer_state(work_dir / label / f"seed{seed}" / "checkpoints" / f"lr-{rate:g}")
        rows[label] = {"learning_rate": rate, "seed": seed, "trainable_params": row["trainable_params_excl_head"],
                       "validation_loss_per_epoch": epoch_losses(state), "best_epoch": row["best_epoch_per_seed"][0],
                       f"reported_{metric}": row[f"dev_{metric}"], "reported_loss": row.get("dev_loss")}
        if reference and label in reference["methods"]:
            earlier = reference["methods"][label]
            rows[label]["reference"] = {"epochs": reference["budget"]["epochs"], "learning_rate": earlier["learning_rate"],
                                        f"reported_{metric}_seed0": earlier[f"dev_{metric}_per_seed"][0],
                                        "reported_loss_seed0": (earlier.get("dev_loss_per_seed") or [None])[0],
                                        "validation_loss": earlier["validation_grid"][f"{earlier['learning_rate']:g}"]}
    return {"metric": metric, "epochs": result["budget"]["epochs"], "command": result["command"],
            "machine": result["machine"], "rows": rows}


def markdown(record: dict, command: str) -> str:
    metric, rows = record["metric"], record["rows"]
    epochs = max(len(row["validation_loss_per_epoch"]) for row in rows.values())
    head = ["variant", "params", "lr"] + [f"val loss ep {e}" for e in range(1, epochs + 1)] + [
        f"{metric} ({record['epochs']:g} ep)", "loss on the reported split"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in rows.items():
        losses = [f"{value:.3f}" for value in row["validation_loss_per_epoch"]]
        losses += [""] * (epochs - len(losses))
        reported = row["reported_loss"]
        lines.append("| " + " | ".join([label, f"{row['trainable_params']:,}", f"{row['learning_rate']:g}", *losses,
                                        f"{row[f'reported_{metric}']:.3f}", "" if reported is None else f"{reported:.3f}"]) + " |")
    out = ["Validation loss after each epoch (seed 0, the listed rate), and the reported scores at the best epoch.", "",
           *lines]
    references = {label: row["reference"] for label, row in rows.items() if "reference" in row}
    if references:
        out += ["", "The same variants in the suite (its own budget, seed 0):", "",
                f"| variant | epochs | lr | validation loss | {metric} | loss on the reported split |", "|---|---|---|---|---|---|"]
        for label, ref in references.items():
            loss = ref["reported_loss_seed0"]
            out.append(f"| {label} | {ref['epochs']:g} | {ref['learning_rate']:g} | {ref['validation_loss']:.3f} | "
                       f"{ref[f'reported_{metric}_seed0']:.3f} | {'' if loss is None else f'{loss:.3f}'} |")
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
