"""One variant's runs: each seed an ``ntk-attn train`` process (the base an ``ntk-attn eval``), cached by
its ``result.json`` and checked to be the run asked for, then summed up into the variant's row."""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from ..options import forwarded_options, parse_options, run_option_names
from .variants import BASE, Variant, variant_fields

SCORE_NAMES = ("accuracy", "mcc", "perplexity", "exact_match", "loss")


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
    with args.train_slots:
        result = run_once(command, folder)
    scores = {key: value for name in SCORE_NAMES if name in result for key, value in seed_statistics(name, [result[name]]).items()}
    return {"method": BASE, "config": {}, "method_fields": {}, "init_from": None, "learning_rate": None, **scores, "seeds": [],
            "validation_grid": {}, "generated": result.get("generated"),
            "trainable_params": 0, "trainable_params_excl_head": 0, "train_seconds": 0.0,
            "peak_rss_mb": result["peak_rss_mb"], "device": result["device"], "adapter": None}


def train_seed(args, variant: Variant, seed: int, rates: list[float], folder: str | None = None) -> dict:
    folder = folder or run_folder(args, variant.label, seed)
    with args.train_slots:  # at most --jobs train processes in the whole call, rows and seeds together
        result = run_once(train_command(args, variant, rates, seed, folder), folder, rates)
    return check_run(result, variant, seed, rates, folder)


def train_seeds(args, variant: Variant, seeds: list[int], rates: list[float]) -> list[dict]:
    """``train_seed`` for each seed, as many at once as --jobs allows (the seeds after the first train at the
    rate it chose, independently of each other)."""
    with ThreadPoolExecutor(max_workers=max(1, min(args.jobs, len(seeds)))) as pool:
        return list(pool.map(lambda seed: train_seed(args, variant, seed, rates), seeds))


def run_variant(args, variant: Variant, rates: list[float], started: dict) -> dict:
    if variant.method == BASE:
        return score_base(args, variant)
    if variant.init_from:
        started[variant.init_from].result()  # its adapters must exist; it was submitted first, so no deadlock
    first = train_seed(args, variant, args.seeds[0], rates)
    others = train_seeds(args, variant, args.seeds[1:variant.seeds], [first["learning_rate"]])
    return summarize(variant, [first] + others)


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


def selection_metric(result: dict) -> str:
    """What chose the run's learning rate (train records it; older results: accuracy or loss by task)."""
    return result.get("metric") or ("accuracy" if result["task"] == "classification" else "loss")


def reported_scores(result: dict) -> dict:
    """A run's scores on the reported split (the validation slice when it had none)."""
    return result["after"]["eval" if "eval" in result["after"] else "validation"]


def chosen_validation(result: dict) -> float | None:
    """The run's validation score at the rate it chose, by the metric that chose it."""
    return result["after"]["validation"].get(selection_metric(result))


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
        "validation_per_seed": [chosen_validation(r) for r in results],
        "best_epoch_per_seed": [r["best_epoch"] for r in results],
        "trainable_params": first["trainable_params"], "trainable_params_excl_head": first["trainable_params_excl_head"],
        "train_seconds": statistics.mean(r["train_seconds"] for r in results),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
        "device": first["device"], "adapter": first["adapter"],
    })
    if "generated" in first["after"].get("eval", {}):
        summary["generated"] = first["after"]["eval"]["generated"]
    return summary
