"""Bring the suite results measured before 0.2.0 under the 0.2.0 labels, once.

0.2.0 changed NTKConfig's default feature map from elu to positive random features with r = d. The
committed rows were measured under the old default, so in ``benchmarks/results/suite/*.json``:

- every row gets ``method_fields``, the tuner fields it ran with (``ntk`` rows without a feature map
  resolved with ``feature_map=elu``, the default then), and ``measured_by``, its record's command and
  machine: what ``ntk-attn compare`` now records per row and checks before keeping a row;
- rows move to the label that means the same run today: ``ntk`` -> ``ntk-elu``, ``ntk-kv`` ->
  ``ntk-kv-elu``, and the random-feature rows with r = d (``ntk-random32``, ``ntk-kv-random64``) ->
  ``ntk`` / ``ntk-kv``. Their ``config`` becomes the new label's options and ``renamed_from`` keeps the
  old label and options. Every move is checked: the fields of the new label's variant, resolved by
  today's code, must equal the row's.

The Markdown and plots are redrawn from the JSON and ``suite.json`` is rebuilt. Nothing is trained. Run
from the repository root (a second run finds nothing to do)::

    python benchmarks/migrate_suite_results_0_2.py
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig

from ntk_attention import get_feature_map
from ntk_attention.io import write_json, write_text
from ntk_attention.training import methods
from ntk_attention.training.compare.report import markdown_table, plot
from ntk_attention.training.compare.variants import parse_variant, variant_fields
from ntk_attention.training.options import parse_options
from ntk_attention.training.suite import load_suite, write_summary
from ntk_attention.tuners.config import resolve_reference

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "suite"
MOVES = {"ntk": "ntk-elu", "ntk-kv": "ntk-kv-elu", "ntk-random32": "ntk", "ntk-kv-random64": "ntk-kv"}


def fields_then(row: dict, task: str) -> dict:
    """The tuner fields a row measured before 0.2.0 ran with."""
    if row["method"] == "base":
        return {}
    config = dict(row["config"])
    if row["method"] == "ntk" and "feature_map" not in config:
        config["feature_map"] = "elu"
    return methods.method_fields(methods.method_config(row["method"], task, config))


def check_same_run(path: Path, label: str, new: str, then: dict, today: dict, head_dim: int) -> None:
    """The fields agree, and the feature maps are the same map on this model: ``random:num_features=32``
    and today's ``random`` (r = head dim) draw the same projection when the head dim is 32."""
    then_map, today_map = get_feature_map(then["feature_map"]), get_feature_map(today["feature_map"])
    same_map = (type(then_map) is type(today_map) and then_map.feature_dim(head_dim) == today_map.feature_dim(head_dim)
                and {**then_map.options(), "num_features": None} == {**today_map.options(), "num_features": None})
    rest = [name for name in today if name != "feature_map" and then.get(name) != today[name]]
    if rest or not same_map:
        raise SystemExit(f"{path}: {label} -> {new} is another run: {then} vs {today} (head dim {head_dim})")


def migrate(path: Path) -> bool:
    record = json.loads(path.read_text())
    if all("method_fields" in row for row in record["methods"].values()):
        return False
    task = record["suite"]["task"]
    suite = load_suite(str(ROOT / record["suite"]["file"]))
    specs = {v.label: v for v in map(parse_variant, suite.variants)}
    model = AutoConfig.from_pretrained(resolve_reference(suite.model), gguf_file=suite.gguf_file)
    head_dim = getattr(model, "head_dim", None) or model.hidden_size // model.num_attention_heads
    rows = {}
    for label, row in record["methods"].items():
        row = {**row, "method_fields": fields_then(row, task),
               "measured_by": {"command": record["command"], "machine": record["machine"]}}
        new = MOVES[label] if MOVES.get(label) in specs else label
        if new != label:
            variant = specs[new]
            today = variant_fields(variant, task)
            check_same_run(path, label, new, row["method_fields"], today, head_dim)
            row = {**row, "renamed_from": {"label": label, "config": row["config"], "method_fields": row["method_fields"]},
                   "config": parse_options(variant.config), "method_fields": today}
        rows[new] = row
    order = [label for label in specs if label in rows] + [label for label in rows if label not in specs]
    record["methods"] = {label: rows[label] for label in order}
    if record.get("best_ntk_variant") in MOVES and MOVES[record["best_ntk_variant"]] in specs:
        record["best_ntk_variant"] = MOVES[record["best_ntk_variant"]]
    record["lr_grid"] = {MOVES.get(k, k) if MOVES.get(k) in specs else k: v for k, v in record["lr_grid"].items()}
    record["suite"]["main_variants"] = suite.main_variants
    write_json(str(path), record)
    write_text(str(path.with_suffix(".md")), markdown_table(record))
    plot(record, str(path.with_suffix("")))
    print(f"{path.name}: rows now {list(record['methods'])}")
    return True


if __name__ == "__main__":
    changed = [path for path in sorted(RESULTS.glob("*.json")) if path.name != "suite.json" and migrate(path)]
    if changed:
        write_summary(str(RESULTS))
    print(f"{len(changed)} result files migrated")
