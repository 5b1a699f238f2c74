"""How well does NTK-Attention over X reproduce exact prefix attention over [P; X]?

For each input distribution, prefix length m and feature map, compare the exact
``prefix_attention(q, k, v, P_K, P_V)`` with ``ntk_attention(q, k, v, Z, k)`` where ``(Z, k)`` is
(a) the closed form ``prefix_to_ntk(P_K, P_V)`` and (b) trained by Adam on fresh inputs. The error is
that of the prefix effect, ``|NTK - prefix| / |no prefix - prefix|``, and the plain MSE, on held-out
inputs, averaged over ``--trials`` independent prefixes. Writes ``approx_error.json``,
``approx_error.md`` and the plots ``approx_error_vs_m.png`` / ``approx_error_vs_r.png``.

    ntk-attn experiment approx-error --quick
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from .. import ntk_attention, prefix_attention, prefix_to_ntk
from ..cli import non_negative_int, positive_float, positive_int
from .common import (
    apply_quick,
    INPUT_KINDS,
    FitConfig,
    InputSampler,
    add_output_arguments,
    check_prefix_lengths,
    feature_map_label,
    fit_ntk_state,
    markdown_table,
    new_figure,
    no_prefix_attention,
    parse_feature_map,
    prefix_effect_error,
    prefix_mass_share,
    run_config,
    save_outputs,
)

DEFAULT_MAPS = ["elu", "taylor", "random:64", "random:256", "random:1024", "random:4096"]
SLOPE_FROM = 1024  # the slope of the error is fitted over m >= this
QUICK = dict(head_dim=16, length=32, prefix_lengths=[1, 16, 256], feature_maps=["elu", "taylor", "random:64"],
             trials=1, batch=2, train_steps=20, train_prefix_lengths=[1, 16], train_trials=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--head-dim", "--d", dest="head_dim", type=positive_int, default=64, help="head dimension d")
    parser.add_argument("--length", "--L", dest="length", type=positive_int, default=128, help="input length L")
    parser.add_argument("--prefix-lengths", "--m", dest="prefix_lengths", type=int, nargs="+",
                        default=[2**i for i in range(1, 17)], help="prefix lengths m (default 2^1 ... 2^16)")
    parser.add_argument("--feature-maps", nargs="+", default=DEFAULT_MAPS,
                        help="elu, taylor[:degree], random:num_features (default %(default)s)")
    parser.add_argument("--inputs", nargs="+", choices=INPUT_KINDS, default=["uniform", "projected"],
                        help="input distributions (see common.InputSampler)")
    parser.add_argument("--sigma", type=positive_float, default=0.5, help="entry std of the 'gaussian' inputs")
    parser.add_argument("--trials", type=positive_int, default=3, help="independent prefixes (and inputs) per point")
    parser.add_argument("--batch", type=positive_int, default=4, help="held-out input sequences per trial")
    parser.add_argument("--train-steps", type=non_negative_int, default=300, help="Adam steps for the trained (Z, k); 0 skips")
    parser.add_argument("--train-lr", type=positive_float, default=0.01)
    parser.add_argument("--train-prefix-lengths", type=int, nargs="+", default=[2, 16, 128, 1024, 8192, 65536],
                        help="the m at which (Z, k) is also trained (a fit at m = 2^16 takes about a minute on one CPU core)")
    parser.add_argument("--train-trials", type=non_negative_int, default=1, help="trials (of --trials) that also train (Z, k)")
    parser.add_argument("--replot", action="store_true",
                        help="measure nothing: rebuild the table and plots from approx_error.json in --out-dir")
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    experiment(args)
    return 0


def experiment(args: argparse.Namespace) -> dict:
    """Measure (or, with ``--replot``, reload), save and return ``{"config", "rows", "summary"}``."""
    if args.replot:
        config, rows = load_rows(args.out_dir / "approx_error.json")
        config.pop("out", None)  # files written before the option was --out-dir
        args = argparse.Namespace(**{**config, "out_dir": args.out_dir})
    else:
        apply_quick(args, add_arguments, QUICK)
        args.prefix_lengths = check_prefix_lengths(args.prefix_lengths)
        rows = measure(args, [parse_feature_map(spec) for spec in args.feature_maps])
    summary = summarise(rows)
    result = {"config": run_config(args), "rows": rows, "summary": summary}
    save_outputs(args.out_dir / "approx_error", result, table(summary, args),
                 {"_vs_m": plot_vs_m(summary), "_vs_r": plot_vs_r(summary)})
    return result


def measure(args, fmaps) -> list[dict]:
    rows = []
    jobs = [(kind, t) for kind in args.inputs for t in range(args.trials)]
    bar = tqdm(total=len(jobs) * len(args.prefix_lengths), desc="approx-error")
    for kind, trial in jobs:
        seed = args.seed + 1000 * trial
        sampler = InputSampler(kind, args.head_dim, seed=seed, sigma=args.sigma)
        q, k, v = sampler.qkv(args.batch, args.length)
        no_prefix = no_prefix_attention(q, k, v)
        for m in args.prefix_lengths:
            prefix_k, prefix_v = sampler.prefix(m)
            exact = prefix_attention(q, k, v, prefix_k, prefix_v)
            share = prefix_mass_share(q, k, prefix_k)
            base = {"inputs": kind, "trial": trial, "m": m, "prefix_share": share}
            for fmap in fmaps:
                r = fmap.feature_dim(args.head_dim)
                info = {**base, "feature_map": feature_map_label(fmap), "r": r}
                z, kvec = prefix_to_ntk(prefix_k, prefix_v, feature_map=fmap)
                out = ntk_attention(q, k, v, z, kvec, feature_map=fmap)
                rows.append({**info, "method": "closed_form", **prefix_effect_error(out, exact, no_prefix)})
                if args.train_steps > 0 and m in args.train_prefix_lengths and trial < args.train_trials:
                    cfg = FitConfig(steps=args.train_steps, lr=args.train_lr, batch=args.batch, length=args.length)
                    start = time.perf_counter()
                    z, kvec, losses = fit_ntk_state(sampler, prefix_k, prefix_v, fmap, cfg, seed=seed)
                    out = ntk_attention(q, k, v, z, kvec, feature_map=fmap)
                    rows.append({**info, "method": "trained", **prefix_effect_error(out, exact, no_prefix),
                                 "final_train_loss": losses[-1], "train_seconds": time.perf_counter() - start})
            bar.update()
    bar.close()
    return rows


ROW_FIELDS = ("inputs", "method", "feature_map", "m", "r", "rel_error", "mse", "prefix_share")


def load_rows(path: Path) -> tuple[dict, list[dict]]:
    """The config and rows of a saved run, checked."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--replot: no {path}; run the measurement first") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"--replot: {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"--replot: {path} must hold an object with 'config' and 'rows'")
    for i, row in enumerate(data["rows"]):
        missing = [f for f in ROW_FIELDS if not isinstance(row, dict) or f not in row]
        if missing:
            raise ValueError(f"--replot: {path}: row {i} lacks {missing}")
    return data["config"], data["rows"]


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of log(error) against log(m): -1/2 is the law-of-large-numbers rate."""
    if len(points) < 3:
        return float("nan")
    xs, ys = [math.log(m) for m, _ in points], [math.log(e) for _, e in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std over trials of each (inputs, method, feature map, m)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["inputs"], row["method"], row["feature_map"], row["m"]), []).append(row)
    summary = []
    for (kind, method, fmap, m), group in groups.items():
        rel = [g["rel_error"] for g in group]
        summary.append({
            "inputs": kind, "method": method, "feature_map": fmap, "m": m, "r": group[0]["r"],
            "rel_error": statistics.fmean(rel), "rel_error_std": statistics.pstdev(rel),
            "mse": statistics.fmean(g["mse"] for g in group),
            "prefix_share": statistics.fmean(g["prefix_share"] for g in group), "trials": len(group),
        })
    return summary


def table(summary: list[dict], args) -> str:
    """One table per input distribution: rows m, columns (feature map, method)."""
    text = [f"Relative error of the prefix effect |NTK - prefix| / |no prefix - prefix| (mean of {args.trials} "
            f"trials), d = {args.head_dim}, L = {args.length}.\n"]
    for kind in args.inputs:
        part = [s for s in summary if s["inputs"] == kind]
        columns = sorted({(s["feature_map"], s["method"]) for s in part}, key=lambda c: (c[1], c[0]))
        ms = sorted({s["m"] for s in part})
        lookup = {(s["feature_map"], s["method"], s["m"]): s for s in part}
        header = ["m", "prefix share"] + [f"{f} ({'cf' if meth == 'closed_form' else 'tr'})" for f, meth in columns]
        body = []
        for m in ms:
            share = next(s["prefix_share"] for s in part if s["m"] == m)
            body.append([m, share] + [lookup[(f, meth, m)]["rel_error"] if (f, meth, m) in lookup else "-"
                                      for f, meth in columns])
        body.append([f"slope, m >= {SLOPE_FROM}", "-"] + [
            slope([(m, lookup[(f, meth, m)]["rel_error"]) for m in ms if m >= SLOPE_FROM and (f, meth, m) in lookup])
            for f, meth in columns])
        text.append(f"\n**inputs: {kind}** (cf = closed form, tr = trained by Adam; the last row is the slope of "
                    f"log error against log m)\n\n" + markdown_table(header, body))
    return "".join(text)


def plot_vs_m(summary: list[dict]):
    kinds = sorted({s["inputs"] for s in summary})
    fig, axes = new_figure(len(kinds))
    for ax, kind in zip(axes, kinds):
        maps = sorted({s["feature_map"] for s in summary})
        for i, fmap in enumerate(maps):
            for method, style in (("closed_form", "-o"), ("trained", "--x")):
                pts = sorted((s["m"], s["rel_error"]) for s in summary
                             if s["inputs"] == kind and s["feature_map"] == fmap and s["method"] == method)
                if pts:
                    ax.plot(*zip(*pts), style, color=f"C{i}", ms=3,
                            label=f"{fmap} ({'closed form' if method == 'closed_form' else 'trained'})")
        ax.set(xscale="log", yscale="log", xlabel="prefix length m", ylabel="|NTK - prefix| / |no prefix - prefix|",
               title=f"inputs: {kind}")
        ax.grid(True, which="both", alpha=0.3)
    axes[-1].legend(fontsize=7)
    return fig


def plot_vs_r(summary: list[dict]):
    """Error against the feature dimension r at one m: the largest m that has trained results too."""
    kinds = sorted({s["inputs"] for s in summary})
    fig, axes = new_figure(len(kinds))
    for ax, kind in zip(axes, kinds):
        part = [s for s in summary if s["inputs"] == kind]
        trained_ms = {s["m"] for s in part if s["method"] == "trained"}
        m = max(trained_ms or {s["m"] for s in part})
        for method, marker in (("closed_form", "o"), ("trained", "x")):
            sub = [s for s in part if s["method"] == method and s["m"] == m]
            rand = sorted((s["r"], s["rel_error"]) for s in sub if s["feature_map"].startswith("random"))
            if rand:
                ax.plot(*zip(*rand), f"-{marker}", color="C0", label=f"random ({method})")
            for s in sub:
                if not s["feature_map"].startswith("random"):
                    ax.plot(s["r"], s["rel_error"], marker, color="C1" if s["feature_map"] == "elu" else "C2", ms=8)
                    ax.annotate(f" {s['feature_map']} ({method})", (s["r"], s["rel_error"]), fontsize=7)
        ax.set(xscale="log", yscale="log", xlabel="feature dimension r", ylabel="relative error of the prefix effect",
               title=f"inputs: {kind}, m = {m}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return fig
