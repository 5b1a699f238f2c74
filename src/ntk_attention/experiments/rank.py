"""Parameters against error: the feature dimension r and a low-rank ``Z = Z_A Z_B`` (rank s).

At the operator level: one prefix of length m, and NTK-Attention with ``(Z, k)`` of each feature map
whose ``Z`` has rank s, obtained (a) from the closed form truncated by SVD (the best rank-s ``Z`` in
Frobenius norm, not necessarily in output error) and (b) trained by Adam with ``Z = Z_A Z_B`` on fresh
inputs. Parameters per head: ``r s + s d_v + r`` (``r d_v + r`` at full rank); the prefix itself has
``2 m d``. Writes ``rank.json``, ``rank.md`` and ``rank.png``.

    ntk-attn experiment rank --quick
"""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from .. import ntk_attention, prefix_attention, prefix_to_ntk
from ..cli import non_negative_int, positive_float, positive_int
from .common import (
    apply_quick,
    INPUT_KINDS,
    FitConfig,
    InputSampler,
    add_output_arguments,
    feature_map_label,
    fit_ntk_state,
    markdown_table,
    new_figure,
    no_prefix_attention,
    parse_feature_map,
    prefix_effect_error,
    run_config,
    save_outputs,
)

QUICK = dict(head_dim=16, length=32, prefix_length=64, ranks=[1, 4, 16], feature_maps=["elu", "random:64"],
             batch=2, train_steps=20)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--head-dim", "--d", dest="head_dim", type=positive_int, default=64, help="head dimension d")
    parser.add_argument("--length", "--L", dest="length", type=positive_int, default=128, help="input length L")
    parser.add_argument("--prefix-length", "--m", dest="prefix_length", type=positive_int, default=1024,
                        help="prefix length m")
    parser.add_argument("--ranks", "--s", dest="ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64],
                        help="ranks s of Z = Z_A Z_B (each at most min(r, d))")
    parser.add_argument("--feature-maps", nargs="+", default=["elu", "random:256", "random:1024", "taylor"],
                        help="elu, taylor[:degree], random:num_features")
    parser.add_argument("--inputs", choices=INPUT_KINDS, default="projected", help="input distribution")
    parser.add_argument("--batch", type=positive_int, default=4, help="held-out input sequences")
    parser.add_argument("--train-steps", type=non_negative_int, default=300, help="Adam steps for the trained Z_A, Z_B, k; 0 skips")
    parser.add_argument("--train-lr", type=positive_float, default=0.01)
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    experiment(args)
    return 0


def truncate(z: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-``rank`` approximation of each head's ``Z`` (Eckart-Young)."""
    u, s, vh = torch.linalg.svd(z, full_matrices=False)
    return u[..., :rank] * s[..., None, :rank] @ vh[..., :rank, :]


def check_ranks(ranks, fmaps, head_dim: int) -> None:
    for fmap in fmaps:
        r = fmap.feature_dim(head_dim)
        bad = [s for s in ranks if not 1 <= s <= min(r, head_dim)]
        if bad:
            raise ValueError(f"ranks {bad} do not fit feature map {feature_map_label(fmap)}: Z is r x d_v = "
                             f"{r} x {head_dim}, so the rank s must be between 1 and {min(r, head_dim)}")


def experiment(args: argparse.Namespace) -> dict:
    """Measure, save and return ``{"config", "rows"}``."""
    apply_quick(args, add_arguments, QUICK)
    d, m = args.head_dim, args.prefix_length
    fmaps = [parse_feature_map(spec) for spec in args.feature_maps]
    check_ranks(args.ranks, fmaps, d)
    sampler = InputSampler(args.inputs, d, seed=args.seed)
    q, k, v = sampler.qkv(args.batch, args.length)
    prefix_k, prefix_v = sampler.prefix(m)
    exact = prefix_attention(q, k, v, prefix_k, prefix_v)
    no_prefix = no_prefix_attention(q, k, v)
    rows = []
    for fmap in tqdm(fmaps, desc="rank"):
        r = fmap.feature_dim(d)
        label = feature_map_label(fmap)
        z, kvec = prefix_to_ntk(prefix_k, prefix_v, feature_map=fmap)
        out = ntk_attention(q, k, v, z, kvec, feature_map=fmap)
        rows.append({"feature_map": label, "r": r, "rank": None, "method": "closed_form", "params": r * d + r,
                     **prefix_effect_error(out, exact, no_prefix)})
        for s in args.ranks:
            params = r * s + s * d + r
            out = ntk_attention(q, k, v, truncate(z, s), kvec, feature_map=fmap)
            rows.append({"feature_map": label, "r": r, "rank": s, "method": "closed_form_svd", "params": params,
                         **prefix_effect_error(out, exact, no_prefix)})
            if args.train_steps > 0:
                cfg = FitConfig(steps=args.train_steps, lr=args.train_lr, batch=args.batch, length=args.length, rank=s)
                z_fit, k_fit, _ = fit_ntk_state(sampler, prefix_k, prefix_v, fmap, cfg, seed=args.seed)
                out = ntk_attention(q, k, v, z_fit, k_fit, feature_map=fmap)
                rows.append({"feature_map": label, "r": r, "rank": s, "method": "trained", "params": params,
                             **prefix_effect_error(out, exact, no_prefix)})
    result = {"config": run_config(args), "prefix_params": 2 * m * d, "rows": rows}
    save_outputs(args.out_dir / "rank", result, table(rows, args), {"": plot(rows, 2 * m * d)})
    return result


def table(rows: list[dict], args) -> str:
    head = (f"Relative error of the prefix effect against parameters per head; prefix m = {args.prefix_length} "
            f"({2 * args.prefix_length * args.head_dim} parameters), d = {args.head_dim}, L = {args.length}, "
            f"inputs {args.inputs}. 'full' = closed form at full rank.\n\n")
    body = [[r["feature_map"], r["r"], r["rank"] or "full", r["method"], r["params"], r["rel_error"], r["mse"]]
            for r in rows]
    return head + markdown_table(["feature map", "r", "rank s", "method", "parameters", "rel. error", "MSE"], body)


def plot(rows: list[dict], prefix_params: int):
    fig, (ax,) = new_figure(1, width=6.5, height=4.5)
    maps = sorted({r["feature_map"] for r in rows})
    for i, fmap in enumerate(maps):
        for method, style in (("closed_form_svd", "-o"), ("trained", "--x")):
            pts = sorted((r["params"], r["rel_error"]) for r in rows if r["feature_map"] == fmap and r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), style, color=f"C{i}", ms=4,
                        label=f"{fmap} ({'SVD of closed form' if method == 'closed_form_svd' else 'trained Z_A Z_B'})")
    ax.axvline(prefix_params, color="gray", ls=":", label="the prefix's own parameters")
    ax.set(xscale="log", yscale="log", xlabel="parameters per head (r s + s d + r)",
           ylabel="|NTK - prefix| / |no prefix - prefix|", title="rank s of Z and feature dimension r")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return fig
