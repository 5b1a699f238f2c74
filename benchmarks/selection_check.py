"""Does the suite's selection rule keep NTK-Attention behind? Read from the committed suite results.

Every choice in the suite (learning rate, then the best NTK variant at or under LoRA r = 8's count) is
made on a validation slice of the training rows: accuracy or MCC on the classification tasks, the loss
on the causal-LM and language-modelling tasks (for the math tasks, loss over the whole answer, not the
exact match of its final number). Two questions, per task, with no training:

- ``rank_correlation``: over every trained row, Spearman's rank correlation between the validation
  score at the chosen rate and the reported mean (1: validation orders the rows as the reported metric
  does). Reported means of one-seed rows carry their seed's noise.
- ``chosen`` / ``best_reported``: the NTK row the suite chose on validation against the one a choice on
  the reported rows themselves would give (which the suite never does: it is an upper bound on what any
  validation rule could find among the rows that ran), each with its gap to LoRA r = 8.

    python benchmarks/selection_check.py [--results benchmarks/results/suite]
        [--out benchmarks/results/selection_check.json]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from ntk_attention.io import write_json, write_text
from ntk_attention.training.compare.report import validation_score
from ntk_attention.training.suite import ntk_against, suite_records


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    first, last = {}, {}
    for position, value in enumerate(sorted(values), start=1):
        first.setdefault(value, position)
        last[value] = position
    return [(first[value] + last[value]) / 2 for value in values]


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation; None for fewer than two rows or a side with one value only."""
    try:
        return statistics.correlation(ranks(x), ranks(y))
    except statistics.StatisticsError:
        return None


def check_task(record: dict) -> dict:
    suite = record["suite"]
    metric, higher_is_better = suite["metric"], suite["higher_is_better"]
    methods = record["methods"]
    trained = {label: m for label, m in methods.items() if m.get("validation_grid") and m.get("learning_rate")}

    def reported(m: dict) -> float:
        return m[f"dev_{metric}"] if higher_is_better else -m[f"dev_{metric}"]

    labels = sorted(trained)
    chosen = ntk_against(methods, higher_is_better, metric, "lora")
    best = ntk_against(methods, higher_is_better, metric, "lora", score=reported)
    for choice in (chosen, best):
        if choice:  # the best of several one-seed means is biased upwards: say how many seeds stand behind it
            choice["seeds"] = len(methods[choice["ntk"]]["seeds"])
    return {"metric": metric, "rows": len(labels),
            "rank_correlation": spearman([validation_score(trained[label]) for label in labels],
                                         [reported(trained[label]) for label in labels]),
            "chosen": chosen, "best_reported": best}


def markdown(results: dict, command: str) -> str:
    lines = ["# Does the validation rule choose the NTK row the reported metric would?", "",
             f"    {command}", "",
             "Spearman: over every trained row of the task, validation score at the chosen rate against the "
             "reported mean. Gaps to LoRA r = 8 (+: NTK ahead) for the NTK row chosen on validation and for "
             "the best NTK row on the reported metric itself (an upper bound; the suite never chooses so).", "",
             "| task | metric | rows | Spearman | chosen on validation | gap | best on the reported metric | gap |",
             "|---|---|---|---|---|---|---|---|"]

    def cells(choice: dict | None) -> str:
        if not choice:
            return " | "
        return f"{choice['ntk']} ({choice['seeds']} seed{'s' if choice['seeds'] > 1 else ''}) | {choice['difference']:+.3f}"

    for name, task in results.items():
        correlation = "n/a" if task["rank_correlation"] is None else f"{task['rank_correlation']:.2f}"
        lines.append(f"| {name} | {task['metric']} | {task['rows']} | {correlation} | "
                     f"{cells(task['chosen'])} | {cells(task['best_reported'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="benchmarks/results/suite", help="folder of the suite's task JSONs")
    parser.add_argument("--out", default=None, help="write the figures here (JSON) and beside it (.md)")
    args = parser.parse_args()

    results = {record["suite"]["name"]: check_task(record) for _, record in suite_records(args.results)}
    if not results:
        raise SystemExit(f"no suite results (task JSONs with a 'suite' field) in {args.results}")
    command = f"python benchmarks/selection_check.py --results {args.results}" + (f" --out {args.out}" if args.out else "")
    text = markdown(results, command)
    print(text)
    if args.out:
        write_json(args.out, {"command": command, "tasks": results})
        write_text(Path(args.out).with_suffix(".md"), text)


if __name__ == "__main__":
    main()
