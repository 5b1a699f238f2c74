"""Benchmark suites: one TOML file per task, the home of a comparison (``ntk-attn compare --suite FILE``).

A suite file names the data and how to read it, the model, the budget, the variants with their
learning-rate grids, and the seeds; see ``benchmarks/suites/README.md`` for every field. The data is
read from ``--data-root`` (default ``$NTK_ATTN_DATA``, else ``../shared/data``), turned into the
columns ``ntk-attn train`` reads, and written once to ``<work-dir>/<name>/data/`` (train and
reported split); the reported split is never used to choose anything. An ``image-classification``
suite names a tar archive in ImageFolder layout and a split in it (``ARCHIVE:SPLIT``) and the classes
it keeps (``label_names``, in label order); only the images the budget needs are extracted, into
``<work-dir>/<name>/data/images/``.

After each suite run ``<out-dir>/suite.json`` and ``suite.md`` are rebuilt from every suite result in
``<out-dir>``: per task the metric, the model and per variant its method, trainable parameters
(besides the new head) and mean and standard deviation over seeds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import statistics
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

if sys.version_info >= (3, 11):
    import tomllib
else:  # the project supports 3.10, whose standard library has no TOML reader
    import tomli as tomllib

from ..io import save_figure, write_json, write_text
from .compare.report import format_rates, grid_edge, missing_rates, validation_score
from .plots import draw_methods

# metric -> (what train/compare report it from, higher is better)
METRICS = {"accuracy": True, "mcc": True, "perplexity": False, "exact_match": True, "loss": False}
TASKS = {"classification": ("accuracy", "mcc"), "causal-lm": ("exact_match", "loss"),
         "language-modeling": ("perplexity",), "image-classification": ("accuracy", "mcc")}
TOP_FIELDS = {"name", "title", "description", "task", "metric", "model", "gguf_file", "data", "budget", "variants", "lr_grid",
              "seeds", "main_variants", "ntk_adapter_max_params"}
DATA_FIELDS = {"train", "eval", "format", "columns", "text", "text_pair", "label", "label_names", "holdout",
               "prompt", "answer"}
BUDGET_FIELDS = {"train_size", "validation", "epochs", "batch_size", "head_lr", "max_length", "eval_size",
                 "max_new_tokens", "generate_size", "generate_batch_size"}


@dataclass
class Suite:
    path: str
    name: str
    description: str
    task: str
    metric: str
    model: str
    gguf_file: str | None
    data: dict
    budget: dict
    variants: list[str]
    lr_grid: dict[str, list[float]]
    seeds: list[int]
    main_variants: list[str] = field(default_factory=list)
    ntk_adapter_max_params: int | None = None
    title: str = ""  # the task's row in the cross-task table, e.g. "SST-2 accuracy (MiniLM-L6)"

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric]


def _fail(path, message: str):
    raise ValueError(f"suite {path}: {message}")


def load_suite(path: str) -> Suite:
    """Read and check a suite file; every error names the file and the field."""
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"suite file {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        _fail(path, f"not valid TOML ({err})")
    unknown = sorted(set(raw) - TOP_FIELDS)
    if unknown:
        _fail(path, f"unknown fields {unknown} (known: {sorted(TOP_FIELDS)})")
    for key in ("name", "task", "metric", "model", "data", "variants"):
        if key not in raw:
            _fail(path, f"field {key!r} is missing")
    task, metric = raw["task"], raw["metric"]
    if task not in TASKS:
        _fail(path, f"task must be one of {sorted(TASKS)}, got {task!r}")
    if metric not in TASKS[task]:
        _fail(path, f"metric for task {task!r} must be one of {TASKS[task]}, got {metric!r}")
    if not isinstance(raw["name"], str) or not re.fullmatch(r"[A-Za-z0-9._-]+", raw["name"]):
        _fail(path, f"name must be a plain file name, got {raw['name']!r}")
    if not isinstance(raw.get("title", ""), str) or "|" in raw.get("title", "") or "\n" in raw.get("title", ""):
        _fail(path, f"title must be one line of text without '|', got {raw['title']!r}")
    data = raw["data"]
    if not isinstance(data, dict) or "train" not in data:
        _fail(path, "[data] needs at least 'train'")
    unknown = sorted(set(data) - DATA_FIELDS)
    if unknown:
        _fail(path, f"[data] unknown fields {unknown} (known: {sorted(DATA_FIELDS)})")
    if "eval" not in data and "holdout" not in data:
        _fail(path, "[data] needs 'eval' (the reported split) or 'holdout' (carve it from 'train' with a seed)")
    if task == "image-classification":
        names = data.get("label_names")
        if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) and n and "/" not in n for n in names):
            _fail(path, "[data] label_names must list the archive's class folders to keep (at least 2), in label order")
        if "holdout" in data or not all(":" in str(data.get(key, "")) for key in ("train", "eval")):
            _fail(path, "[data] train and eval must be ARCHIVE:SPLIT (a tar archive of <split>/<class>/<image>)")
        if data["train"].rpartition(":")[2] == data["eval"].rpartition(":")[2]:
            _fail(path, "[data] train and eval name the same split; the reported images must be others")
    budget = raw.get("budget", {})
    unknown = sorted(set(budget) - BUDGET_FIELDS)
    if unknown:
        _fail(path, f"[budget] unknown fields {unknown} (known: {sorted(BUDGET_FIELDS)})")
    variants = raw["variants"]
    if not isinstance(variants, list) or not variants or not all(isinstance(v, str) for v in variants):
        _fail(path, "variants must be a non-empty list of LABEL=METHOD:KEY=VALUE strings")
    grid = raw.get("lr_grid", {})
    if not isinstance(grid, dict) or not all(isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)
                                             for v in grid.values()):
        _fail(path, "lr_grid must map a variant label or method to a list of learning rates")
    seeds = raw.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        _fail(path, f"seeds must be a non-empty list of integers, got {seeds!r}")
    labels = [v.partition("=")[0] if "=" in v else v for v in variants]
    missing = sorted(set(raw.get("main_variants", [])) - set(labels))
    if missing:
        _fail(path, f"main_variants {missing} are not among the variants' labels {labels}")
    return Suite(path=path, name=raw["name"], description=raw.get("description", ""), task=task, metric=metric,
                 model=raw["model"], gguf_file=raw.get("gguf_file"), data=data, budget=budget, variants=variants,
                 lr_grid={k: [float(x) for x in v] for k, v in grid.items()}, seeds=seeds,
                 main_variants=list(raw.get("main_variants", [])),
                 ntk_adapter_max_params=raw.get("ntk_adapter_max_params"), title=raw.get("title") or raw["name"])


def default_data_root() -> str:
    return os.environ.get("NTK_ATTN_DATA") or os.path.join("..", "shared", "data")


# ---------------------------------------------------------------- reading the data


def _read_rows(path: str, data: dict, suite_path: str) -> list[dict]:
    """Rows of a source file as dicts: JSON lines, a JSON array, TSV (with a header or ``columns``),
    or ``format = "wikitext-articles"`` (one row per ``= Title =`` article: title, text)."""
    if not os.path.isfile(path):
        _fail(suite_path, f"data file {path} does not exist (set --data-root or $NTK_ATTN_DATA)")
    fmt = data.get("format") or os.path.splitext(path)[1].lstrip(".")
    with open(path, encoding="utf-8") as handle:
        if fmt == "jsonl":
            return [json.loads(line) for line in handle if line.strip()]
        if fmt == "json":
            rows = json.load(handle)
            if not isinstance(rows, list):
                _fail(suite_path, f"{path}: expected a JSON array of objects")
            return rows
        if fmt == "tsv":
            lines = [line.rstrip("\n").split("\t") for line in handle if line.strip()]
            header = data.get("columns") or lines.pop(0)
            bad = next((i for i, line in enumerate(lines) if len(line) != len(header)), None)
            if bad is not None:
                _fail(suite_path, f"{path}: row {bad + 1} has {len(lines[bad])} fields, the header {len(header)}")
            return [dict(zip(header, line)) for line in lines]
        if fmt == "wikitext-articles":
            return _wikitext_articles(handle.read())
    _fail(suite_path, f"[data] format {fmt!r} is not one of jsonl, json, tsv, wikitext-articles")


def _wikitext_articles(text: str) -> list[dict]:
    """WikiText raw: an article starts at a line ``" = Title = "`` (one ``=``; ``= = Section = =`` is inside)."""
    articles = []
    for line in text.split("\n"):
        match = re.fullmatch(r" = ([^=].*) = ", line)
        if match:
            articles.append({"title": match.group(1), "lines": []})
        elif articles:
            articles[-1]["lines"].append(line)
    return [{"title": a["title"], "text": "\n".join(a["lines"]).strip()} for a in articles]


class _Template(string.Formatter):
    """``str.format`` over a row, where ``{x:g}`` also formats a number written as text ("43" -> 43)."""

    def format_field(self, value, format_spec):
        if format_spec.endswith("g") and isinstance(value, str):
            value = float(value)
        return super().format_field(value, format_spec)


def _label_id(value, names: list, source: str, row: int) -> int:
    for index, name in enumerate(names):
        if value == name or str(value).lower() == str(name).lower():
            return index
    raise ValueError(f"{source}, row {row + 1}: label {value!r} is not one of label_names {names}")


def _field(row: dict, names: str | list[str]) -> str:
    """The first of ``names`` the row has (splits of one data set may name a column differently)."""
    for name in [names] if isinstance(names, str) else names:
        if name in row:
            return name
    raise KeyError(names)


def canonical_rows(rows: list[dict], suite: Suite, source: str) -> list[dict]:
    """The columns ``ntk-attn train`` reads: text[, text_pair], label (classification); question, answer
    (causal-lm); text (language-modeling)."""
    data = suite.data
    out = []
    for i, row in enumerate(rows):
        try:
            if suite.task == "classification":
                item = {"text": str(row[_field(row, data.get("text", "text"))])}
                if "text_pair" in data:
                    item["text_pair"] = str(row[data["text_pair"]])
                value = row[data.get("label", "label")]
                item["label"] = _label_id(value, data["label_names"], source, i) if "label_names" in data else int(value)
            elif suite.task == "causal-lm":
                template = _Template()
                item = {"question": template.format(data.get("prompt", "{question}"), **row).strip(),
                        "answer": template.format(data.get("answer", "{answer}"), **row).strip()}
            else:
                item = {"text": str(row[_field(row, data.get("text", "text"))])}
        except KeyError as err:
            raise ValueError(f"{source}, row {i + 1}: no field {err} (fields: {sorted(row)})") from None
        out.append(item)
    return out


def image_rows(suite: Suite, data_root: str, folder: str) -> tuple[list[dict], list[dict]]:
    """Image classification: the training and reported images of ``label_names`` extracted from the
    archives into ``folder/images/``, as rows ``{"image": path relative to folder, "label"}``. As many
    training images as the budget's ``train_size`` plus its validation slice and ``eval_size``
    reported ones (all when not set), drawn with seed 0 as evenly over the classes as they allow."""
    from .data import archive_images

    budget, splits = suite.budget, []
    train_size, validation = budget.get("train_size"), budget.get("validation", 0.1)
    train_count = None
    if train_size is not None:  # the route carves round(validation * n) rows (a fraction) or that many
        train_count = train_size + int(validation) if validation >= 1 else math.ceil(train_size / (1 - validation))
        while validation < 1 and train_count - int(round(validation * train_count)) < train_size:
            train_count += 1
    for key, count in (("train", train_count), ("eval", budget.get("eval_size"))):
        archive, _, split = suite.data[key].rpartition(":")
        # images an earlier budget drew stay on disk (no row names them): deleting them could pull a file
        # from under another compare of this suite that is training now
        rows = archive_images(os.path.join(data_root, archive), split, suite.data["label_names"],
                              os.path.join(folder, "images"), count)
        splits.append([{"image": os.path.relpath(row["image"], folder), "label": row["label"]} for row in rows])
    return splits[0], splits[1]


def prepare_data(suite: Suite, data_root: str, folder: str) -> tuple[str, str]:
    """Write the suite's training rows and reported split as JSON lines into ``folder``; return both paths.
    Rewritten only when their content changes, so cached runs keep seeing the same files."""
    if suite.task == "image-classification":
        train_rows, eval_rows = image_rows(suite, data_root, folder)
    else:
        train_rows, eval_rows = _text_rows(suite, data_root)
    paths = []
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        path = os.path.join(folder, f"{split}.jsonl")
        text = "".join(json.dumps(row) + "\n" for row in rows)
        if not os.path.isfile(path) or Path(path).read_text() != text:
            write_text(path, text)
        paths.append(path)
    return paths[0], paths[1]


def _text_rows(suite: Suite, data_root: str) -> tuple[list[dict], list[dict]]:
    """The training rows and the reported split of a text task, in the columns ``ntk-attn train`` reads."""
    data = suite.data
    train_rows = _read_rows(os.path.join(data_root, data["train"]), data, suite.path)
    if "holdout" in data:
        holdout = data["holdout"]
        if set(holdout) != {"rows", "seed"} or not all(isinstance(holdout[k], int) for k in holdout):
            _fail(suite.path, "[data] holdout must be {rows = N, seed = S}")
        if not 0 < holdout["rows"] < len(train_rows):
            _fail(suite.path, f"[data] holdout rows {holdout['rows']} must be between 1 and {len(train_rows) - 1}")
        order = list(range(len(train_rows)))
        random.Random(holdout["seed"]).shuffle(order)
        reported = set(order[:holdout["rows"]])
        eval_rows = [row for i, row in enumerate(train_rows) if i in reported]
        train_rows = [row for i, row in enumerate(train_rows) if i not in reported]
    else:
        eval_rows = _read_rows(os.path.join(data_root, data["eval"]), data, suite.path)
    return tuple(canonical_rows(rows, suite, f"{data.get(split, data['train'])} ({split})")
                 for split, rows in (("train", train_rows), ("eval", eval_rows)))


def data_fingerprint(paths) -> str:
    """The prepared files' bytes, and those of the images their rows name (paths relative to the file)."""
    digest = hashlib.sha256()
    for path in paths:
        text = Path(path).read_bytes()
        digest.update(text)
        for line in text.splitlines():
            row = json.loads(line) if line.startswith(b"{") and b'"image"' in line else {}
            if isinstance(row.get("image"), str):
                digest.update(Path(os.path.dirname(path), row["image"]).read_bytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- the summary across tasks


def suite_records(out_dir: str):
    """``(file, record)`` for every task result of a suite in ``out_dir`` (JSONs with a ``suite`` field), by name."""
    for file in sorted(Path(out_dir).glob("*.json")):
        if file.name == "suite.json":
            continue
        record = json.loads(file.read_text())
        if record.get("suite"):
            yield file, record


def write_summary(out_dir: str) -> dict:
    """Rebuild ``suite.json`` and ``suite.md`` in ``out_dir`` from every suite result there."""
    tasks = {}
    for file, record in suite_records(out_dir):
        suite = record["suite"]
        metric = suite["metric"]
        methods = {}
        for label, m in record["methods"].items():
            methods[label] = {"method": m["method"], "trainable_params": m["trainable_params_excl_head"],
                              "mean": m[f"dev_{metric}"], "std": m[f"dev_{metric}_std"], "seeds": len(m["seeds"]) or 1,
                              "per_seed": m[f"dev_{metric}_per_seed"], "learning_rate": m["learning_rate"],
                              "config": m["config"], "grid_edge": grid_edge(m),
                              "rates_not_run": missing_rates(m, record.get("lr_grid", {}).get(label, [])),
                              "train_seconds": m["train_seconds"], "runs": training_runs(m)}
        tasks[suite["name"]] = {"title": suite.get("title") or suite["name"], "task": suite["task"], "metric": metric,
                                "higher_is_better": suite["higher_is_better"], "model": suite["model"], "file": file.name, "command": record["command"],
                                "main_variants": suite.get("main_variants", []), "methods": methods,
                                "ntk_vs_lora": ntk_against(record["methods"], suite["higher_is_better"], metric, "lora"),
                                "ntk_vs_prefix": ntk_against(record["methods"], suite["higher_is_better"], metric,
                                                             "prefix-m16", full_state_only=True)}
    summary = {"tasks": tasks}
    write_json(os.path.join(out_dir, "suite.json"), summary)
    write_text(os.path.join(out_dir, "suite.md"), lead_table(summary) + "\n" + summary_table(summary))
    if tasks:
        summary_plot(summary, os.path.join(out_dir, "suite.png"))
    return summary


def training_runs(row: dict) -> int:
    """How many training runs stand behind a result row: every rate of its grid at the first seed, then one
    run per further seed (none for the untuned model, which has no seeds)."""
    if not row["seeds"]:
        return 0
    return max(len(row.get("validation_grid") or {}), 1) + len(row["seeds"]) - 1


def ntk_against(methods: dict, higher_is_better: bool, metric: str, reference: str, full_state_only: bool = False,
                score: Callable[[dict], float] = validation_score) -> dict | None:
    """The issue's yardstick: the NTK variant at or under ``reference``'s parameter count (within 5%) that
    scores best on *validation* (first seed, best learning rate), and its reported mean minus the
    reference's (positive: NTK ahead, whichever way the metric points). None until both have run.

    ``full_state_only`` keeps NTK variants whose trainable count is their decode state (no ``rank``):
    against a prefix without a projection, whose trainable count is its KV cache, that is a comparison
    at equal decode memory. ``score`` (higher is better) ranks the candidates; only
    ``benchmarks/selection_check.py`` passes another, to ask what a choice on the reported rows would give."""
    if reference not in methods:
        return None
    budget = methods[reference]["trainable_params_excl_head"]
    candidates = [(label, m) for label, m in methods.items()
                  if m["method"] == "ntk" and m["trainable_params_excl_head"] <= budget * 1.05
                  and not (full_state_only and (m.get("config") or {}).get("rank") is not None)]
    if not candidates:
        return None

    label, best = max(candidates, key=lambda item: score(item[1]))
    difference = best[f"dev_{metric}"] - methods[reference][f"dev_{metric}"]
    return {"ntk": label, "ntk_params": best["trainable_params_excl_head"], "reference": reference,
            "reference_params": budget, "difference": difference if higher_is_better else -difference}


def summary_plot(summary: dict, path: str) -> None:
    """One panel per task: the reported metric against trainable parameters besides the head (log x), one
    colour per method family; variants without trainable parameters (head only, untuned) as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = summary["tasks"]
    columns = min(3, len(tasks))
    rows = -(-len(tasks) // columns)
    figure, panels = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows), squeeze=False)
    for axes, (name, task) in zip(panels.flat, tasks.items()):
        points = [(label, m["method"], m["trainable_params"], m["mean"], m["std"]) for label, m in task["methods"].items()]
        draw_methods(axes, points, log_x=True, fontsize=7)
        axes.set_title(f"{name} ({task['metric']}, {'higher' if task['higher_is_better'] else 'lower'} is better)", fontsize=9)
        axes.set_xlabel("trainable parameters besides the head", fontsize=8)
    for axes in list(panels.flat)[len(tasks):]:
        axes.set_visible(False)
    figure.tight_layout()
    save_figure(path, figure)
    plt.close(figure)


TASK_ORDER = ("classification", "language-modeling", "causal-lm", "image-classification")  # the lead table's row order


def _short_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{round(n / 1e3)}k" if n >= 1000 else str(n)


def _digits(task: dict) -> int:
    return 2 if task["metric"] == "perplexity" else 3


def _cell(task: dict, label: str, seed_zero_note: bool = True) -> str:
    """``mean ± std (params, notes)`` of one row of a task; a mean over fewer seeds than the task's fullest row
    says how many, and (with ``seed_zero_note``) a single-seed trained row says "seed 0"."""
    m, digits = task["methods"].get(label), _digits(task)
    if m is None:
        return ""
    value, notes = f"{m['mean']:.{digits}f}", [_short_count(m["trainable_params"])] if m["trainable_params"] else []
    if m["seeds"] > 1:
        value += f" ± {m['std']:.{digits}f}"
        if m["seeds"] < max(row["seeds"] for row in task["methods"].values()):
            notes.append(f"{m['seeds']} seeds")  # a main row still short of the task's seeds
    elif seed_zero_note and m["method"] not in ("base", "head"):
        notes.append("seed 0")
    return value + (f" ({', '.join(notes)})" if notes else "")


def _task_order(tasks: dict) -> list[str]:
    return sorted(tasks, key=lambda name: (TASK_ORDER.index(tasks[name]["task"]), name))


def lead_table(summary: dict) -> str:
    """The README's table: one row per task (its title), the suites' main labels (``base`` or ``head``,
    ``lora``, ``prefix-m16``, ``ntk``, ``full``) and the two NTK yardsticks; mean ± std over seeds ("seed 0"
    for one, "N seeds" for fewer than the task's fullest row), trainable parameters besides a new head in brackets."""
    lines = ["| task | untuned / head only | LoRA r = 8 | prefix m = 16 | NTK default | best NTK at or under LoRA's "
             "count (on validation) | NTK minus LoRA (+: NTK ahead) | best NTK at prefix m = 16's decode memory, minus "
             "prefix (+: NTK ahead) | "
             "full fine-tuning |", "|---|---|---|---|---|---|---|---|---|"]
    tasks = summary["tasks"]
    for name in _task_order(tasks):
        task = tasks[name]
        digits = _digits(task)
        lora, prefix = task.get("ntk_vs_lora"), task.get("ntk_vs_prefix")
        cells = [task["title"], _cell(task, "base") or _cell(task, "head"), _cell(task, "lora"),
                 _cell(task, "prefix-m16"), _cell(task, "ntk"),
                 f"{lora['ntk']}: {_cell(task, lora['ntk'])}" if lora else "",
                 f"**{lora['difference']:+.{digits}f}**" if lora else "",
                 f"{prefix['ntk']}: **{prefix['difference']:+.{digits}f}**" if prefix else "no NTK variant that small",
                 _cell(task, "full")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


FAMILY_ORDER = ("base", "head", "lora", "prefix", "ntk", "full")  # the variant table's row groups


def variant_table(summary: dict) -> str:
    """Every point of every task's curve: one row per variant label, grouped by method and ordered by size
    (the median over tasks of its trainable count over LoRA r = 8's), one column per task. A cell is the
    mean (± std over seeds; seed 0 alone otherwise) and the trainable count besides a new head; ``*`` marks
    a learning rate chosen at an edge of its grid."""
    tasks = summary["tasks"]
    order = _task_order(tasks)
    sizes = {}
    for task in tasks.values():
        lora = task["methods"].get("lora", {}).get("trainable_params")
        for label, m in task["methods"].items():
            sizes.setdefault(label, (m["method"], []))[1].append(m["trainable_params"] / lora if lora else 0.0)
    labels = sorted(sizes, key=lambda label: (FAMILY_ORDER.index(sizes[label][0]), statistics.median(sizes[label][1]), label))
    header = [f"{name} ({tasks[name]['metric']}{'' if tasks[name]['higher_is_better'] else ', lower is better'})" for name in order]
    lines = ["| variant | " + " | ".join(header) + " |", "|---|" + "---|" * len(order)]
    for label in labels:
        cells = []
        for name in order:
            cell = _cell(tasks[name], label, seed_zero_note=False)
            edge = tasks[name]["methods"].get(label, {}).get("grid_edge") in ("lower edge", "upper edge")
            cells.append(cell + (" *" if edge else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_table(summary: dict) -> str:
    """``variant_table``, then what could still move its rows: learning rates at an edge of their grid, and
    rates of the suite files' grids not run yet."""
    tasks = summary["tasks"]
    lines = [variant_table(summary).rstrip("\n"), "",
             "Cells: mean ± std over seeds (a mean without ± is seed 0 alone), trainable parameters besides a new "
             "classification head in brackets; * the learning rate sits at an edge of its grid. Each task's command "
             "is in its own JSON (`file`)."]
    edges = [f"{name} {label} ({m['learning_rate']:g}, {m['grid_edge']})" for name, t in tasks.items()
             for label, m in t["methods"].items() if m.get("grid_edge")]
    if edges:
        lines += ["", "Learning rates chosen at an edge of their grid, or from a grid of one rate (a wider grid "
                  "could still move these rows): " + "; ".join(edges) + "."]
    not_run = [f"{name} {label} ({format_rates(m['rates_not_run'])})" for name, t in tasks.items()
               for label, m in t["methods"].items() if m.get("rates_not_run")]
    if not_run:
        lines += ["", "Rates of the suite files' grids not run yet (these rows were chosen among the others): "
                  + "; ".join(not_run) + "."]
    hours = {name: sum(m["train_seconds"] * m["runs"] for m in t["methods"].values()) / 3600 for name, t in tasks.items()}
    lines += ["", f"Training behind these rows: about {sum(hours.values()):.0f} core-hours ("
              + ", ".join(f"{name} {hours[name]:.1f}" for name in _task_order(tasks))
              + "): each row's train seconds at its chosen rate times its runs (every rate of its grid at the first "
              "seed, one run per further seed), on the machine in each task's JSON; scoring, generation and data "
              "preparation not counted."]
    return "\n".join(lines) + "\n"
