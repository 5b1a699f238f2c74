"""``ntk-attn eval --adapter DIR --data FILE``: score a folder written by ``ntk-attn train``.

The folder's ``training_run.json`` names the base model, task, method and columns, so nothing else
is needed. ``--model NAME_OR_DIR`` alone scores an untuned causal LM, the baseline of a comparison; with
``--adapter`` it names the base model to put the adapter on (the recorded one lives on another machine).
Prints one JSON object: ``accuracy`` and ``loss`` for (image) classification; ``loss`` (answer tokens only)
and ``exact_match`` of the final number, greedy decoding, for causal LM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import tempfile

import datasets
import torch
import transformers
from tqdm.auto import tqdm

from ..cli import positive_int
from ..io import write_json, write_jsonl
from . import data as D
from . import models as M
from .fit import DEFAULT_MAX_LENGTH, FitSettings, encode, make_trainer, peak_rss_mb, score
from .options import add_data_arguments

FINAL_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", help="folder written by ntk-attn train (<output-dir>/adapter)")
    parser.add_argument("--model", help="alone: an untuned causal LM (hub name or local folder) to score as a baseline; "
                                        "with --adapter: the base model to load it on instead of the recorded one")
    parser.add_argument("--gguf-file", default=None, help="with --model: GGUF file inside the model folder")
    parser.add_argument("--task", choices=("causal-lm", "language-modeling"), default="causal-lm",
                        help="with --model: what to score (language-modeling: perplexity over blocks of --max-length)")
    parser.add_argument("--data", required=True, help=".tsv/.csv/.jsonl/.json file or hub NAME[:CONFIG]:SPLIT")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--result-json", default=None, help="also write the JSON object to this file")
    parser.add_argument("--predictions", default=None, metavar="FILE.jsonl",
                        help="causal LM: write each generated answer, its final number and the reference's")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    add_data_arguments(parser)
    # Columns default to what the adapter was trained with (--model: the causal-lm defaults).
    parser.set_defaults(label_column=None, prompt_field=None, answer_field=None, image_column=None)


def final_number(text: str) -> str | None:
    """The number after the last ``####``, else the last number in the text; commas and a trailing
    ``.0`` dropped so that ``1,000`` and ``1000.0`` compare equal."""
    marked = FINAL_ANSWER.findall(text)
    found = marked or NUMBER.findall(text)
    if not found:
        return None
    value = found[-1].replace(",", "")
    return value[:-2] if value.endswith(".0") else value


@torch.no_grad()
def exact_match(model, tokenizer, table, columns: D.Columns, max_new_tokens: int, batch_size: int) -> tuple[dict, list[dict]]:
    """Greedy-decode an answer for every prompt and compare its final number with the reference's:
    ``({"exact_match", "generated"}, one record per row: prompt, reference, generated text, numbers, match)``."""
    model.eval()
    device = next(model.parameters()).device
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # decoders pad on the left
    predictions = []
    for start in tqdm(range(0, len(table), batch_size), desc="generate"):
        rows = table[start:start + batch_size]
        prompts = [{"input_ids": D.prompt_ids(tokenizer, prompt)} for prompt in rows[columns.prompt]]
        batch = tokenizer.pad(prompts, return_tensors="pt").to(device)
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        for prompt, answer, text in zip(rows[columns.prompt], rows[columns.answer], texts):
            expected, found = final_number(answer), final_number(text)
            predictions.append({"prompt": prompt, "reference": answer, "generated": text, "reference_number": expected,
                                "generated_number": found, "match": expected is not None and found == expected})
    tokenizer.padding_side = padding_side
    hits = sum(row["match"] for row in predictions)
    return {"exact_match": hits / len(table), "generated": len(table)}, predictions


def evaluate(args) -> dict:
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.adapter or args.model):
        raise ValueError("ntk-attn eval needs --adapter DIR, --model NAME_OR_DIR, or both")
    baseline = args.adapter is None
    run = base_run(args) if baseline else M.read_run(args.adapter)  # checked before loading anything heavy
    task = run["task"]
    columns = D.Columns(
        text=args.text_column, text_pair=args.text_pair_column or run.get("text_pair_column"),
        label=args.label_column or run.get("label_column", "label"),
        prompt=args.prompt_field or run.get("prompt_field", "question"),
        answer=args.answer_field or run.get("answer_field", "answer"),
        image=args.image_column or run.get("image_column", "image"),
    )
    table = D.load_table(args.data)
    if columns.text is None and run.get("text_column") in table.column_names:
        columns.text = run["text_column"]
    D.check_table(table, task, columns, args.data, run.get("num_labels"))
    table = D.first_rows(table, args.eval_size)

    model, tokenizer, run = (load_base_for_eval(args) if baseline
                             else M.load_trained(args.adapter, model=args.model, gguf_file=args.gguf_file))
    max_length = args.max_length or run.get("max_length") or DEFAULT_MAX_LENGTH[task]
    encoded = encode(table, tokenizer, task, columns, max_length, args.data)
    with tempfile.TemporaryDirectory() as scratch:
        settings = FitSettings(output_dir=scratch, task=task, learning_rate=1.0, head_learning_rate=1.0,
                               eval_batch_size=args.batch_size)
        trainer = make_trainer(model, tokenizer, settings, run.get("head_modules", []))
        result = {"adapter": args.adapter, "model": args.model or run["base_model"], "data": args.data, "method": run["method"],
                  "task": task, "rows": len(table), **score(trainer, encoded)}
    if task == "causal-lm":
        generate_rows = D.first_rows(table, args.generate_size)
        scores, predictions = exact_match(model, tokenizer, generate_rows, columns, args.max_new_tokens,
                                          args.generate_batch_size)
        result.update(scores)
        if args.predictions:
            write_jsonl(args.predictions, predictions)
    return {**result, "device": str(next(model.parameters()).device), "peak_rss_mb": peak_rss_mb()}


def base_run(args) -> dict:
    """The run record of an untuned model: a causal LM (a classifier's new head would be random)."""
    M.check_model_source(args.model, args.gguf_file)
    return {"base_model": args.model, "gguf_file": args.gguf_file, "task": args.task, "method": "none"}


def load_base_for_eval(args):
    tokenizer = M.load_tokenizer(args.model, args.gguf_file)
    model, _ = M.load_base(args.model, "causal-lm", gguf_file=args.gguf_file, pad_token_id=tokenizer.pad_token_id)
    return model.eval(), tokenizer, base_run(args)


def run(args) -> int:
    with contextlib.redirect_stdout(sys.stderr):  # Trainer's log lines; stdout carries the JSON alone
        result = evaluate(args)
    print(json.dumps(result))
    if args.result_json:
        write_json(args.result_json, result)
    return 0
