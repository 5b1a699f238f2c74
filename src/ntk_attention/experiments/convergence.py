"""Training an ultra-long prefix in the NTK regime: does a longer prefix reach a lower loss?

The stylized setting of the paper: one attention layer with frozen projections, whose only trainable
part is a prefix of m tokens, fitted by full-batch gradient descent to a regression target. NTK
scaling: prefix keys ``K_P`` start N(0, I); prefix values are ``V_P = sqrt(m) * Theta`` with
``Theta`` N(0, I), so the output is O(1) at the start and each parameter moves O(1/sqrt(m)) - the
lazy regime in which the paper proves convergence to arbitrarily small loss as m grows.

    f(X) = a . mean_l Attn([K_P; X W_K], [V_P; X W_V])(x_l W_Q)        y ~ N(0, 1) per sample

NTK-Attention replaces the prefix with ``(Z, k)`` (for each feature map given), started from the
closed form of a prefix of the longest length drawn the same way, and is trained on the same task
with the same optimiser. Writes ``convergence_{gd,adam}.json``, ``.md`` and ``.png`` (loss curves, and
final loss against m).

    ntk-attn experiment convergence --quick
"""

from __future__ import annotations

import argparse
import math

import torch
from tqdm import tqdm

from .. import ntk_attention, prefix_attention, prefix_to_ntk
from ..cli import positive_float, positive_int
from .common import (
    apply_quick,
    InputSampler,
    add_output_arguments,
    check_prefix_lengths,
    feature_map_label,
    markdown_table,
    new_figure,
    parse_feature_map,
    run_config,
    save_outputs,
)

QUICK = dict(samples=16, length=8, head_dim=8, prefix_lengths=[1, 16, 256], steps=60, feature_maps=["elu", "taylor"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", "--n", dest="samples", type=positive_int, default=128, help="training samples n")
    parser.add_argument("--length", "--L", dest="length", type=positive_int, default=16, help="tokens per sample L")
    parser.add_argument("--head-dim", "--d", dest="head_dim", type=positive_int, default=16, help="head dimension d")
    parser.add_argument("--prefix-lengths", "--m", dest="prefix_lengths", type=int, nargs="+",
                        default=[1, 4, 16, 64, 256, 1024, 4096], help="prefix lengths m")
    parser.add_argument("--steps", type=positive_int, default=1000, help="full-batch steps")
    parser.add_argument("--optimizer", choices=("gd", "adam"), default="gd",
                        help="gd: full-batch gradient descent (the theory's setting); adam: Adam on the full batch")
    parser.add_argument("--lr", type=positive_float, default=1.0, help="step size (all models)")
    parser.add_argument("--feature-maps", nargs="+", default=["elu", "taylor"],
                        help="feature maps of the NTK-Attention comparison (elu, taylor[:degree], random:R)")
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    experiment(args)
    return 0


class Task:
    """Frozen one-layer attention data: inputs projected to q, k, v, a readout a, targets y."""

    def __init__(self, samples: int, length: int, head_dim: int, seed: int):
        sampler = InputSampler("projected", head_dim, seed=seed, dtype=torch.float32)
        self.q, self.k, self.v = sampler.qkv(samples, length)
        gen = sampler.generator
        self.readout = (torch.randn(head_dim, generator=gen, dtype=torch.float64) / math.sqrt(head_dim)).float()
        self.y = torch.randn(samples, generator=gen, dtype=torch.float64).float()
        self.generator = gen

    def predict(self, attn_out: torch.Tensor) -> torch.Tensor:
        return attn_out[:, 0].mean(-2) @ self.readout

    def loss(self, attn_out: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.predict(attn_out) - self.y).pow(2).mean()


def initial_prefix(task: Task, m: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NTK initialisation: keys N(0, I), values Theta N(0, I) (scaled by sqrt(m) in the forward)."""
    keys = torch.randn(1, m, head_dim, generator=task.generator, dtype=torch.float64).float()
    theta = torch.randn(1, m, head_dim, generator=task.generator, dtype=torch.float64).float()
    return keys, theta


def train(forward, params: list[torch.Tensor], args) -> list[float]:
    """Full-batch gradient descent (or Adam); returns the loss before each step and after the last."""
    opt = (torch.optim.SGD if args.optimizer == "gd" else torch.optim.Adam)(params, lr=args.lr)
    curve = []
    for _ in range(args.steps):
        loss = forward()
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(loss.item())
        if not math.isfinite(curve[-1]):
            break
    with torch.no_grad():
        curve.append(forward().item())
    return curve


def train_prefix(task: Task, m: int, args) -> list[float]:
    keys, theta = initial_prefix(task, m, args.head_dim)
    keys.requires_grad_(True)
    theta.requires_grad_(True)

    def forward():
        out = prefix_attention(task.q, task.k, task.v, keys, math.sqrt(m) * theta)
        return task.loss(out)

    return train(forward, [keys, theta], args)


def train_ntk(task: Task, fmap, m: int, args) -> list[float]:
    """(Z, k) in per-prefix-token units (Z = m zeta, k = m kappa) so that one step size suits all models,
    started from the closed form of a fresh NTK-initialised prefix of length m."""
    keys, theta = initial_prefix(task, m, args.head_dim)
    z0, k0 = prefix_to_ntk(keys, math.sqrt(m) * theta, feature_map=fmap)
    zeta = (z0 / m).float().requires_grad_(True)
    kappa = (k0 / m).float().requires_grad_(True)

    def forward():
        out = ntk_attention(task.q, task.k, task.v, m * zeta, m * kappa, feature_map=fmap)
        return task.loss(out)

    return train(forward, [zeta, kappa], args)


def experiment(args: argparse.Namespace) -> dict:
    """Train every model, save and return ``{"config", "runs"}``."""
    apply_quick(args, add_arguments, QUICK)
    args.prefix_lengths = check_prefix_lengths(args.prefix_lengths)
    fmaps = [parse_feature_map(spec) for spec in args.feature_maps]
    task = Task(args.samples, args.length, args.head_dim, args.seed)
    d, m_max = args.head_dim, max(args.prefix_lengths)
    runs = []
    for m in tqdm(args.prefix_lengths, desc="convergence: prefix"):
        curve = train_prefix(task, m, args)
        runs.append({"model": "prefix", "m": m, "params": 2 * m * d, "curve": curve, "final_loss": curve[-1]})
    for fmap in fmaps:
        r = fmap.feature_dim(d)
        curve = train_ntk(task, fmap, m_max, args)
        runs.append({"model": f"ntk {feature_map_label(fmap)}", "m": m_max, "params": r * d + r, "curve": curve,
                     "final_loss": curve[-1]})
    result = {"config": run_config(args), "runs": runs}
    save_outputs(args.out_dir / f"convergence_{args.optimizer}", result, table(runs, args),
                 {"": plot(runs)})
    return result


def table(runs: list[dict], args) -> str:
    head = (f"One-layer attention, n = {args.samples} samples, L = {args.length}, d = {args.head_dim}, random targets, "
            f"{args.steps} full-batch steps of {args.optimizer} (lr {args.lr}). NTK rows start from the closed form "
            f"of a prefix of length {max(args.prefix_lengths)}.\n\n")
    rows = [[r["model"], r["m"] if r["model"] == "prefix" else "-", r["params"], r["curve"][0], r["final_loss"]]
            for r in runs]
    return head + markdown_table(["model", "m", "trainable parameters", "initial loss", "final loss"], rows)


def plot(runs: list[dict]):
    fig, (ax_curve, ax_final) = new_figure(2)
    prefix = [r for r in runs if r["model"] == "prefix"]
    for i, r in enumerate(prefix):
        ax_curve.plot(r["curve"], color=f"C{i}", label=f"prefix m={r['m']}")
    for r in runs:
        if r["model"] != "prefix":
            ax_curve.plot(r["curve"], "k--" if "elu" in r["model"] else "k:", label=r["model"])
            ax_final.axhline(r["final_loss"], ls="--" if "elu" in r["model"] else ":", color="k", label=r["model"])
    ax_curve.set(yscale="log", xlabel="full-batch step", ylabel="training loss", title="loss curves")
    ax_curve.legend(fontsize=7)
    ax_final.plot([r["m"] for r in prefix], [r["final_loss"] for r in prefix], "-o", label="prefix")
    ax_final.set(xscale="log", yscale="log", xlabel="prefix length m", ylabel="final training loss",
                 title="final loss against prefix length")
    ax_final.legend(fontsize=7)
    for ax in (ax_curve, ax_final):
        ax.grid(True, which="both", alpha=0.3)
    return fig
