"""Command-line options of ``ntk-attn train`` declared once: ``compare`` forwards exactly these to
every train run, and ``eval`` shares the column options.

Every number is checked by the parser (``cli.positive_int`` ...), so ``--epochs 0`` or ``--threads 0``
is refused, naming the option, before any data or model is loaded.
"""

from __future__ import annotations

import argparse
import json

from ..cli import non_negative_int, positive_float, positive_int
from . import data as D


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Column and evaluation options shared with ``ntk-attn eval``."""
    group = parser.add_argument_group("columns")
    group.add_argument("--text-column", default=None, help="classification / language-modeling text column (default: the only column besides the label)")
    group.add_argument("--text-pair-column", default=None, help="classification: second text of a sentence pair (e.g. hypothesis)")
    group.add_argument("--label-column", default="label", help="integer class label column (default: label)")
    group.add_argument("--image-column", default="image",
                       help="image-classification: column of image file paths, relative to the data file's folder (default: image)")
    group.add_argument("--prompt-field", default="question", help="causal-lm prompt field (default: question)")
    group.add_argument("--answer-field", default="answer", help="causal-lm answer field (default: answer)")
    group.add_argument("--max-length", type=positive_int, default=None, help="truncate inputs to this many tokens (default 128, causal-lm 512; language-modeling: the block length, 256)")
    group.add_argument("--eval-size", type=positive_int, default=None, help="use only the first N rows of the evaluation data")
    group.add_argument("--max-new-tokens", type=positive_int, default=256, help="causal-lm: greedy decoding length for exact match")
    group.add_argument("--generate-size", type=positive_int, default=None,
                       help="causal-lm: exact match on only the first N evaluation rows (generation is the slow part; default: all)")
    group.add_argument("--generate-batch-size", type=positive_int, default=32,
                       help="causal-lm: prompts decoded at a time (on CPU a decode step costs about the same for 1 or 32 rows)")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The data, model and budget options of a train run (everything but the method, its learning
    rates, the seed and the output): the options ``compare`` passes on to each run."""
    group = parser.add_argument_group("data")
    group.add_argument("--data", default=None, help="training data: .tsv/.csv/.jsonl/.json file or hub NAME[:CONFIG]:SPLIT (default: embedded SST-2 sample)")
    group.add_argument("--eval-data", default=None, help="the reported split (default: embedded SST-2 dev sample when --data is not given)")
    group.add_argument("--task", choices=("auto",) + D.TASKS, default="auto", help="default: from the columns")
    group.add_argument("--num-labels", type=positive_int, default=None,
                       help="classification: number of classes K (default: the largest label + 1, and every class "
                            "0..K-1 must occur in the training data)")
    group.add_argument("--train-size", type=positive_int, default=None, help="train on at most N rows (after the validation slice is carved)")
    group.add_argument("--validation", type=positive_float, default=0.1, help="validation slice of the training data: fraction (<1) or row count (default 0.1)")
    group.add_argument("--split-seed", type=non_negative_int, default=0, help="seed of the validation carve and the train subset")
    add_data_arguments(parser)
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, help="hub name or local folder (default: pip-installed MiniLM-L6)")
    group.add_argument("--gguf-file", default=None, help="GGUF file inside --model, de-quantised to float32 on load")
    group = parser.add_argument_group("budget")
    group.add_argument("--head-lr", type=positive_float, default=1e-2, help="learning rate of the classification head, every method but head (default 1e-2)")
    group.add_argument("--metric", choices=("accuracy", "mcc", "loss"), default=None,
                       help="what picks the learning rate and epoch on the validation slice (default: accuracy for "
                            "classification, loss otherwise; mcc = Matthews correlation)")
    group.add_argument("--epochs", type=positive_float, default=2.0, help="default 2")
    group.add_argument("--batch-size", type=positive_int, default=32, help="per process (default 32)")
    group.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=True, help="batch sentences of similar length (faster)")
    group.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")


def run_option_names() -> list[str]:
    """The ``dest`` of every option ``add_run_arguments`` declares."""
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return list(vars(parser.parse_args([])))


def forwarded_options(args: argparse.Namespace, names) -> list[str]:
    """``--name value`` (``--flag`` / ``--no-flag`` for booleans) for each of ``names`` set in ``args``."""
    words = []
    for name in names:
        value = getattr(args, name, None)
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            words += [flag, str(value)]
    return words


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
