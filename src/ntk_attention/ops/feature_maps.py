"""Feature maps phi with e^{scale * q.k} ~ phi(q) . phi(k).

Every map takes the raw head vectors ``x [..., D]`` and the attention ``scale`` and returns
``phi(x) [..., r]``. ``r`` is known from the head dimension alone (``feature_dim``), so shapes of
``Z`` and ``k`` can be checked before anything runs. Features are computed in float32 at least:
a bfloat16 ``phi`` would lose the small prefix term next to the softmax sum.
"""

from __future__ import annotations

import math
import re
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
    "register_feature_map",
    "feature_map_names",
]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class FeatureMap:
    """Base class. Subclasses define ``feature_dim`` and ``__call__``; named ones are registered with
    ``@register_feature_map(name)`` and take their options as constructor keywords (JSON scalars), which
    ``options()`` gives back so that ``spec()`` rebuilds the same map through ``get_feature_map``."""

    name: str = "custom"
    # True where phi(q).phi(k) >= 0 for all q, k (then c = phi(q)^T kvec >= 0 for a sum of phi(k)).
    nonnegative: bool = True
    # True where every component of phi(x) is >= 0, so that k = sum_j phi(kP_j) is >= 0 entry by entry
    # (the closed-form conversions store k unconstrained otherwise).
    positive_features: bool = True
    # The option a short spec "name:VALUE" sets (``"random:256"``), or None.
    primary_option: str | None = None

    def feature_dim(self, head_dim: int) -> int:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        raise NotImplementedError

    def options(self) -> dict:
        """The constructor keywords that rebuild this map (none by default)."""
        return {}

    def spec(self) -> str:
        """The canonical spec string: ``get_feature_map(fmap.spec())`` builds the same map."""
        if _REGISTRY.get(self.name) is not type(self):
            raise ValueError(f"{type(self).__name__} is not registered under its name {self.name!r} "
                             "(use @register_feature_map): it cannot be written to a config")
        return ":".join([self.name] + [f"{k}={_format_option(v)}" for k, v in sorted(self.options().items())])

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({args})"


_REGISTRY: dict[str, type[FeatureMap]] = {}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def register_feature_map(name: str):
    """Class decorator: make a FeatureMap subclass available by ``name`` to ``get_feature_map`` and
    ``NTKConfig(feature_map=...)``. Registering the same class again is a no-op; another class under a
    taken name is refused."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"feature map name must be an identifier-like string without ':' or '=', got {name!r}")

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, FeatureMap)):
            raise TypeError(f"register_feature_map({name!r}) decorates FeatureMap subclasses, got {cls!r}")
        known = _REGISTRY.get(name)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"feature map name {name!r} is already registered by {known.__module__}.{known.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def feature_map_names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def _format_option(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse_option(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_feature_map_spec(spec: str) -> tuple[str, dict]:
    """``"name:key=value:key=value"`` (or ``"name:VALUE"`` for the map's primary option) -> (name, options)."""
    name, *parts = spec.split(":")
    if name not in _REGISTRY:
        raise ValueError(f"unknown feature_map {name!r} in spec {spec!r}; registered: {list(feature_map_names())}")
    options = {}
    for i, part in enumerate(parts):
        key, eq, value = part.partition("=")
        if not eq:
            primary = _REGISTRY[name].primary_option
            if i or primary is None:
                raise ValueError(f"feature map spec {spec!r}: expected key=value after ':', got {part!r}")
            key, value = primary, part
        if not key or key in options:
            raise ValueError(f"feature map spec {spec!r}: empty or repeated option {key!r}")
        options[key] = _parse_option(value)
    return name, options


@register_feature_map("elu")
class EluFeatureMap(FeatureMap):
    """The authors' map ``ELU(x * sqrt(scale)) + 1`` (``ELU(x / d^{1/4}) + 1`` at the default scale).

    Positive, ``r = D``. It is not proportional to the softmax kernel, so with it ``(Z, k)`` is a
    learned adapter rather than an approximation of a given prefix.
    """

    def feature_dim(self, head_dim: int) -> int:
        return head_dim

    def __call__(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        x = x.to(_compute_dtype(x))
        return F.elu(x * math.sqrt(scale)) + 1.0


@register_feature_map("taylor")
class TaylorFeatureMap(FeatureMap):
    """Truncated Taylor features of ``exp(s)``, ``s = scale * q.k`` (the paper's polynomial method).

    degree 1: ``phi(q).phi(k) = 1 + s``             (r = 1 + D; can be negative)
    degree 2: ``phi(q).phi(k) = 1 + s + s^2 / 2``   (r = 1 + D + D(D+1)/2; always > 0)
    The degree-2 block stores each unordered pair once (symmetric packing), so r is D(D+1)/2 and
    not D^2.
    """

    positive_features = False
    primary_option = "degree"

    def __init__(self, degree: int = 2):
        if isinstance(degree, bool) or degree not in (1, 2):
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

    def options(self) -> dict:
        return {"degree": self.degree}


@register_feature_map("random")
class RandomFeatureMap(FeatureMap):
    """Positive random features (Performer / FAVOR+): ``exp(w.x - |x|^2 / 2) / sqrt(r)``.

    Unbiased for ``exp(scale * q.k)`` with ``x = q * sqrt(scale)``, ``w ~ N(0, I)``. The projection
    is drawn from ``seed`` on the CPU, so the same (seed, r, D) gives the same map on every device
    and after save/load without storing it. ``num_features`` None: r = D, the head dimension (as many
    as ``elu``, so the same adapter size).

    ``normalize=True`` keeps each query's weights across features and fixes their total:
    ``phi(x) / sum_f phi_f(x) * sqrt(r)``, i.e. ``sqrt(r) * softmax_f(w_f.x)``. Plain positive
    features are log-normal with variance ``|x|^2``: their sum has mean ``sqrt(r)`` but is tiny (and
    carried by one feature) for a query of large norm; normalised, the mass is ``sqrt(r)`` (that mean)
    for every query. It no longer estimates ``exp(scale * q.k)`` (``phi(q).phi(k)`` is then a
    product of two softmaxes); it is a feature map for a learned ``(Z, k)``.
    """

    primary_option = "num_features"

    def __init__(self, num_features: int | None = None, seed: int = 0, normalize: bool = False):
        if num_features is not None and (isinstance(num_features, bool) or not isinstance(num_features, int)
                                         or num_features < 1):
            raise ValueError(f"RandomFeatureMap: num_features must be a positive int or None (r = head dim), "
                             f"got {num_features!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"RandomFeatureMap: seed must be an int, got {seed!r}")
        if not isinstance(normalize, bool):
            raise ValueError(f"RandomFeatureMap: normalize must be true or false, got {normalize!r}")
        self.num_features = num_features
        self.seed = seed
        self.normalize = normalize
        self._cache: dict = {}

    def feature_dim(self, head_dim: int) -> int:
        return head_dim if self.num_features is None else self.num_features

    def projection(self, head_dim: int, device, dtype) -> torch.Tensor:
        key = (head_dim, str(device), dtype)
        if key not in self._cache:
            gen = torch.Generator().manual_seed(self.seed)
            w = torch.randn(head_dim, self.feature_dim(head_dim), generator=gen, dtype=torch.float64)
            self._cache[key] = w.to(device=device, dtype=dtype)
        return self._cache[key]

    def _scaled_projection(self, head_dim: int, device, dtype, scale: float) -> torch.Tensor:
        """``projection * sqrt(scale)``, kept: a generation step calls the map at every layer and token."""
        key = (head_dim, str(device), dtype, scale)
        if key not in self._cache:
            self._cache[key] = self.projection(head_dim, device, dtype) * math.sqrt(scale)
        return self._cache[key]

    def __call__(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        x = x.to(_compute_dtype(x))
        w = self._scaled_projection(x.shape[-1], x.device, x.dtype, scale)  # w.x' = (w sqrt(scale)).x
        if self.normalize:  # exp(w.x' - |x'|^2/2) / sqrt(r), divided by its sum, times sqrt(r)
            return torch.softmax(x @ w, dim=-1) * math.sqrt(w.shape[-1])
        # log phi = w.x' - |x'|^2 / 2 - log(r) / 2, with x' = x sqrt(scale): five ops, not nine
        half_norm = torch.add(0.5 * math.log(w.shape[-1]), torch.linalg.vecdot(x, x).unsqueeze(-1), alpha=0.5 * scale)
        return torch.exp(x @ w - half_norm)

    def options(self) -> dict:
        options = {"seed": self.seed} if self.num_features is None else {"num_features": self.num_features, "seed": self.seed}
        if self.normalize:  # written only when set: the specs of plain random maps stay as they were
            options["normalize"] = True
        return options


class CallableFeatureMap(FeatureMap):
    """Wraps a user function ``fn(x) -> phi`` (or ``fn(x, scale)``) with a fixed feature size."""

    name = "callable"

    def __init__(self, fn: Callable, num_features: int | None = None, nonnegative: bool = False):
        self.fn = fn
        self.num_features = num_features
        self.nonnegative = self.positive_features = nonnegative

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

    def spec(self) -> str:
        raise ValueError("a callable feature map cannot be saved to a config; register a FeatureMap subclass "
                         "with @register_feature_map(name) and use its name")

    def __repr__(self) -> str:
        return f"CallableFeatureMap({getattr(self.fn, '__name__', self.fn)!r}, num_features={self.num_features!r})"


FeatureMapLike = Union[str, FeatureMap, Callable]


def get_feature_map(feature_map: FeatureMapLike = "elu", **options) -> FeatureMap:
    """Resolve a spec string, a FeatureMap or a callable.

    A spec is a registered name with options, ``"name:key=value:..."`` (``"random:num_features=256:seed=0"``,
    ``"taylor:degree=1"``; ``"random:256"`` sets the primary option); keyword ``options`` add to it
    (``get_feature_map("random", num_features=64, seed=1)``; None values are ignored).
    """
    if isinstance(feature_map, FeatureMap):
        if any(v is not None for v in options.values()):
            raise ValueError(f"feature map options {sorted(options)} given with an already built {feature_map!r}")
        return feature_map
    if isinstance(feature_map, str):
        name, parsed = parse_feature_map_spec(feature_map)
        extra = {k: v for k, v in options.items() if v is not None}
        clash = sorted(set(parsed) & set(extra))
        if clash:
            raise ValueError(f"feature map option(s) {clash} given both in the spec {feature_map!r} and as keywords")
        try:
            return _REGISTRY[name](**parsed, **extra)
        except TypeError as err:
            raise ValueError(f"feature map {feature_map!r}: {err}") from None
    if callable(feature_map):
        return CallableFeatureMap(feature_map, **options)
    raise TypeError(f"feature_map must be a spec string, a FeatureMap or a callable, got {type(feature_map).__name__}")
