"""Feature maps phi with e^{scale * q.k} ~ phi(q) . phi(k).

Every map takes the raw head vectors ``x [..., D]`` and the attention ``scale`` and returns
``phi(x) [..., r]``. ``r`` is known from the head dimension alone (``feature_dim``), so shapes of
``Z`` and ``k`` can be checked before anything runs. Features are computed in float32 at least:
a bfloat16 ``phi`` would lose the small prefix term next to the softmax sum.
"""

from __future__ import annotations

import math
from typing import Callable, Union

import torch
import torch.nn.functional as F

__all__ = [
    "FeatureMap",
    "EluFeatureMap",
    "TaylorFeatureMap",
    "RandomFeatureMap",
    "CallableFeatureMap",
    "get_feature_map",
    "FEATURE_MAP_NAMES",
]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class FeatureMap:
    """Base class. Subclasses define ``feature_dim`` and ``__call__``."""

    name: str = "custom"
    # True where phi(q).phi(k) >= 0 for all q, k (then c = phi(q)^T kvec >= 0 for a sum of phi(k)).
    nonnegative: bool = True

    def feature_dim(self, head_dim: int) -> int:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        raise NotImplementedError

    def to_config(self) -> dict:
        """A JSON-able description; ``get_feature_map(**cfg)`` rebuilds the same map."""
        return {"feature_map": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_config().items() if k != "feature_map")
        return f"{type(self).__name__}({args})"


class EluFeatureMap(FeatureMap):
    """The authors' map ``ELU(x * sqrt(scale)) + 1`` (``ELU(x / d^{1/4}) + 1`` at the default scale).

    Positive, ``r = D``. It is not proportional to the softmax kernel, so with it ``(Z, k)`` is a
    learned adapter rather than an approximation of a given prefix.
    """

    name = "elu"

    def feature_dim(self, head_dim: int) -> int:
        return head_dim

    def __call__(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        x = x.to(_compute_dtype(x))
        return F.elu(x * math.sqrt(scale)) + 1.0


class TaylorFeatureMap(FeatureMap):
    """Truncated Taylor features of ``exp(s)``, ``s = scale * q.k`` (the paper's polynomial method).

    degree 1: ``phi(q).phi(k) = 1 + s``             (r = 1 + D; can be negative)
    degree 2: ``phi(q).phi(k) = 1 + s + s^2 / 2``   (r = 1 + D + D(D+1)/2; always > 0)
    The degree-2 block stores each unordered pair once (symmetric packing), so r is D(D+1)/2 and
    not D^2.
    """

    name = "taylor"

    def __init__(self, degree: int = 2):
        if degree not in (1, 2):
            raise ValueError(f"TaylorFeatureMap: degree must be 1 or 2, got {degree!r}")
        self.degree = degree
        self.nonnegative = degree == 2

    def feature_dim(self, head_dim: int) -> int:
        r = 1 + head_dim
        if self.degree == 2:
            r += head_dim * (head_dim + 1) // 2
        return r

    def __call__(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        x = x.to(_compute_dtype(x)) * math.sqrt(scale)
        parts = [torch.ones_like(x[..., :1]), x]
        if self.degree == 2:
            d = x.shape[-1]
            rows, cols = torch.triu_indices(d, d, device=x.device)
            # s^2/2 = sum_i x_i^2 y_i^2 / 2 + sum_{i<j} x_i x_j y_i y_j
            weight = torch.where(rows == cols, math.sqrt(0.5), 1.0).to(x.dtype)
            parts.append(x[..., rows] * x[..., cols] * weight)
        return torch.cat(parts, dim=-1)

    def to_config(self) -> dict:
        return {"feature_map": self.name, "degree": self.degree}


class RandomFeatureMap(FeatureMap):
    """Positive random features (Performer / FAVOR+): ``exp(w.x - |x|^2 / 2) / sqrt(r)``.

    Unbiased for ``exp(scale * q.k)`` with ``x = q * sqrt(scale)``, ``w ~ N(0, I)``. The projection
    is drawn from ``seed`` on the CPU, so the same (seed, r, D) gives the same map on every device
    and after save/load without storing it.
    """

    name = "random"

    def __init__(self, num_features: int = 256, seed: int = 0):
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"RandomFeatureMap: num_features must be a positive int, got {num_features!r}")
        self.num_features = num_features
        self.seed = int(seed)
        self._cache: dict = {}

    def feature_dim(self, head_dim: int) -> int:
        return self.num_features

    def projection(self, head_dim: int, device, dtype) -> torch.Tensor:
        key = (head_dim, str(device), dtype)
        if key not in self._cache:
            gen = torch.Generator().manual_seed(self.seed)
            w = torch.randn(head_dim, self.num_features, generator=gen, dtype=torch.float64)
            self._cache[key] = w.to(device=device, dtype=dtype)
        return self._cache[key]

    def __call__(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        x = x.to(_compute_dtype(x)) * math.sqrt(scale)
        w = self.projection(x.shape[-1], x.device, x.dtype)
        log_phi = x @ w - 0.5 * (x * x).sum(-1, keepdim=True) - 0.5 * math.log(self.num_features)
        return torch.exp(log_phi)

    def to_config(self) -> dict:
        return {"feature_map": self.name, "num_features": self.num_features, "seed": self.seed}


class CallableFeatureMap(FeatureMap):
    """Wraps a user function ``fn(x) -> phi`` (or ``fn(x, scale)``) with a fixed feature size."""

    name = "callable"

    def __init__(self, fn: Callable, num_features: int | None = None, nonnegative: bool = False):
        self.fn = fn
        self.num_features = num_features
        self.nonnegative = nonnegative

    def feature_dim(self, head_dim: int) -> int:
        if self.num_features is not None:
            return self.num_features
        probe = self(torch.zeros(1, head_dim), 1.0)
        return probe.shape[-1]

    def __call__(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        try:
            out = self.fn(x, scale)
        except TypeError:
            out = self.fn(x)
        if not isinstance(out, torch.Tensor) or out.shape[:-1] != x.shape[:-1]:
            raise ValueError(
                "feature_map callable must return a tensor of shape [..., r] with the leading dims of "
                f"its input {tuple(x.shape[:-1])}, got {getattr(out, 'shape', type(out))}"
            )
        return out.to(torch.promote_types(out.dtype, torch.float32))

    def to_config(self) -> dict:
        raise ValueError("a callable feature map cannot be saved to a config; use a named feature map")


FEATURE_MAP_NAMES = ("elu", "taylor", "random")

FeatureMapLike = Union[str, FeatureMap, Callable]


def get_feature_map(feature_map: FeatureMapLike = "elu", **kwargs) -> FeatureMap:
    """Resolve a name (``"elu"``, ``"taylor"``, ``"random"``), a FeatureMap or a callable.

    kwargs go to the named map's constructor: ``degree`` for taylor, ``num_features`` and ``seed``
    for random.
    """
    if isinstance(feature_map, FeatureMap):
        if kwargs:
            raise ValueError(f"feature map options {sorted(kwargs)} given with an already built {feature_map!r}")
        return feature_map
    if isinstance(feature_map, str):
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        try:
            if feature_map == "elu":
                if kwargs:
                    raise TypeError(f"unexpected options {sorted(kwargs)}")
                return EluFeatureMap()
            if feature_map == "taylor":
                return TaylorFeatureMap(**kwargs)
            if feature_map == "random":
                return RandomFeatureMap(**kwargs)
        except TypeError as err:
            raise ValueError(f"feature_map={feature_map!r}: {err}") from None
        raise ValueError(f"unknown feature_map {feature_map!r}; expected one of {FEATURE_MAP_NAMES}, a FeatureMap or a callable")
    if callable(feature_map):
        return CallableFeatureMap(feature_map, **kwargs)
    raise TypeError(f"feature_map must be a name, a FeatureMap or a callable, got {type(feature_map).__name__}")
