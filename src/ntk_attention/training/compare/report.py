"""What a comparison writes: ``<name>.json``, the Markdown table, the plots, and a copy of the best NTK
variant's adapter; and the helpers that read a row's place in its grid (``suite.py`` uses them too)."""

from __future__ import annotations

import filecmp
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from ...io import save_figure, write_json, write_text
from ..fit import ends_at_last_epoch, selection_score
from ..plots import draw_methods
from .runs import SCORE_NAMES
from .variants import BASE


def reported_metric(record: dict) -> tuple[str, bool]:
    """The suite's metric; without a suite accuracy for classification, else the loss."""
    if "suite" in record:
        return record["suite"]["metric"], record["suite"]["higher_is_better"]
    methods = record["methods"].values()
    return ("accuracy", True) if any("dev_accuracy" in m for m in methods) else ("loss", False)


def row_selection_metric(summary: dict) -> str:
    """What chose the row's rate and epoch (rows written before the field: accuracy where reported, else the loss)."""
    return summary.get("selection_metric", "accuracy" if "dev_accuracy" in summary else "loss")


def validation_score(summary: dict) -> float:
    """The chosen rate's validation score, higher is better (accuracy or MCC, or minus the loss)."""
    return selection_score(row_selection_metric(summary), summary["validation_grid"][f"{summary['learning_rate']:g}"])


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


def rows_at_last_epoch(record: dict) -> list[str]:
    """The trained rows whose every seed chose the budget's last epoch (of several)."""
    epochs = (record.get("budget") or {}).get("epochs")
    return [label for label, row in record["methods"].items() if row.get("best_epoch_per_seed")
            and all(ends_at_last_epoch(epoch, epochs) for epoch in row["best_epoch_per_seed"])]


def missing_rates(row: dict, rates: list[float]) -> list[float]:
    """The rates of ``rates`` that the row's first seed did not train."""
    trained = {float(rate) for rate in row.get("validation_grid") or {}}
    return [rate for rate in rates if rate not in trained]


def format_rates(rates: list[float]) -> str:
    return ", ".join(f"{rate:g}" for rate in rates)


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
    if at_last := rows_at_last_epoch(record):
        lines += ["", f"Best epoch on validation the budget's last ({record['budget']['epochs']:g}) at every seed, so these "
                  f"rows may still gain from more epochs: {', '.join(at_last)}."]
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
