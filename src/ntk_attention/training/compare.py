"""``ntk-attn compare``: methods x learning rates x seeds, with tables and plots.

For each variant (a method plus config fields) the first seed runs ``ntk-attn train`` with the
whole learning-rate grid, which picks the rate on the validation slice carved from the training
data; the other seeds rerun at that rate. The reported split (``--eval-data``) gives the mean and
standard deviation over seeds and chooses nothing. Every run is its own ``ntk-attn train``
process, so its train time and peak memory are its own, and a finished run is not run again:
rerun the same command to continue after an interruption.

The variant ``base`` (causal LM only) scores the untuned model once with ``ntk-attn eval --model``:
the baseline row. A variant ``ntk-from-p16=ntk:init_from=p16`` starts each seed's NTK run from the closed-form
conversion of the same seed's adapter of the prefix variant ``p16`` (listed earlier).

With ``--suite FILE`` the task, data, model, budget, variants, grids and seeds come from a suite file
(``benchmarks/suites/*.toml``, read by ``suite.py``); only where the runs go, how many run at a time,
``--seeds`` and ``--only LABEL ...`` may be set beside it. ``<out-dir>/suite.json`` then sums up
every suite result in ``<out-dir>``. Rows of an earlier ``<out-dir>/<name>.json`` that are still the
suite's variants are kept without their run folders (``earlier_record``); a row measured at fewer
seeds than the suite now asks for keeps them and runs only the seeds it lacks (``extend_seeds``).

Writes ``<out-dir>/<name>.json``, ``<name>.md`` and ``<name>-params.png`` / ``<name>-time.png``
(``--out-dir`` defaults to ``runs/results``, never the repository); the adapter of the best NTK
variant (first seed, by validation score) is copied to ``<out-dir>/<name>/ntk/``. A folder already
there is kept when it holds that same adapter and refused otherwise: compare deletes nothing it did
not write in the same call.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import filelock

from ..cli import non_negative_int, positive_int
from ..io import save_figure, write_json, write_text
from . import methods
from .fit import selection_score
from .options import add_run_arguments, forwarded_options, parse_options, run_option_names
from .plots import draw_methods

BASE = "base"  # the untuned model, scored but not trained
VARIANT_METHODS = methods.NAMES + (BASE,)
# what may be given beside --suite (where runs go and how many at a time are compare's own options);
# every other train option is the suite file's
BESIDE_SUITE = ("threads",)
SCORE_NAMES = ("accuracy", "mcc", "perplexity", "exact_match", "loss")
# Budget entries that name where things are on one machine, or only change the speed: an earlier
# result measured under other values still stands.
LOCAL_BUDGET_KEYS = ("data", "eval_data", "model", "threads")
DEFAULT_VARIANTS = ["head", "ntk", "prefix-m16=prefix:num_virtual_tokens=16",
                    "prefix-m64=prefix:num_virtual_tokens=64", "lora", "full"]


@dataclass
class Variant:
    label: str
    method: str
    config: list[str] = field(default_factory=list)
    init_from: str | None = None  # label of a prefix variant whose adapters start this NTK variant
    seeds: int | None = None  # run only the first N of --seeds (None: all)


VARIANT_KEYS = ("init_from", "seeds")  # keys of a variant spec that are compare's own, not config fields


def parse_variant(spec: str) -> Variant:
    """``METHOD`` or ``LABEL=METHOD:KEY=VALUE:KEY=VALUE`` (e.g. ``prefix-m64=prefix:num_virtual_tokens=64``).
    Two keys are not config fields: ``init_from=LABEL`` names the prefix variant an NTK variant starts
    from, ``seeds=N`` runs only the first N seeds."""
    label, sep, rest = spec.partition("=")
    if not sep:
        label, rest = spec, spec
    elif ":" in label:
        raise ValueError(f"--variants {spec!r}: a spec with keys needs a label first, LABEL=METHOD:KEY=VALUE "
                         f"(e.g. {label.split(':')[0]}={spec})")
    method, *items = rest.split(":")
    if method not in VARIANT_METHODS:
        raise ValueError(f"--variants {spec!r}: unknown method {method!r}; expected one of {VARIANT_METHODS}")
    if not label or "/" in label:
        raise ValueError(f"--variants {spec!r}: the label must be a plain name")
    own = dict(item.split("=", 1) for item in items if item.partition("=")[0] in VARIANT_KEYS)
    config = [item for item in items if item.partition("=")[0] not in VARIANT_KEYS]
    if method == BASE and (config or own):
        raise ValueError(f"--variants {spec!r}: the untuned base takes no config")
    if "init_from" in own and method != "ntk":
        raise ValueError(f"--variants {spec!r}: init_from starts an ntk variant from a prefix variant")
    seeds = own.get("seeds")
    if seeds is not None and not (seeds.isdigit() and int(seeds) >= 1):
        raise ValueError(f"--variants {spec!r}: seeds must be a count >= 1")
    return Variant(label, method, config, own.get("init_from"), int(seeds) if seeds else None)


def check_starts(variants: list[Variant]) -> None:
    """Each ``init_from`` names a prefix variant listed before it (so it is trained first)."""
    seen = {}
    for variant in variants:
        if variant.init_from is not None and seen.get(variant.init_from) != "prefix":
            raise ValueError(f"--variants: {variant.label!r} starts from {variant.init_from!r}, which must be a "
                             f"prefix variant listed before it")
        seen[variant.label] = variant.method


def check_configs(variants: list[Variant], task: str) -> None:
    """Every variant's config builds before the first run starts: a stale or misspelt field fails here,
    naming the variant, not hours later in the run that uses it."""
    # Without --task (or with auto) the task comes from the data's columns in each run; only the fields are checked here.
    task = "classification" if task in (None, "auto") else task
    for variant in variants:
        if variant.method == BASE:
            continue
        try:
            methods.method_config(variant.method, task, parse_options(variant.config))
        except (TypeError, ValueError) as err:
            raise ValueError(f"--variants {variant.label!r}: {err}") from None


def default_grid(method: str) -> list[float]:
    return [] if method == BASE else list(methods.get_method(method).learning_rate_grid)


def parse_grid(specs: list[str], variants: list[Variant]) -> dict[str, list[float]]:
    """Learning-rate grid per variant: method defaults, overridden by ``LABEL_OR_METHOD=lr,lr``."""
    grid = {v.label: default_grid(v.method) for v in variants}
    for spec in specs:
        key, sep, values = spec.partition("=")
        targets = [v.label for v in variants if key in (v.label, v.method)]
        if not sep or not targets:
            raise ValueError(f"--lr-grid {spec!r}: expected VARIANT_OR_METHOD=lr,lr,... naming one of {sorted(grid)}")
        try:
            rates = [float(value) for value in values.split(",")]
        except ValueError:
            raise ValueError(f"--lr-grid {spec!r}: learning rates must be numbers") from None
        for label in targets:
            grid[label] = rates
    return grid


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
    parser.add_argument("--jobs", type=positive_int, default=1, help="runs at a time (each its own process)")
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


def run_folder(args, label: str, seed: int) -> str:
    return os.path.join(args.work_dir, args.name, label, f"seed{seed}")


def train_command(args, variant: Variant, rates: list[float], seed: int, folder: str) -> list[str]:
    command = [sys.executable, "-m", "ntk_attention.cli", "train", "--method", variant.method, "--seed", str(seed),
               "--output-dir", folder, "--result-json", os.path.join(folder, "result.json"), "--resume",
               "--lr", *[f"{rate:g}" for rate in rates]]
    if variant.config:
        command += ["--config", *variant.config]
    if variant.init_from:
        command += ["--init-from", os.path.join(run_folder(args, variant.init_from, seed), "adapter")]
    return command + forwarded_options(args, run_option_names())


def run_once(command: list[str], folder: str, rates: list[float] | None = None) -> dict:
    """Run one ``ntk-attn train`` / ``eval`` unless its result.json is already there (for ``rates``, a
    train run over that grid: a changed grid runs again with ``--resume``, which reuses the rates
    already trained); its log goes beside it."""
    result_file = os.path.join(folder, "result.json")
    cached = _read_result(result_file)
    if cached is None or (rates is not None and grid_rates(cached) != sorted(rates)):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "log.txt"), "a") as log:
            log.write(shlex.join(command) + "\n")
            log.flush()
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise RuntimeError(f"{command[3]} failed (exit {done.returncode}); see {os.path.join(folder, 'log.txt')}")
        with open(result_file) as handle:
            cached = json.load(handle)
    return cached


def _read_result(result_file: str) -> dict | None:
    """A cached result, or None when there is none or it cannot be read (the run is done again)."""
    try:
        with open(result_file) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def grid_rates(result: dict) -> list[float]:
    return sorted(run["learning_rate"] for run in result.get("grid", []))


def score_base(args, variant: Variant) -> dict:
    """The untuned causal LM on the reported split (``ntk-attn eval --model``), once: it has no seed."""
    if not args.model or not args.eval_data:
        raise ValueError("--variants base needs --model and --eval-data (it scores the untuned causal LM)")
    folder = os.path.join(args.work_dir, args.name, variant.label)
    command = [sys.executable, "-m", "ntk_attention.cli", "eval", "--model", args.model, "--data", args.eval_data,
               "--result-json", os.path.join(folder, "result.json")]
    command += forwarded_options(args, ("task", "gguf_file", "batch_size", "text_column", "prompt_field", "answer_field", "max_length",
                                        "eval_size", "max_new_tokens", "generate_size", "generate_batch_size", "threads"))
    result = run_once(command, folder)
    scores = {key: value for name in SCORE_NAMES if name in result for key, value in seed_statistics(name, [result[name]]).items()}
    return {"method": BASE, "config": {}, "method_fields": {}, "init_from": None, "learning_rate": None, **scores, "seeds": [],
            "validation_grid": {}, "generated": result.get("generated"),
            "trainable_params": 0, "trainable_params_excl_head": 0, "train_seconds": 0.0,
            "peak_rss_mb": result["peak_rss_mb"], "device": result["device"], "adapter": None}


def train_seed(args, variant: Variant, seed: int, rates: list[float]) -> dict:
    folder = run_folder(args, variant.label, seed)
    return check_run(run_once(train_command(args, variant, rates, seed, folder), folder, rates), variant, seed, rates, folder)


def run_variant(args, variant: Variant, rates: list[float], started: dict) -> dict:
    if variant.method == BASE:
        return score_base(args, variant)
    if variant.init_from:
        started[variant.init_from].result()  # its adapters must exist; it was submitted first, so no deadlock
    first = train_seed(args, variant, args.seeds[0], rates)
    others = [train_seed(args, variant, seed, [first["learning_rate"]]) for seed in args.seeds[1:variant.seeds]]
    return summarize(variant, [first] + others)


def earlier_seeds(row: dict) -> list[dict]:
    """Which of a row's seeds each earlier call measured: the row's own list, then its newest seeds."""
    listed = row.get("earlier_seeds", [])
    done = {seed for entry in listed for seed in entry["seeds"]}
    newest = [seed for seed in row["seeds"] if seed not in done]
    return listed + ([{"seeds": newest, "measured_by": row.get("measured_by")}] if newest else [])


def complete_row(args, variant: Variant, row: dict, rates: list[float], started: dict) -> dict:
    """An earlier row that this call completes instead of training it again (its work dir may be gone):
    the rates a widened grid adds (``widen_grid``), then the seeds it lacks (``extend_seeds``)."""
    if variant.init_from:
        started[variant.init_from].result()  # as in run_variant: the start's adapters must exist
    if missing_rates(row, rates):
        row = widen_grid(args, variant, row, rates)
    return extend_seeds(args, variant, row) if short_of_seeds(row, variant, args.seeds) else row


def format_rates(rates: list[float]) -> str:
    return ", ".join(f"{rate:g}" for rate in rates)


def missing_rates(row: dict, rates: list[float]) -> list[float]:
    """The rates of ``rates`` that the row's first seed did not train."""
    trained = {float(rate) for rate in row.get("validation_grid") or {}}
    return [rate for rate in rates if rate not in trained]


def widen_grid(args, variant: Variant, row: dict, rates: list[float]) -> dict:
    """Train the row's first seed at the rates ``rates`` adds to its grid, in a folder of its own, and
    choose among old and new rates on validation as one run over ``rates`` would (a rate trains the same
    alone or after others). If an earlier rate still wins, the row stands, its grid widened; if a new one
    wins, its run is the first seed and the other seeds train at its rate (``earlier_rates`` keeps who
    measured the earlier rates)."""
    new_rates, seed = missing_rates(row, rates), row["seeds"][0]
    folder = run_folder(args, variant.label, seed) + "-more-rates"
    added = check_run(run_once(train_command(args, variant, new_rates, seed, folder), folder, new_rates),
                      variant, seed, new_rates, folder)
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
    others = [train_seed(args, variant, other, [best]) for other in expected_seeds(variant, args.seeds)[1:]]
    return {**summarize(variant, [added] + others), "validation_grid": grid, "earlier_rates": history}


def extend_seeds(args, variant: Variant, row: dict) -> dict:
    """An earlier row measured at the suite's first seeds only: run the seeds it lacks at the rate its
    first seed chose and add them to it. The first seed's grid is not trained again (its work dir may be
    gone); the row lists which seeds earlier calls measured, with their commands (``earlier_seeds``)."""
    new = [seed for seed in expected_seeds(variant, args.seeds) if seed not in row["seeds"]]
    results = [train_seed(args, variant, seed, [row["learning_rate"]]) for seed in new]
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
    seeds = row["seeds"] + new
    merged.update({
        "seeds": seeds,
        "best_epoch_per_seed": row.get("best_epoch_per_seed", []) + [result["best_epoch"] for result in results],
        "train_seconds": (row["train_seconds"] * len(row["seeds"]) + sum(r["train_seconds"] for r in results)) / len(seeds),
        "peak_rss_mb": max([row["peak_rss_mb"]] + [r["peak_rss_mb"] for r in results]),
        "earlier_seeds": earlier_seeds(row),
    })
    return merged


def check_run(result: dict, variant: Variant, seed: int, rates: list[float], folder: str) -> dict:
    """A cached result must be the run asked for: same method, config, seed and learning rates, and its
    adapter inside its own folder (a run moved under another label still names the old one)."""
    folder = os.path.realpath(folder)
    adapter = os.path.realpath(result.get("adapter") or folder)
    asked = {"method": variant.method, "config": parse_options(variant.config), "seed": seed,
             "learning rates": sorted(rates), "adapter folder": folder}
    found = {"method": result.get("method"), "config": result.get("config"), "seed": result.get("seed"),
             "learning rates": grid_rates(result),
             "adapter folder": folder if os.path.commonpath([adapter, folder]) == folder else adapter}
    differ = [f"{key} {found[key]!r} (asked: {asked[key]!r})" for key in asked if found[key] != asked[key]]
    differ += _changed_defaults(result, variant)
    if differ:
        raise ValueError(f"{os.path.join(folder, 'result.json')} is another run: " + ", ".join(differ)
                         + "; delete the folder or use another --work-dir / --name")
    return result


def _changed_defaults(result: dict, variant: Variant) -> list[str]:
    """Fields of the saved adapter's config that today's config for the same variant sets otherwise: a
    run of ``ntk`` made before a default changed has the same (empty) options but is another run."""
    config_file = os.path.join(result.get("adapter") or "", "adapter_config.json")
    if variant.init_from or not os.path.isfile(config_file):
        return []  # a start from a prefix takes m and the feature map from the conversion
    with open(config_file) as handle:
        saved = json.load(handle)
    now = variant_fields(variant, result.get("task"))
    return [f"{name} {saved[name]!r} (asked: {value!r})"
            for name, value in sorted(now.items()) if name in saved and saved[name] != value]


def variant_fields(variant: Variant, task: str | None) -> dict:
    """The tuner fields ``variant`` resolves to today, defaults included ({} for LoRA, full, head, base)."""
    if variant.method == BASE:
        return {}
    return methods.method_fields(methods.method_config(variant.method, task, parse_options(variant.config)))


def selection_metric(result: dict) -> str:
    """What chose the run's learning rate (train records it; older results: accuracy or loss by task)."""
    return result.get("metric") or ("accuracy" if result["task"] == "classification" else "loss")


def reported_scores(result: dict) -> dict:
    """A run's scores on the reported split (the validation slice when it had none)."""
    return result["after"]["eval" if "eval" in result["after"] else "validation"]


def seed_statistics(name: str, values: list[float]) -> dict:
    """``dev_<name>``: the mean over seeds, its sample std (n-1; 0 for one seed) and the per-seed values."""
    return {f"dev_{name}": statistics.mean(values), f"dev_{name}_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            f"dev_{name}_per_seed": values}


def summarize(variant: Variant, results: list[dict]) -> dict:
    first = results[0]
    split = "eval" if "eval" in first["after"] else "validation"
    selection = selection_metric(first)
    summary = {"method": variant.method, "config": parse_options(variant.config),
               "method_fields": variant_fields(variant, first["task"]), "init_from": variant.init_from,
               "learning_rate": first["learning_rate"], "selection_metric": selection}
    for name in SCORE_NAMES:  # for every score the runs report
        if all(name in reported_scores(r) for r in results):
            summary.update(seed_statistics(name, [reported_scores(r)[name] for r in results]))
            summary[f"dev_{name}_before"] = first["before"].get(split, {}).get(name)
    summary.update({
        "seeds": [r["seed"] for r in results],
        "validation_grid": {f"{run['learning_rate']:g}": run["validation"].get(selection) for run in first["grid"]},
        "best_epoch_per_seed": [r["best_epoch"] for r in results],
        "trainable_params": first["trainable_params"], "trainable_params_excl_head": first["trainable_params_excl_head"],
        "train_seconds": statistics.mean(r["train_seconds"] for r in results),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
        "device": first["device"], "adapter": first["adapter"],
    })
    if "generated" in first["after"].get("eval", {}):
        summary["generated"] = first["after"]["eval"]["generated"]
    return summary


def command_line(args) -> str:
    """The command that reproduces this comparison, every option spelled out."""
    words = ["ntk-attn", "compare"]
    for name, value in vars(args).items():
        if name.startswith("_") or value is None:
            continue
        if isinstance(value, list):
            words += ["--" + name.replace("_", "-"), *[str(v) for v in value]] if value else []
        else:
            words += forwarded_options(args, [name])
    return shlex.join(words)


def package_versions() -> dict:
    """What a rerun must match to reproduce a row besides torch (pip resolves the newest on a fresh machine)."""
    import accelerate, datasets, peft, transformers

    from .. import __version__

    return {"ntk-attention": __version__, "ntk-attention commit": source_commit(),
            **{m.__name__: m.__version__ for m in (transformers, peft, accelerate, datasets)}}


def source_commit(package: Path | None = None) -> str | None:
    """The git commit of the checkout this library runs from (``+dirty`` with uncommitted changes to its
    code), None when it is not a git checkout: one version string covers many commits between releases."""
    package = package or Path(__file__).resolve().parents[1]
    try:
        def git(*words: str) -> subprocess.CompletedProcess:
            return subprocess.run(["git", "-C", str(package), *words], capture_output=True, text=True, timeout=10)

        commit = git("rev-parse", "--short=12", "HEAD")
        # a site-packages inside some other repository is not tracked there: no commit of ours
        if commit.returncode != 0 or git("ls-files", "--error-unmatch", "__init__.py").returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--", ".").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty else "")


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "load_average_at_start": os.getloadavg(),
            "packages": package_versions()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def apply_suite(args) -> dict | None:
    """Fill ``args`` from ``--suite`` (refusing what the suite fixes) and write its data; the suite's record."""
    if args.suite is None:
        for name in ("data_root", "only"):
            if getattr(args, name) is not None:
                raise ValueError(f"--{name.replace('_', '-')} needs --suite")
        args.name = args.name or "sst2-minilm"
        args.variants = args.variants or DEFAULT_VARIANTS
        args.seeds = args.seeds if args.seeds is not None else [0, 1, 2]
        return None
    from ..tuners.config import resolve_reference
    from . import suite as S

    fixed = ["name", "variants", "lr_grid", "ntk_adapter_max_params",
             *(name for name in run_option_names() if name not in BESIDE_SUITE)]
    given = [name for name in fixed if getattr(args, name, None) not in (None, [])]
    if given:
        raise ValueError(f"--suite {args.suite}: the suite file sets {', '.join('--' + n.replace('_', '-') for n in given)}; "
                         "edit the suite (or copy it) instead")
    suite = S.load_suite(args.suite)
    labels = {parse_variant(spec).label: spec for spec in suite.variants}
    unknown = sorted(set(args.only or []) - set(labels))
    if unknown:
        raise ValueError(f"--only {unknown}: not variants of {args.suite} (it has {sorted(labels)})")
    args.name, args.task = suite.name, suite.task
    args.metric = "mcc" if suite.metric == "mcc" else None  # else train's default: accuracy, or the loss
    # every variant of the suite as it runs (earlier_record checks the kept rows against them)
    args.suite_variants = [first_seed_only(spec, suite.main_variants) for spec in suite.variants]
    args.suite_lr_grid = [f"{key}={','.join(f'{x:g}' for x in rates)}" for key, rates in suite.lr_grid.items()]
    chosen = [labels[label] for label in args.only] if args.only else suite.variants
    args.variants = [first_seed_only(spec, suite.main_variants) for spec in chosen]
    args.lr_grid = [f"{key}={','.join(f'{x:g}' for x in rates)}" for key, rates in suite.lr_grid.items()
                    if key in {parse_variant(spec).method for spec in args.variants} | {parse_variant(spec).label for spec in args.variants}]
    args.seeds = args.seeds if args.seeds is not None else suite.seeds
    args.model, args.gguf_file = resolve_reference(suite.model), suite.gguf_file
    args.ntk_adapter_max_params = suite.ntk_adapter_max_params
    for key, value in suite.budget.items():
        setattr(args, key, value)
    data_folder = os.path.join(args.work_dir, suite.name, "data")
    args.data, args.eval_data = S.prepare_data(suite, args.data_root or S.default_data_root(), data_folder)
    args.text_column = "text" if suite.task in ("classification", "language-modeling") else None
    args.text_pair_column = "text_pair" if "text_pair" in suite.data else None
    return {"file": args.suite, "name": suite.name, "title": suite.title, "description": suite.description, "task": suite.task,
            "metric": suite.metric, "higher_is_better": suite.higher_is_better, "model": suite.model,
            "main_variants": suite.main_variants, "data": suite.data,
            "data_sha256": S.data_fingerprint([args.data, args.eval_data])}


def first_seed_only(spec: str, main_variants: list[str]) -> str:
    """``spec`` limited to the first seed unless it is a main row (or says how many seeds it runs):
    the main rows run every seed, the other points of the curves one."""
    variant = parse_variant(spec)
    if not main_variants or variant.label in main_variants or variant.seeds or variant.method == BASE:
        return spec
    return f"{spec}:seeds=1" if "=" in spec else f"{spec}={spec}:seeds=1"


def run(args) -> int:
    suite = apply_suite(args)
    # two calls on one result file would each write back only the rows they read at their start
    os.makedirs(args.out_dir, exist_ok=True)
    lock = filelock.FileLock(os.path.join(args.out_dir, f".{args.name}.json.lock"))
    try:
        held = lock.acquire(timeout=0)
    except filelock.Timeout:
        raise ValueError(f"{os.path.join(args.out_dir, args.name)}.json: another compare call is writing it; wait for "
                         "it to end or choose another --out-dir") from None
    with held:
        return compare_variants(args, suite)


def compare_variants(args, suite: dict | None) -> int:
    """Train (or keep) every variant, choose on validation, and write ``<out-dir>/<name>.json`` and its report."""
    variants = [parse_variant(spec) for spec in args.variants]
    if len({v.label for v in variants}) != len(variants):
        raise ValueError(f"--variants: labels must be unique, got {[v.label for v in variants]}")
    check_starts(variants)
    check_configs(variants, args.task)
    grid = parse_grid(args.lr_grid, variants)
    if not args.seeds:
        raise ValueError("--seeds needs at least one seed")
    record = {"name": args.name, "command": command_line(args),
              "machine": {**machine(), "note": args.machine_note},
              "budget": {name: getattr(args, name) for name in run_option_names() if getattr(args, name, None) is not None},
              "seeds": args.seeds,
              # with a suite, every row's grid as the suite states it, the rows this call does not run included
              "lr_grid": parse_grid(args.suite_lr_grid, list(map(parse_variant, args.suite_variants))) if suite else grid,
              "selection": "learning rate and best epoch on a validation slice of the training data (first seed); "
                           "dev mean/std over seeds at that rate; std is the sample std (n-1)"}
    if suite:
        record["suite"] = suite
    earlier, partial, earlier_best = earlier_record(args, record, {v.label for v in variants}) if suite else ({}, {}, None)
    start = time.perf_counter()
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
    order = [parse_variant(spec).label for spec in args.suite_variants] if suite else list(futures)
    record["methods"] = {label: ran.get(label) or earlier[label] for label in order if label in ran or label in earlier}
    record["metric"], record["higher_is_better"] = reported_metric(record)
    record["wall_seconds"] = time.perf_counter() - start
    record["machine"]["load_average_at_end"] = os.getloadavg()
    write_results(args.out_dir, args.name, record, args.ntk_adapter_max_params, earlier_best)
    if suite:
        from .suite import write_summary

        write_summary(args.out_dir)
    return 0


def earlier_record(args, record: dict, running: set[str]) -> tuple[dict[str, dict], dict[str, dict], str | None]:
    """Rows of ``<out-dir>/<name>.json`` (an earlier call) that stand for variants of the suite as it is
    now: the same suite, data, model and budget, and per row the same method, resolved fields, start,
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
    suite_variants = {v.label: v for v in map(parse_variant, args.suite_variants)}
    grid = record["lr_grid"]
    kept, partial = {}, {}
    for label, row in old["methods"].items():
        variant = suite_variants.get(label)
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


def expected_seeds(variant: Variant, seeds: list[int]) -> list[int]:
    """The seeds a variant's row holds: every seed for a main row, the first for the others, none for base."""
    return [] if variant.method == BASE else seeds[:variant.seeds or len(seeds)]


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


def reported_metric(record: dict) -> tuple[str, bool]:
    """The suite's metric; without a suite accuracy for classification, else the loss."""
    if "suite" in record:
        return record["suite"]["metric"], record["suite"]["higher_is_better"]
    methods = record["methods"].values()
    return ("accuracy", True) if any("dev_accuracy" in m for m in methods) else ("loss", False)


def write_results(out_dir: str, name: str, record: dict, max_params: int | None = None,
                  earlier_best: str | None = None) -> None:
    """The JSON, Markdown and plots, and a copy of the best NTK variant's adapter (``earlier_best``: the
    variant whose copy an earlier call left in place, from a row kept without its run folder)."""
    rows = record["methods"]
    ntk = [label for label, row in rows.items() if row["method"] == "ntk"
           and (max_params is None or row["trainable_params_excl_head"] <= max_params)]
    target = os.path.join(out_dir, name, "ntk")
    best = max(ntk, key=lambda label: validation_score(rows[label])) if ntk else None
    source = rows[best]["adapter"] if best else None
    kept_copy = best is not None and best == earlier_best  # the copy an earlier call made of this same row
    if source and not os.path.isdir(source):  # a row kept from an earlier result whose run folder is gone
        source = None
        if not os.path.exists(target):
            print(f"the best NTK variant {best!r} has no adapter left to copy to {target}", flush=True)
    up_to_date = os.path.exists(target) and ((kept_copy and source is None) or bool(source and same_files(source, target)))
    # Checked before anything is written, so the JSON never names an adapter the folder does not hold.
    if os.path.exists(target) and not up_to_date and not (source and copied_by(target, name)):
        raise ValueError(f"{target} holds an adapter that is not this comparison's best NTK variant "
                         f"({best or 'none qualifies'}) and that compare did not copy there for {name!r} (or it "
                         "changed since): compare does not delete what it did not write; move it away or choose "
                         "another --out-dir / --name")
    os.makedirs(out_dir, exist_ok=True)
    if best:
        record["best_ntk_variant"] = best
        if source and not up_to_date:
            copy_folder(source, target, {"comparison": name, "variant": best})
    write_json(os.path.join(out_dir, f"{name}.json"), record)
    table = markdown_table(record)
    write_text(os.path.join(out_dir, f"{name}.md"), table)
    plot(record, os.path.join(out_dir, name))
    print(table)


COPY_RECORD = "copied_by_compare.json"  # in a copied adapter: which comparison copied it, and its files' hashes


def file_hashes(folder: str) -> dict[str, str]:
    """sha256 of every file in ``folder`` except the copy record."""
    return {n: hashlib.sha256(Path(folder, n).read_bytes()).hexdigest() for n in sorted(os.listdir(folder))
            if n != COPY_RECORD}


def copied_by(target: str, name: str) -> bool:
    """``target`` is a copy that compare made for comparison ``name`` and nobody has changed since: compare
    may replace it (anything else in its place is left alone)."""
    try:
        with open(os.path.join(target, COPY_RECORD)) as handle:
            copy = json.load(handle)
        return copy["comparison"] == name and copy["files"] == file_hashes(target)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def same_files(a: str, b: str) -> bool:
    """Both folders hold the same file names with the same bytes (the copy record aside)."""
    names = sorted(n for n in os.listdir(a) if n != COPY_RECORD)
    if not os.path.isdir(b) or sorted(n for n in os.listdir(b) if n != COPY_RECORD) != names:
        return False
    return all(filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names)


def copy_folder(source: str, target: str, copy: dict) -> None:
    """Copy into a hidden folder beside ``target`` with the copy record, then rename it into place (an earlier
    copy moves aside first and is removed last): never half a copy."""
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".copying-", dir=parent)
    replaced, aside = None, None
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        write_json(os.path.join(staging, COPY_RECORD), {**copy, "source": source, "files": file_hashes(staging)})
        if os.path.exists(target):
            replaced = tempfile.mkdtemp(prefix=".replaced-", dir=parent)
            aside = os.path.join(replaced, os.path.basename(target))
            os.rename(target, aside)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if aside and not os.path.exists(target):  # put the earlier copy back
            os.rename(aside, target)
        raise
    finally:
        if replaced and os.path.exists(target):
            shutil.rmtree(replaced, ignore_errors=True)


def validation_score(summary: dict) -> float:
    """The chosen rate's validation score, higher is better (accuracy or MCC, or minus the loss)."""
    value = summary["validation_grid"][f"{summary['learning_rate']:g}"]
    return selection_score(summary.get("selection_metric", "accuracy" if "dev_accuracy" in summary else "loss"), value)


def grid_edge(summary: dict) -> str | None:
    """Where the chosen learning rate sits in its grid: ``"lower edge"`` or ``"upper edge"`` (a wider grid
    could still move the row), ``"one rate"`` (nothing was chosen), or None (inside the grid, or untuned)."""
    rates = sorted(float(rate) for rate in summary.get("validation_grid") or {})
    chosen = summary.get("learning_rate")
    if chosen is None or not rates:
        return None
    if len(rates) == 1:
        return "one rate"
    if math.isclose(chosen, rates[0], rel_tol=1e-4):
        return "lower edge"
    if math.isclose(chosen, rates[-1], rel_tol=1e-4):
        return "upper edge"
    return None


def markdown_table(record: dict) -> str:
    methods = record["methods"]
    metric, higher = record.get("metric"), record.get("higher_is_better")
    if metric is None:
        metric, higher = reported_metric(record)
    extra = [name for name in SCORE_NAMES if name != metric and any(f"dev_{name}" in m for m in methods.values())]
    header = (f"| variant | trainable (excl. head) | lr (chosen on validation) | validation grid | dev {metric} "
              f"(mean ± std over seeds) | seeds |" + "".join(f" dev {name} |" for name in extra)
              + " train s | peak RSS MB |")
    lines = [f"Command: `{record['command']}`", "", header, "|" + "---|" * (header.count("|") - 1)]
    for label, m in methods.items():
        grid = ", ".join(f"{lr}: {value:.3f}" for lr, value in m["validation_grid"].items()) or "untuned"
        rate = "-" if m["learning_rate"] is None else f"{m['learning_rate']:g}"
        if edge := grid_edge(m):
            rate += f" ({edge})"
        row = (f"| {label} | {m['trainable_params']:,} ({m['trainable_params_excl_head']:,}) | {rate} | "
               f"{grid} | {m[f'dev_{metric}']:.4f} ± {m[f'dev_{metric}_std']:.4f} | {len(m['seeds']) or '-'} |")
        row += "".join(f" {m[f'dev_{name}']:.4f} |" if f"dev_{name}" in m else " - |" for name in extra)
        lines.append(row + f" {m['train_seconds']:.0f} | {m['peak_rss_mb']:.0f} |")
    note = record["machine"].get("note") or record["machine"].get("gpu") or record["machine"]["processor"]
    lines += ["", f"dev {metric}: {'higher' if higher else 'lower'} is better. "
              f"Machine: {note}; {record['machine']['cpu_count']} CPUs; torch {record['machine']['torch']}."]
    earlier = {}  # rows kept from earlier calls, by the command that measured them
    for label, m in methods.items():
        command = (m.get("measured_by") or {}).get("command")
        if command and command != record["command"]:
            earlier.setdefault(command, []).append(label)
    for command, labels in earlier.items():
        lines += ["", f"Kept from an earlier call (same settings, not rerun): {', '.join(labels)}, measured by `{command}`."]
    for label, m in methods.items():
        for entry in m.get("earlier_seeds", []):
            later = "" if set(entry["seeds"]) >= set(m["seeds"]) else f"; the later seeds ran at the rate seed {m['seeds'][0]} chose"
            lines += ["", f"{label}: seeds {entry['seeds']} kept from an earlier call (not rerun), measured by "
                      f"`{(entry.get('measured_by') or {}).get('command')}`{later}."]
    for label, m in methods.items():
        for entry in m.get("earlier_rates", []):
            lines += ["", f"{label}: rates {format_rates(entry['rates'])} of its validation grid "
                      f"measured by `{(entry.get('measured_by') or {}).get('command')}` (not rerun); the grid's other "
                      "rates were added later at the same seed."]
        if not_run := missing_rates(m, record["lr_grid"].get(label, [])):
            lines += ["", f"{label}: rates {format_rates(not_run)} of the suite's grid not run yet; "
                      f"its rate was chosen among the others (`--only {label}` trains them)."]
    renamed = [f"{label} (was {m['renamed_from']['label']})" for label, m in methods.items() if m.get("renamed_from")]
    if renamed:
        lines += ["", f"Measured under another label, the same run as today's: {', '.join(renamed)} (`renamed_from` in the JSON)."]
    return "\n".join(lines) + "\n"


def plot(record: dict, prefix: str) -> None:
    """``<prefix>-params.png``: the reported metric against trainable parameters besides the head (log x),
    one colour and line per method; variants with none (head only, untuned) as horizontal lines.
    ``<prefix>-time.png``: the same against train seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = record["methods"]
    metric = record.get("metric") or reported_metric(record)[0]
    for key, xlabel, suffix, log in (("trainable_params_excl_head", "trainable parameters besides the head", "params", True),
                                     ("train_seconds", "train time per run (s)", "time", False)):
        figure, axes = plt.subplots(figsize=(7, 4.5))
        points = [(f"{label} ({'untuned' if m['method'] == BASE else 'no adapter'})" if log and m[key] == 0 else label,
                   m["method"], m[key], m[f"dev_{metric}"], m[f"dev_{metric}_std"]) for label, m in methods.items()]
        draw_methods(axes, points, log_x=log, fontsize=8)
        axes.set_xlabel(xlabel)
        axes.set_ylabel(f"dev {metric}")
        axes.set_title(f"{record['name']}: dev {metric} vs {xlabel}", fontsize=10)
        save_figure(f"{prefix}-{suffix}.png", figure)
        plt.close(figure)
