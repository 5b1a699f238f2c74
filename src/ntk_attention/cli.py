"""The ``ntk-attn`` command. Each subcommand lives in its own module, which defines
``add_arguments(parser)`` and ``run(args)``; modules are imported only when their command runs.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys

# (command words) -> (module, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("train",): ("ntk_attention.training.train", "fine-tune a model with one method (ntk, prefix, lora, ...: see --method) on HF Trainer"),
    ("eval",): ("ntk_attention.training.evaluate", "evaluate a saved adapter on a data file; prints JSON"),
    ("compare",): ("ntk_attention.training.compare", "run a grid of methods x learning rates x seeds; tables and plots"),
    ("bench", "op"): ("ntk_attention.bench.op", "operator speed and memory: NTK-Attention vs SDPA, naive, prefix"),
    ("bench", "generate"): ("ntk_attention.bench.generate", "decode speed and cache memory: base, NTK, prefix"),
    ("experiment", "approx-error"): ("ntk_attention.experiments.approx_error", "NTK vs exact prefix attention error against m and r"),
    ("experiment", "convergence"): ("ntk_attention.experiments.convergence", "ultra-long prefix training in the NTK regime"),
    ("experiment", "rank"): ("ntk_attention.experiments.rank", "low-rank Z and feature dimension: parameters against error"),
}


# Argument types shared by every command: a bad number is refused by the parser, naming the option,
# before any data or model is loaded.


def _number(text: str, kind, check, expected: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not (math.isfinite(value) and check(value)):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "an integer >= 1")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0, "a finite number > 0")


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """Find the command in argv and build only that command's parser."""
    for words, (module_name, help_text) in sorted(COMMANDS.items(), key=lambda kv: -len(kv[0])):
        if tuple(argv[: len(words)]) == words:
            parser = argparse.ArgumentParser(prog="ntk-attn " + " ".join(words), description=help_text)
            module = importlib.import_module(module_name)
            module.add_arguments(parser)
            parser.set_defaults(_run=module.run)
            return parser, argv[len(words):]
    return None, argv


def usage() -> str:
    lines = ["usage: ntk-attn COMMAND [options]   (ntk-attn COMMAND --help for its options)", "", "commands:"]
    for words, (_, help_text) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<26} {help_text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv:
        argv = ["train"]  # the main job: `ntk-attn` alone runs the embedded default
    parser, rest = build_parser(argv)
    if parser is None:
        print(f"ntk-attn: unknown command {' '.join(argv[:2])!r}\n\n{usage()}", file=sys.stderr)
        return 2
    args = parser.parse_args(rest)
    return int(args._run(args) or 0)


def console_main() -> int:
    """The console script: bad input (ValueError, TypeError, FileNotFoundError) becomes one line
    on stderr and exit code 2; NTK_ATTN_DEBUG=1 shows the traceback instead."""
    try:
        return main()
    except (ValueError, TypeError, FileNotFoundError) as err:
        if os.environ.get("NTK_ATTN_DEBUG"):
            raise
        print(f"ntk-attn: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(console_main())
