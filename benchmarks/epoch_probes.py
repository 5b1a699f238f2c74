"""Does NTK-Attention's gap to LoRA close with a longer budget? The committed epoch probes beside the suite.

Each probe (``benchmarks/results/probes/<task>-epochs<N>.json``) is an ``ntk-attn compare`` call on a
suite task's data and model at a longer budget, with LoRA r = 8 (label ``lora``) and one NTK row under
the label it has in the suite. Per probe: both rows' reported means at the probe's seeds, the same
rows of the suite (``benchmarks/results/suite/<task>.json``) at the same seeds, and NTK minus LoRA at
each budget (for perplexity, a positive gap is NTK behind), the gap at each of the probe's seeds, and
each row's mean loss on the reported split at both budgets. No training.

    python benchmarks/epoch_probes.py [--probes benchmarks/results/probes] [--suite benchmarks/results/suite]
        [--out benchmarks/results/probes/epoch_probes.json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from ntk_attention.io import write_json, write_text

PROBE = re.compile(r"(?P<task>[a-z0-9]+)-epochs\d+\.json")


def at_seeds(row: dict, metric: str, seeds: list[int]) -> list[float]:
    """The row's reported values at those of ``seeds`` it ran."""
    return [value for seed, value in zip(row["seeds"], row[f"dev_{metric}_per_seed"]) if seed in seeds]


def compare_probe(probe: dict, suite: dict) -> dict:
    metric = suite["metric"]
    ntk = [label for label, row in probe["methods"].items() if row["method"] == "ntk"]
    if "lora" not in probe["methods"] or len(ntk) != 1:
        raise ValueError(f"{probe['name']}: a probe has a 'lora' row and one NTK row (it has {sorted(probe['methods'])})")
    seeds = probe["methods"]["lora"]["seeds"]
    rows = {}
    for label in ("lora", ntk[0]):
        ran, earlier = probe["methods"][label], suite["methods"][label]
        before = at_seeds(earlier, metric, seeds)
        rows[label] = {"trainable_params": ran["trainable_params_excl_head"],
                       "suite": {"learning_rate": earlier["learning_rate"], "seeds": [s for s in earlier["seeds"] if s in seeds],
                                 "per_seed": before, "mean": statistics.mean(before),
                                 "loss": statistics.mean(at_seeds(earlier, "loss", seeds))},
                       "probe": {"learning_rate": ran["learning_rate"], "seeds": ran["seeds"],
                                 "per_seed": ran[f"dev_{metric}_per_seed"], "mean": ran[f"dev_{metric}"],
                                 "loss": ran["dev_loss"], "best_epoch_per_seed": ran["best_epoch_per_seed"]}}
    lora, other = rows["lora"]["probe"], rows[ntk[0]]["probe"]
    return {"metric": metric, "seeds": seeds, "ntk": ntk[0],
            "epochs": {"suite": suite["budget"]["epochs"], "probe": probe["budget"]["epochs"]},
            "gap": {budget: rows[ntk[0]][budget]["mean"] - rows["lora"][budget]["mean"] for budget in ("suite", "probe")},
            "probe_gap_per_seed": [b - a for a, b in zip(lora["per_seed"], other["per_seed"])],
            "rows": rows}


def cell(value: float, metric: str) -> str:
    return f"{value:.2f}" if metric == "perplexity" else f"{value:.3f}"


def points(gap: float, metric: str) -> str:
    """A gap in points (x 100) of accuracy or exact match, in perplexity for perplexity."""
    return f"{gap if metric == 'perplexity' else 100 * gap:+.1f}"


def markdown(probes: dict, command: str) -> str:
    lines = ["| probe: metric, seeds | epochs: suite, probe | LoRA r = 8: suite, probe | NTK row (params; rate: suite, probe): "
             "suite, probe | NTK minus LoRA: suite, probe | NTK minus LoRA per seed, probe | loss on the reported split, "
             "LoRA / NTK: suite, probe |", "|---|---|---|---|---|---|---|"]
    for name, probe in probes.items():
        metric, lora, ntk = probe["metric"], probe["rows"]["lora"], probe["rows"][probe["ntk"]]
        means = {}
        for label, row in (("lora", lora), ("ntk", ntk)):
            means[label] = ", ".join(cell(row[budget]["mean"], metric) + (f" (seed {row[budget]['seeds'][0]})"
                                     if len(row[budget]["seeds"]) < len(probe["seeds"]) else "") for budget in ("suite", "probe"))
        losses = ", ".join(f"{lora[budget]['loss']:.3f} / {ntk[budget]['loss']:.3f}" for budget in ("suite", "probe"))
        rates = f"{ntk['suite']['learning_rate']:g}, {ntk['probe']['learning_rate']:g}"
        lines.append(f"| {name}: {metric}, {' / '.join(map(str, probe['seeds']))} | "
                     f"{probe['epochs']['suite']:g}, {probe['epochs']['probe']:g} | {means['lora']} | "
                     f"{probe['ntk']} ({ntk['trainable_params'] / 1000:.0f}k; {rates}): {means['ntk']} | "
                     f"{points(probe['gap']['suite'], metric)}, **{points(probe['gap']['probe'], metric)}** | "
                     f"{' / '.join(points(gap, metric) for gap in probe['probe_gap_per_seed'])} | {losses} |")
    return "\n".join(lines + ["", "NTK minus LoRA in points (x 100) of accuracy or exact match, in perplexity for perplexity "
                               f"(there a positive gap is NTK behind). `{command}`", ""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--probes", default="benchmarks/results/probes", type=Path, help="folder of the probes' JSONs")
    parser.add_argument("--suite", default="benchmarks/results/suite", type=Path, help="folder of the suite's task JSONs")
    parser.add_argument("--out", default=None, type=Path, help="write the figures here (JSON) and beside it (.md)")
    args = parser.parse_args(argv)
    probes = {}
    for path in sorted(args.probes.glob("*.json")):
        if match := PROBE.fullmatch(path.name):
            suite_file = args.suite / f"{match['task']}.json"
            if not suite_file.exists():
                raise FileNotFoundError(f"{path}: no suite result {suite_file} to set it beside")
            probes[path.stem] = compare_probe(json.loads(path.read_text()), json.loads(suite_file.read_text()))
    if not probes:
        raise SystemExit(f"no probes (<task>-epochs<N>.json) in {args.probes}")
    command = " ".join(["python benchmarks/epoch_probes.py", f"--probes {args.probes}", f"--suite {args.suite}"]
                       + ([f"--out {args.out}"] if args.out else []))
    text = markdown(probes, command)
    print(text)
    if args.out:
        write_json(str(args.out), {"command": command, "probes": probes})
        write_text(str(args.out.with_suffix(".md")), text)


if __name__ == "__main__":
    main()
