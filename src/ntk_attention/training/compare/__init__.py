"""``ntk-attn compare``: methods x learning rates x seeds, with tables and plots.

For each variant (a method plus config fields) the first seed runs ``ntk-attn train`` with the
whole learning-rate grid, which picks the rate on the validation slice carved from the training
data; the other seeds rerun at that rate (each seed's validation score there is kept:
``validation_per_seed``). ``--jobs N`` bounds the train processes of the whole call: rows, and a row's
later seeds, run N at a time. The reported split (``--eval-data``) gives the mean and standard
deviation over seeds and chooses nothing. Every run is its own ``ntk-attn train``
process, so its train time and peak memory are its own, and a finished run is not run again:
rerun the same command to continue after an interruption.

The variant ``base`` (causal LM only) scores the untuned model once with ``ntk-attn eval --model``:
the baseline row. A variant ``ntk-from-p16=ntk:init_from=p16`` starts each seed's NTK run from the closed-form
conversion of the same seed's adapter of the prefix variant ``p16`` (listed earlier).

With ``--suite FILE`` the task, data, model, budget, variants, grids and seeds come from a suite file
(``benchmarks/suites/*.toml``, read by ``training/suite.py``); only where the runs go, how many run at a time,
``--seeds`` and ``--only LABEL ...`` may be set beside it. ``<out-dir>/suite.json`` then sums up
every suite result in ``<out-dir>``. Rows of an earlier ``<out-dir>/<name>.json`` that are still the
suite's variants are kept without their run folders (``resume.earlier_record``); a row measured at fewer
seeds than the suite now asks for keeps them and runs only the seeds it lacks (``resume.extend_seeds``).

Writes ``<out-dir>/<name>.json``, ``<name>.md`` and ``<name>-params.png`` / ``<name>-time.png``
(``--out-dir`` defaults to ``runs/results``, never the repository); the adapter of the best NTK
variant (first seed, by validation score) is copied to ``<out-dir>/<name>/ntk/``. A folder already
there is kept when it holds that same adapter and refused otherwise: compare deletes nothing it did
not write in the same call.

This module is the command (``add_arguments``, ``run``); its parts: ``variants`` (specs, checks, grids),
``runs`` (one process per seed, cached and checked), ``resume`` (rows kept from an earlier result),
``report`` (what it writes) and ``provenance`` (command, machine, versions).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import filelock

from ...cli import non_negative_int, positive_int
from .. import methods
from ..options import add_run_arguments, run_option_names
from .provenance import command_line, machine
from .report import reported_metric, write_results
from .resume import complete_row, earlier_record
from .runs import run_variant
from .variants import Variant, assign_grid, check_configs, check_starts, first_seed_only, parse_grid, parse_variant

# what may be given beside --suite (where runs go and how many at a time are compare's own options);
# every other train option is the suite file's
BESIDE_SUITE = ("threads",)
DEFAULT_VARIANTS = ["head", "ntk", "prefix-m16=prefix:num_virtual_tokens=16",
                    "prefix-m64=prefix:num_virtual_tokens=64", "lora", "full"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", default=None, metavar="FILE.toml",
                        help="a suite file (benchmarks/suites/): task, data, model, budget, variants, grids, seeds")
    parser.add_argument("--data-root", default=None,
                        help="with --suite: folder the suite's data paths are relative to "
                             "(default: $NTK_ATTN_DATA, else ../shared/data)")
    parser.add_argument("--only", nargs="+", default=None, metavar="LABEL",
                        help="with --suite: run only these variants of the suite")
    parser.add_argument("--name", default=None, help="result name: <out-dir>/<name>.json, .md, -*.png (default sst2-minilm)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="SPEC",
                        help="METHOD or LABEL=METHOD:KEY=VALUE:... (default: " + " ".join(DEFAULT_VARIANTS) + ")")
    parser.add_argument("--lr-grid", nargs="+", default=[], metavar="VARIANT=LR,LR",
                        help="learning rates per variant or method (defaults: " + "; ".join(
                            f"{m.name} {','.join(f'{x:g}' for x in m.learning_rate_grid)}" for m in methods.REGISTRY.values()) + ")")
    parser.add_argument("--seeds", type=non_negative_int, nargs="+", default=None, help="default: the suite's, else 0 1 2")
    parser.add_argument("--jobs", type=positive_int, default=1, help="train processes at a time: rows, and a row's seeds after its first, in parallel")
    parser.add_argument("--out-dir", default=os.path.join("runs", "results"),
                        help="where <name>.json, .md, -*.png and <name>/ntk/ go (default: %(default)s; the committed "
                             "results: benchmarks/results)")
    parser.add_argument("--work-dir", default=os.path.join("runs", "compare"), help="checkpoints and per-run results")
    parser.add_argument("--ntk-adapter-max-params", type=non_negative_int, default=None, metavar="N",
                        help="copy to <out-dir>/<name>/ntk/ the best NTK variant (on validation) among those with at "
                             "most N trainable parameters besides the head (default: any); a copy an earlier call made is "
                             "replaced, anything else there refused")
    parser.add_argument("--machine-note", default="", help="recorded with the results, e.g. 'shared 2-core CPU'")
    # Exactly train's options, forwarded to every run when given (train's defaults otherwise).
    add_run_arguments(parser)
    parser.set_defaults(**dict.fromkeys(run_option_names()))


@dataclass
class Plan:
    """What one call trains, and the rows its result holds (with a suite every variant of the suite,
    in the suite's order; the rows it does not train are kept from an earlier result)."""
    variants: list[Variant]
    rows: list[Variant]
    rows_grid: dict[str, list[float]]  # per label of ``rows``
    suite: dict | None = None  # the suite's record

    @property
    def grid(self) -> dict[str, list[float]]:
        return {v.label: self.rows_grid[v.label] for v in self.variants}


def plan(args) -> Plan:
    """The plan of a call: from ``--variants`` / ``--lr-grid``, or from ``--suite``."""
    if args.suite is not None:
        return apply_suite(args)
    for name in ("data_root", "only"):
        if getattr(args, name) is not None:
            raise ValueError(f"--{name.replace('_', '-')} needs --suite")
    args.name = args.name or "sst2-minilm"
    args.seeds = args.seeds if args.seeds is not None else [0, 1, 2]
    variants = [parse_variant(spec) for spec in args.variants or DEFAULT_VARIANTS]
    check_labels(variants, "--variants")
    return Plan(variants, variants, parse_grid(args.lr_grid, variants))


def check_labels(variants: list[Variant], source: str) -> None:
    if len({v.label for v in variants}) != len(variants):
        raise ValueError(f"{source}: labels must be unique, got {[v.label for v in variants]}")


def apply_suite(args) -> Plan:
    """Fill ``args`` from ``--suite`` (refusing what the suite fixes), write its data, and plan the call."""
    from ...tuners.config import resolve_reference
    from .. import suite as S

    fixed = ["name", "variants", "lr_grid", "ntk_adapter_max_params",
             *(name for name in run_option_names() if name not in BESIDE_SUITE)]
    given = [name for name in fixed if getattr(args, name, None) not in (None, [])]
    if given:
        raise ValueError(f"--suite {args.suite}: the suite file sets {', '.join('--' + n.replace('_', '-') for n in given)}; "
                         "edit the suite (or copy it) instead")
    suite = S.load_suite(args.suite)
    source = f"suite {args.suite}"
    # every variant of the suite as it runs: the main rows at every seed, the other points at the first
    rows = [first_seed_only(parse_variant(spec), suite.main_variants) for spec in suite.variants]
    check_labels(rows, f"{source} variants")
    unknown = sorted(set(args.only or []) - {v.label for v in rows})
    if unknown:
        raise ValueError(f"--only {unknown}: not variants of {args.suite} (it has {sorted(v.label for v in rows)})")
    rows_grid = assign_grid(suite.lr_grid.items(), rows, source=f"{source} [lr_grid]")
    variants = [v for v in rows if v.label in args.only] if args.only else rows
    args.name, args.task = suite.name, suite.task
    args.metric = "mcc" if suite.metric == "mcc" else None  # else train's default: accuracy, or the loss
    args.seeds = args.seeds if args.seeds is not None else suite.seeds
    args.model, args.gguf_file = resolve_reference(suite.model), suite.gguf_file
    args.ntk_adapter_max_params = suite.ntk_adapter_max_params
    for key, value in suite.budget.items():
        setattr(args, key, value)
    data_folder = os.path.join(args.work_dir, suite.name, "data")
    args.data, args.eval_data = S.prepare_data(suite, args.data_root or S.default_data_root(), data_folder)
    args.text_column = "text" if suite.task in ("classification", "language-modeling") else None
    args.text_pair_column = "text_pair" if "text_pair" in suite.data else None
    record = {"file": args.suite, "name": suite.name, "title": suite.title, "description": suite.description,
              "task": suite.task, "metric": suite.metric, "higher_is_better": suite.higher_is_better,
              "model": suite.model, "main_variants": suite.main_variants, "data": suite.data,
              "data_sha256": S.data_fingerprint([args.data, args.eval_data])}
    return Plan(variants, rows, rows_grid, record)


def run(args) -> int:
    # the command as given: apply_suite fills args with what the suite fixes, which may not be given beside it
    command = command_line(args)
    call = plan(args)
    # two calls on one result file would each write back only the rows they read at their start
    os.makedirs(args.out_dir, exist_ok=True)
    lock = filelock.FileLock(os.path.join(args.out_dir, f".{args.name}.json.lock"))
    try:
        held = lock.acquire(timeout=0)
    except filelock.Timeout:
        raise ValueError(f"{os.path.join(args.out_dir, args.name)}.json: another compare call is writing it; wait for "
                         "it to end or choose another --out-dir") from None
    with held:
        return compare_variants(args, call, command)


def compare_variants(args, call: Plan, command: str) -> int:
    """Train (or keep) every variant, choose on validation, and write ``<out-dir>/<name>.json`` and its report."""
    variants, grid, suite = call.variants, call.grid, call.suite
    check_starts(variants)
    check_configs(variants, args.task)
    if not args.seeds:
        raise ValueError("--seeds needs at least one seed")
    record = {"name": args.name, "command": command,
              "machine": {**machine(), "note": args.machine_note},
              "budget": {name: getattr(args, name) for name in run_option_names() if getattr(args, name, None) is not None},
              "seeds": args.seeds,
              # with a suite, every row's grid as the suite states it, the rows this call does not run included
              "lr_grid": call.rows_grid,
              "selection": "learning rate and best epoch on a validation slice of the training data (first seed); "
                           "dev mean/std over seeds at that rate; std is the sample std (n-1)"}
    if suite:
        record["suite"] = suite
    earlier, partial, earlier_best = earlier_record(args, record, call.rows, {v.label for v in variants}) \
        if suite else ({}, {}, None)
    start = time.perf_counter()
    args.train_slots = threading.BoundedSemaphore(args.jobs)  # --jobs bounds the train processes, not the rows
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {}
        for v in variants:
            if v.label in earlier:  # a kept row is done at once (a variant started from it waits on it)
                futures[v.label] = pool.submit(dict, earlier[v.label])
            elif v.label in partial:  # a kept row short of rates or seeds runs only those
                futures[v.label] = pool.submit(complete_row, args, v, partial[v.label], grid[v.label], futures)
            else:
                futures[v.label] = pool.submit(run_variant, args, v, grid[v.label], futures)
        measured_by = {"command": record["command"], "machine": record["machine"]}
        ran = {label: {**future.result(), "measured_by": measured_by} for label, future in futures.items()
               if label not in earlier}
    order = [v.label for v in call.rows]
    record["methods"] = {label: ran.get(label) or earlier[label] for label in order if label in ran or label in earlier}
    record["metric"], record["higher_is_better"] = reported_metric(record)
    record["wall_seconds"] = time.perf_counter() - start
    record["machine"]["load_average_at_end"] = os.getloadavg()
    write_results(args.out_dir, args.name, record, args.ntk_adapter_max_params, earlier_best)
    if suite:
        from ..suite import write_summary

        write_summary(args.out_dir)
    return 0
