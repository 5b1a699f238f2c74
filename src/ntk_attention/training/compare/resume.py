"""Rows of an earlier result kept instead of trained again: which still stand for the suite as it is
(``earlier_record``), and the rates or seeds a kept row lacks, trained alone (``complete_row``)."""

from __future__ import annotations

import json
import os

from ..fit import selection_score
from ..options import parse_options
from .report import format_rates, missing_rates
from .runs import (SCORE_NAMES, chosen_validation, reported_scores, run_folder, seed_statistics, selection_metric,
                   summarize, train_seed, train_seeds)
from .variants import Variant, expected_seeds, variant_fields

# Budget entries that name where things are on one machine, or only change the speed: an earlier
# result measured under other values still stands.
LOCAL_BUDGET_KEYS = ("data", "eval_data", "model", "threads")


def earlier_record(args, record: dict, rows: list[Variant], running: set[str]
                   ) -> tuple[dict[str, dict], dict[str, dict], str | None]:
    """Rows of ``<out-dir>/<name>.json`` (an earlier call) that stand for ``rows``, the variants of the
    suite as it is now: the same suite, data, model and budget, and per row the same method, resolved fields, start,
    learning-rate grid and seeds. They are kept without training, so results outlive the work dir and
    ``--only`` updates rows instead of dropping the others. Rows that no longer match are dropped (and
    named). Rows of variants this call does not run (``running``) are kept at the seeds they had; a row
    it runs that has the suite's first seeds but not all is returned apart (``extend_seeds`` adds the
    rest). A row this call does not run whose grid the suite widened is kept at the rates it has (the
    report names the others). Also the earlier best NTK variant when its row is kept (its adapter copy is
    then still valid)."""
    path = os.path.join(args.out_dir, f"{args.name}.json")
    if not os.path.exists(path):
        return {}, {}, None
    try:
        with open(path) as handle:
            old = json.load(handle)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} cannot be read as an earlier result ({err}); move it away or choose another --out-dir") from None
    if not isinstance(old, dict) or not isinstance(old.get("methods"), dict):
        raise ValueError(f"{path} is not a compare result (no 'methods'); move it away or choose another --out-dir")
    suite_now, suite_then = record["suite"], old.get("suite") or {}
    differ = [f"{key} {suite_then.get(key)!r} (now {suite_now[key]!r})"
              for key in ("name", "task", "metric", "model", "data_sha256") if suite_then.get(key) != suite_now[key]]
    budget_now, budget_then = ({k: v for k, v in b.items() if k not in LOCAL_BUDGET_KEYS}
                               for b in (record["budget"], old.get("budget") or {}))
    if budget_then != budget_now:
        differ.append(f"budget {budget_then} (now {budget_now})")
    if differ:
        print(f"{path}: no row kept, another setting: " + ", ".join(differ), flush=True)
        return {}, {}, None
    by_label = {v.label: v for v in rows}
    grid = record["lr_grid"]
    kept, partial = {}, {}
    for label, row in old["methods"].items():
        variant = by_label.get(label)
        if variant is None:
            why = "no longer a variant of the suite"
        else:
            why = row_differs(row, variant, grid[label], args.seeds, args.task, check_seeds=label in running)
            if why and completable(row, variant, grid[label], args.seeds, args.task):
                # a row this call runs is completed; one it does not run stands at its rates until it is run
                then = "the rates and seeds it lacks run now" if label in running else \
                    f"the rates it lacks ({format_rates(missing_rates(row, grid[label]))}) wait for --only {label}"
                print(f"{path}: row {label!r} kept at seeds {row['seeds']} and rates {sorted(row['validation_grid'])}; "
                      + then, flush=True)
                (partial if label in running else kept)[label] = row
                continue
        if why:
            print(f"{path}: row {label!r} dropped: {why}", flush=True)
        else:
            kept[label] = row
    best = old.get("best_ntk_variant")
    return kept, partial, best if best in kept or best in partial else None


def row_differs(row: dict, variant: Variant, rates: list[float], seeds: list[int], task: str,
                check_seeds: bool = True) -> str | None:
    """Why an earlier result row is not ``variant`` as it runs now (None: it is). Without ``check_seeds``
    a row measured at other seeds still stands (for variants this call does not run)."""
    expected = {"method": variant.method, "init_from": variant.init_from, "seeds": expected_seeds(variant, seeds),
                "learning rates": sorted(rates)}
    found = {"method": row.get("method"), "init_from": row.get("init_from"), "seeds": row.get("seeds"),
             "learning rates": sorted(float(rate) for rate in row.get("validation_grid") or {})}
    if not check_seeds:
        del expected["seeds"], found["seeds"]
    fields = variant_fields(variant, task)
    if fields:  # a tuner: what it resolves to (defaults included) decides; the options typed may differ
        expected["fields"], found["fields"] = fields, row.get("method_fields")
    else:
        expected["config"], found["config"] = parse_options(variant.config), row.get("config")
    differ = [f"{key} {found[key]!r} (now {expected[key]!r})" for key in expected if found[key] != expected[key]]
    return ", ".join(differ) or None


def completable(row: dict, variant: Variant, rates: list[float], seeds: list[int], task: str) -> bool:
    """The row is ``variant`` at part of today's grid and seeds: its first seed trained some of ``rates``
    and none that ``rates`` lacks, and it holds the first of the seeds it should hold."""
    have, held, missing = row.get("validation_grid") or {}, row.get("seeds") or [], missing_rates(row, rates)
    trained = [rate for rate in rates if rate not in missing]
    return (0 < len(have) == len(trained) and 0 < len(held) and expected_seeds(variant, seeds)[:len(held)] == held
            and row_differs(row, variant, trained, seeds, task, check_seeds=False) is None)


def short_of_seeds(row: dict, variant: Variant, seeds: list[int]) -> bool:
    """The row holds the first of the seeds it should hold, not all of them."""
    have, wanted = row.get("seeds") or [], expected_seeds(variant, seeds)
    return 0 < len(have) < len(wanted) and wanted[:len(have)] == have


def complete_row(args, variant: Variant, row: dict, rates: list[float], started: dict) -> dict:
    """An earlier row that this call completes instead of training it again (its work dir may be gone):
    the rates a widened grid adds (``widen_grid``), then the seeds it lacks (``extend_seeds``)."""
    if variant.init_from:
        started[variant.init_from].result()  # as in run_variant: the start's adapters must exist
    if missing_rates(row, rates):
        row = widen_grid(args, variant, row, rates)
    return extend_seeds(args, variant, row) if short_of_seeds(row, variant, args.seeds) else row


def widen_grid(args, variant: Variant, row: dict, rates: list[float]) -> dict:
    """Train the row's first seed at the rates ``rates`` adds to its grid, in a folder of its own, and
    choose among old and new rates on validation as one run over ``rates`` would (a rate trains the same
    alone or after others). If an earlier rate still wins, the row stands, its grid widened; if a new one
    wins, its run is the first seed and the other seeds train at its rate (``earlier_rates`` keeps who
    measured the earlier rates)."""
    new_rates, seed = missing_rates(row, rates), row["seeds"][0]
    added = train_seed(args, variant, seed, new_rates, run_folder(args, variant.label, seed) + "-more-rates")
    metric = selection_metric(added)
    if row.get("selection_metric", metric) != metric:
        raise ValueError(f"{variant.label}: the earlier row chose its rate by {row['selection_metric']}, the new "
                         f"rates by {metric}: not comparable; drop the row from the result to train it again")
    scores = {float(rate): value for rate, value in row["validation_grid"].items()}
    scores.update({run["learning_rate"]: run["validation"].get(metric) for run in added["grid"]})
    # max keeps the first of equal scores: a tie goes to the earlier rate in the grid, as in train
    best = max(rates, key=lambda rate: selection_score(metric, scores[rate]))
    grid = {f"{rate:g}": scores[rate] for rate in rates}
    history = row.get("earlier_rates", []) + [{"rates": sorted(float(r) for r in row["validation_grid"]),
                                               "measured_by": row.get("measured_by")}]
    if best not in new_rates:
        kept = {key: value for key, value in row.items() if key != "measured_by"}
        return {**kept, "validation_grid": grid, "earlier_rates": history, "earlier_seeds": earlier_seeds(row)}
    others = train_seeds(args, variant, expected_seeds(variant, args.seeds)[1:], [best])
    return {**summarize(variant, [added] + others), "validation_grid": grid, "earlier_rates": history}


def extend_seeds(args, variant: Variant, row: dict) -> dict:
    """An earlier row measured at the suite's first seeds only: run the seeds it lacks at the rate its
    first seed chose and add them to it. The first seed's grid is not trained again (its work dir may be
    gone); the row lists which seeds earlier calls measured, with their commands (``earlier_seeds``)."""
    new = [seed for seed in expected_seeds(variant, args.seeds) if seed not in row["seeds"]]
    results = train_seeds(args, variant, new, [row["learning_rate"]])
    for seed, result in zip(new, results):
        if result["trainable_params"] != row["trainable_params"]:
            raise ValueError(f"{variant.label} seed {seed} trains {result['trainable_params']:,} parameters, the "
                             f"earlier row's seeds {row['seeds']} {row['trainable_params']:,}: not the same variant")
    merged = {key: value for key, value in row.items() if key != "measured_by"}
    for name in SCORE_NAMES:
        earlier = row.get(f"dev_{name}_per_seed")
        found = [reported_scores(result).get(name) for result in results]
        if earlier is None or None in found:
            for suffix in ("", "_std", "_per_seed", "_before"):
                merged.pop(f"dev_{name}{suffix}", None)  # a score the new seeds do not report is not averaged over some
            continue
        merged.update(seed_statistics(name, earlier + found))
    validation = earlier_validation(row)
    if validation is None:
        merged.pop("validation_per_seed", None)
    else:
        merged["validation_per_seed"] = validation + [chosen_validation(result) for result in results]
    seeds = row["seeds"] + new
    merged.update({
        "seeds": seeds,
        "best_epoch_per_seed": row.get("best_epoch_per_seed", []) + [result["best_epoch"] for result in results],
        "train_seconds": (row["train_seconds"] * len(row["seeds"]) + sum(r["train_seconds"] for r in results)) / len(seeds),
        "peak_rss_mb": max([row["peak_rss_mb"]] + [r["peak_rss_mb"] for r in results]),
        "earlier_seeds": earlier_seeds(row),
    })
    return merged


def earlier_validation(row: dict) -> list[float] | None:
    """Each of a row's seeds' validation score at its rate; a one-seed row written before rows kept them
    has it in its grid, an older row of several seeds has it for its first seed only (None)."""
    if "validation_per_seed" in row:
        return row["validation_per_seed"]
    return [row["validation_grid"][f"{row['learning_rate']:g}"]] if len(row["seeds"]) == 1 else None


def earlier_seeds(row: dict) -> list[dict]:
    """Which of a row's seeds each earlier call measured: the row's own list, then its newest seeds."""
    listed = row.get("earlier_seeds", [])
    done = {seed for entry in listed for seed in entry["seeds"]}
    newest = [seed for seed in row["seeds"] if seed not in done]
    return listed + ([{"seeds": newest, "measured_by": row.get("measured_by")}] if newest else [])
