"""Pieces shared by the theory experiments: input distributions, the error measure, fitting
``(Z, k)`` by Adam, and atomic saving of JSON, tables and figures.

Everything here works on one head (``H = 1``): the experiments measure the operator, and heads are
independent in it.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..io import save_figure, write_json, write_text
from ..ops import FeatureMap, get_feature_map, ntk_attention, prefix_attention

DEFAULT_OUT = Path("runs/theory")  # never the repository's committed results unless named
INPUT_KINDS = ("uniform", "projected", "gaussian")
PREFIX_CHUNK = 4096  # prefix rows per step when scoring a long prefix


# ----------------------------------------------------------------------------------------------
# arguments


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT,
                        help=f"output folder (default {DEFAULT_OUT}; the committed results: benchmarks/results/theory)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    parser.add_argument("--quick", action="store_true", help="a small run (seconds) for CI and smoke tests")


def apply_quick(args: argparse.Namespace, add_arguments, quick: dict) -> None:
    """``--quick``: replace the options the user left at their defaults by the small settings ``quick``."""
    if not args.quick:
        return
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    for key, value in quick.items():
        if getattr(args, key) == defaults[key]:
            setattr(args, key, value)


def parse_feature_map(spec: str) -> FeatureMap:
    """A feature map from its spec (``elu``, ``taylor:1``, ``random:256``, ``random:num_features=256:seed=1``)."""
    if not isinstance(spec, str):
        raise TypeError(f"feature map spec must be a string such as 'elu', 'taylor:2' or 'random:256', got {spec!r}")
    return get_feature_map(spec)


def feature_map_label(fmap: FeatureMap) -> str:
    """Short label for tables and plots: the name and the primary option's value (``random:256``)."""
    primary = fmap.primary_option
    return f"{fmap.name}:{fmap.options()[primary]}" if primary else fmap.name


def check_prefix_lengths(lengths) -> list[int]:
    lengths = [int(m) for m in lengths]
    bad = [m for m in lengths if m < 1]
    if bad or not lengths:
        raise ValueError(f"prefix lengths m must be integers >= 1, got {lengths}")
    return lengths


# ----------------------------------------------------------------------------------------------
# inputs


@dataclass
class InputSampler:
    """Draws queries, keys and values of one head, and prefixes, from one of three distributions.

    - ``uniform``: every entry of q, k, v (and of the prefix keys and values) i.i.d. U[-1, 1]; keys and
      values independent of each other.
    - ``projected``: tokens x ~ N(0, I_d) mapped by fixed projections W_Q, W_K, W_V with N(0, 1/d)
      entries (drawn once per sampler), so entries are N(0, 1) and each token's value depends on
      its key - the case of a real layer.
    - ``gaussian``: every entry i.i.d. N(0, sigma^2) (the issue's independent check uses sigma = 0.5).
    """

    kind: str
    head_dim: int
    seed: int = 0
    sigma: float = 0.5
    dtype: torch.dtype = torch.float64
    generator: torch.Generator = field(init=False, repr=False)
    projections: torch.Tensor | None = field(init=False, repr=False, default=None)

    def __post_init__(self):
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"unknown input kind {self.kind!r}; expected one of {INPUT_KINDS}")
        if self.head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {self.head_dim}")
        self.generator = torch.Generator().manual_seed(self.seed)
        if self.kind == "projected":
            d = self.head_dim
            self.projections = self._randn(3, d, d) / math.sqrt(d)

    def _randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator, dtype=torch.float64)

    def _tokens(self, count: int, *lead) -> list[torch.Tensor]:
        """``count`` tensors of shape ``[*lead, d]``: q, k, v (count 3) or prefix k, v (count 2)."""
        d = self.head_dim
        if self.kind == "uniform":
            out = [2 * torch.rand(*lead, d, generator=self.generator, dtype=torch.float64) - 1 for _ in range(count)]
        elif self.kind == "gaussian":
            out = [self.sigma * self._randn(*lead, d) for _ in range(count)]
        else:
            x = self._randn(*lead, d)
            out = [x @ w for w in self.projections[3 - count:]]  # (q,) k, v share the token x
        return [t.to(self.dtype) for t in out]

    def qkv(self, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of shape ``[batch, 1, length, d]``."""
        return tuple(self._tokens(3, batch, 1, length))

    def prefix(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix keys and values of shape ``[1, m, d]``."""
        if m < 1:
            raise ValueError(f"prefix length m must be >= 1, got {m}")
        return tuple(self._tokens(2, 1, m))


# ----------------------------------------------------------------------------------------------
# closed form, reference outputs and the error measure


def prefix_share(input_log_mass: torch.Tensor, prefix_log_mass: torch.Tensor) -> torch.Tensor:
    """Each row's share of the attention mass held by the prefix, ``c_P / (c_P + c_X)``, from
    ``log c_X`` (the logsumexp of the row's scores over the input) and ``log c_P`` (over a real prefix
    the same logsumexp, for NTK-Attention ``log(phi(q)^T k)``); stable however large either is."""
    return torch.sigmoid(prefix_log_mass - input_log_mass)


def prefix_mass_share(q: torch.Tensor, k: torch.Tensor, prefix_k: torch.Tensor, chunk: int = PREFIX_CHUNK) -> float:
    """Mean over queries of the share of the softmax mass held by the exact prefix ``prefix_k``."""
    scale = q.shape[-1] ** -0.5
    lse_x = torch.logsumexp(scale * q @ k.transpose(-1, -2), dim=-1)
    lse_p = torch.logsumexp(
        torch.stack([torch.logsumexp(scale * q @ c.transpose(-1, -2), dim=-1) for c in prefix_k.split(chunk, 1)]), 0
    )
    return prefix_share(lse_x, lse_p).mean().item()


def no_prefix_attention(q, k, v) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def prefix_effect_error(approx: torch.Tensor, exact: torch.Tensor, no_prefix: torch.Tensor) -> dict:
    """``|approx - exact| / |no_prefix - exact|`` (Frobenius norms over the whole batch) and MSE.

    The relative error compares the approximation's miss with the size of what the prefix does:
    0 is exact, 1 is as bad as dropping the prefix.
    """
    diff = (approx - exact).double()
    effect = (no_prefix - exact).double().norm().item()
    return {
        "rel_error": diff.norm().item() / effect if effect > 0 else float("nan"),
        "mse": diff.pow(2).mean().item(),
    }


# ----------------------------------------------------------------------------------------------
# fitting (Z, k) by Adam


@dataclass
class FitConfig:
    steps: int = 300
    lr: float = 0.01
    clip: float = 1.0
    batch: int = 4
    length: int = 128
    rank: int | None = None  # None: full Z; s: Z = Z_A Z_B with Z_A [r, s], Z_B [s, d_v]


class NTKState(torch.nn.Module):
    """Trainable ``(Z, k)`` of one head, in units of the prefix length m.

    ``Z = m * zeta`` and ``k = m * kappa``: a prefix of m tokens has statistics that grow like m, and
    Adam's steps are of fixed size, so the parameters are kept O(1). Start: ``zeta = 0`` (no
    effect on the values) and ``kappa0``, the mean feature of keys from the input distribution: the
    denominator of a typical prefix of m tokens. (A start at 1% of it makes the output 100 times as
    sensitive to ``zeta`` once the prefix holds most of the mass; at m = 2^16 the first steps then
    blow the loss up to 1e4 and random features never recover.) With ``rank = s``, ``zeta = A @ B``
    (B = 0 at the start, A random), as in the paper's low-rank variant.
    """

    def __init__(self, fmap: FeatureMap, m: int, head_dim: int, value_dim: int, kappa0: torch.Tensor,
                 rank: int | None = None, generator: torch.Generator | None = None):
        super().__init__()
        r = fmap.feature_dim(head_dim)
        if rank is not None and not 1 <= rank <= min(r, value_dim):
            raise ValueError(f"rank s must be between 1 and min(r, d_v) = min({r}, {value_dim}), got {rank}")
        self.m = m
        self.kappa = torch.nn.Parameter(kappa0.detach().clone().reshape(1, r))
        if rank is None:
            self.zeta = torch.nn.Parameter(torch.zeros(1, r, value_dim, dtype=kappa0.dtype))
        else:
            a = torch.randn(1, r, rank, generator=generator, dtype=torch.float64) / math.sqrt(r)
            self.zeta_a = torch.nn.Parameter(a.to(kappa0.dtype))
            self.zeta_b = torch.nn.Parameter(torch.zeros(1, rank, value_dim, dtype=kappa0.dtype))
        self.rank = rank

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        zeta = self.zeta if self.rank is None else self.zeta_a @ self.zeta_b
        return self.m * zeta, self.m * self.kappa


def fit_ntk_state(sampler: InputSampler, prefix_k, prefix_v, fmap: FeatureMap, cfg: FitConfig, seed: int = 0):
    """Train ``(Z, k)`` by Adam so that NTK-Attention over fresh inputs matches the exact prefix attention.

    Every step draws new inputs from ``sampler`` (so this fits the operator, not a data set). Runs in
    float32; returns float64 ``(z, kvec)`` and the loss curve.
    """
    dt = torch.float32
    pk, pv = prefix_k.to(dt), prefix_v.to(dt)
    d, dv, m = pk.shape[-1], pv.shape[-1], pk.shape[1]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _, probe_k, _ = sampler.qkv(1, 256)
        kappa0 = fmap(probe_k.to(dt).reshape(-1, d), d**-0.5).mean(0)
    state = NTKState(fmap, m, d, dv, kappa0.to(dt), rank=cfg.rank, generator=gen)
    opt = torch.optim.Adam(state.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    losses = []
    for _ in range(cfg.steps):
        q, k, v = (t.to(dt) for t in sampler.qkv(cfg.batch, cfg.length))
        with torch.no_grad():
            target = prefix_attention(q, k, v, pk, pv)
        z, kvec = state()
        out = ntk_attention(q, k, v, z, kvec, feature_map=fmap)
        loss = (out - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(state.parameters(), cfg.clip)  # fresh inputs give rare huge steps
        opt.step()
        sched.step()
        losses.append(loss.item())
    with torch.no_grad():
        z, kvec = state()
    return z.double(), kvec.double(), losses


# ----------------------------------------------------------------------------------------------
# saving


def save_json(path: Path, obj) -> None:
    write_json(path, obj, indent=1)


def save_text(path: Path, text: str) -> None:
    write_text(path, text)


def save_outputs(stem: Path, result: dict, text: str, figures: dict) -> None:
    """Write ``stem.json`` (the result), ``stem.md`` (the table) and ``stem{suffix}.png`` for each
    ``{suffix: figure}``; print the table."""
    import matplotlib.pyplot as plt

    stem = Path(stem)
    save_json(stem.with_suffix(".json"), result)
    save_text(stem.with_suffix(".md"), text)
    for suffix, fig in figures.items():
        save_figure(stem.parent / f"{stem.name}{suffix}.png", fig)
        plt.close(fig)
    print(text)
    print(f"wrote {stem}.json, .md and {len(figures)} figure(s) in {stem.parent}")


def run_config(args: argparse.Namespace) -> dict:
    """The options of a run, JSON-able, for the result file."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")}


def new_figure(ncols: int, width: float = 5.0, height: float = 4.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, axes[0]


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(x):
        if isinstance(x, float):
            return "nan" if math.isnan(x) else f"{x:.3g}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
