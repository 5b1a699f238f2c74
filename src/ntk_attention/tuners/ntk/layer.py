"""NTKState: one adapter's (Z, k) for one attention module and its attention call; NTKLayer: the PEFT
tuner layer that holds them by adapter name."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...ops import FeatureMap, ntk_attention, ntk_decode_state, ntk_decode_step
from ...ops.fused.torch_decode import DecodeState
from ..attention_hook import HeadGeometry
from ..layer import AdapterState, AttentionAdapterLayer
from .config import NTKConfig


class _NonNegative(torch.autograd.Function):
    """``max(x, 0)`` with the gradient of a projection onto ``x >= 0``.

    The gradient passes where ``x >= 0`` (so an entry started at exactly 0 trains on the first
    step) and, below 0, only where descent would raise ``x``: an entry pushed out by optimizer
    momentum comes back as soon as the loss wants a larger ``k``, instead of dying as a plain clamp
    (or the authors' ``abs``) would let it.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.where((x >= 0) | (grad < 0), grad, torch.zeros_like(grad))


class _Gated(torch.autograd.Function):
    """``Z = diag(k) W`` whose gradient reaches ``W`` as if every gate ``k_f`` were open (1).

    At ``k = 0`` (the identity start, and wherever the projection holds ``k`` at 0) the true
    gradient of ``W`` is 0, so the values could never learn what they should be and ``k``, seeing
    only empty values, would open nowhere. Here ``W`` trains from the first step on the gradient a
    free ``Z`` would get (with Adam, the same steps as the true gradient wherever ``k > 0``), while
    the forward stays a bounded, gated average.
    """

    @staticmethod
    def forward(ctx, k, w):
        ctx.save_for_backward(k, w)
        return k.unsqueeze(-1) * w

    @staticmethod
    def backward(ctx, grad):
        k, w = ctx.saved_tensors
        return (grad * w).sum(-1), grad


class _DroppedFeatures(FeatureMap):
    """``dropout(phi(q))``: one mask per call, shared by numerator and denominator."""

    def __init__(self, inner: FeatureMap, p: float):
        self.inner, self.p = inner, p
        self.name, self.nonnegative, self.positive_features = inner.name, inner.nonnegative, inner.positive_features

    def feature_dim(self, head_dim: int) -> int:
        return self.inner.feature_dim(head_dim)

    def __call__(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        return F.dropout(self.inner(x, scale), self.p, training=True)


class NTKState(AdapterState):
    def __init__(self, config: NTKConfig, geometry: HeadGeometry):
        super().__init__(geometry)
        self.feature_map = config.build_feature_map()
        self.feature_dropout = config.feature_dropout
        self.m = float(config.virtual_prefix_length)
        self.k_parametrization = config.k_parametrization
        self.tied = config.z_parametrization == "tied"
        # One state per query head, or per key/value head (the operator shares it over the group).
        H = geometry.kv_heads if config.per_kv_head else geometry.heads
        r, d_v = self.feature_map.feature_dim(geometry.head_dim), geometry.v_head_dim
        if config.rank is not None and config.rank > min(r, d_v):
            raise ValueError(f"NTKConfig.rank={config.rank} is above what Z [r={r}, d_v={d_v}] can hold (min(r, d_v) = "
                             f"{min(r, d_v)}); use rank=None for a full Z")
        # z is Z ("free") or the values W of Z = diag(k) W ("tied"), stored / m; 0 either way.
        if config.rank is None:
            self.z = nn.Parameter(torch.zeros(H, r, d_v))
        else:
            half = config.rank // 2
            a = torch.randn(H, r, half) * config.rank_init_std
            b = torch.randn(H, half, d_v) * config.rank_init_std
            self.z_a = nn.Parameter(torch.cat([a, a], dim=-1))
            self.z_b = nn.Parameter(torch.cat([b, b], dim=-2))
        # theta with k = max(theta, 0), softplus(theta) or theta, so that k / m starts at k_init.
        theta = math.log(math.expm1(config.k_init)) if config.k_parametrization == "softplus" else config.k_init
        self.k = nn.Parameter(torch.full((H, r), float(theta)))

    def ntk_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Z [H, r, d_v], k [H, r])`` as the operator takes them (already times m); H counts the
        key/value heads with ``per_kv_head``."""
        if hasattr(self, "z"):
            z = self.z
        else:
            half = self.z_a.shape[-1] // 2
            # Two products subtracted (not one matmul over a signed rank): equal halves give exactly 0.
            z = self.z_a[..., :half] @ self.z_b[:, :half] - self.z_a[..., half:] @ self.z_b[:, half:]
        k = self.k  # "signed"
        if self.k_parametrization == "nonneg":
            k = _NonNegative.apply(self.k)
        elif self.k_parametrization == "softplus":
            k = F.softplus(self.k)
        k = self.m * k
        # tied: z holds the values of each feature's virtual token, stored / m like k: Z = diag(k) (m z)
        return (_Gated.apply(k, self.m * z) if self.tied else self.m * z), k

    def set_ntk_state(self, z: torch.Tensor, kvec: torch.Tensor) -> None:
        """Store ``(Z [H, r, d_v], k [H, r])`` as the operator takes them: the inverse of ``ntk_state`` (full Z only;
        H as there)."""
        if not hasattr(self, "z"):
            raise ValueError("set_ntk_state needs a full Z: the adapter has rank set")
        if z.shape != self.z.shape or kvec.shape != self.k.shape:
            raise ValueError(f"set_ntk_state: expected z {tuple(self.z.shape)} and k {tuple(self.k.shape)}, "
                             f"got {tuple(z.shape)} and {tuple(kvec.shape)}")
        per_token = kvec / self.m
        if self.k_parametrization != "signed" and (per_token < 0).any():
            raise ValueError(f"k has negative entries, which k_parametrization={self.k_parametrization!r} cannot hold; "
                             "use k_parametrization='signed'")
        if self.tied:  # the values Z_f / k_f, stored / m
            empty = kvec == 0
            if (z[empty] != 0).any():
                raise ValueError("Z is non-zero where k = 0, which z_parametrization='tied' (Z = diag(k) W) cannot hold; "
                                 "use z_parametrization='free'")
            z = torch.where(empty.unsqueeze(-1), torch.zeros_like(z), z / torch.where(empty, 1, kvec).unsqueeze(-1))
        with torch.no_grad():
            self.z.copy_(z / self.m)
            self.k.copy_(torch.log(torch.expm1(per_token)) if self.k_parametrization == "softplus" else per_token)

    def _inference_state(self) -> tuple[torch.Tensor, torch.Tensor, DecodeState]:
        """``ntk_state()`` and its decode form computed once per parameter version: without gradient
        they are the same at every layer call of every generated token (a handful of small ops, ~1 ms
        per SmolLM2 token). In-place updates (optimizer steps, ``load_state_dict``, ``set_ntk_state``)
        bump the version."""
        key = tuple((p.data_ptr(), p._version) for p in self._parameters.values())  # not parameters(): a module walk per layer and token
        if getattr(self, "_state_cache", (None,))[0] != key:
            z, kvec = self.ntk_state()
            self._state_cache = (key, (z, kvec, ntk_decode_state(z, kvec, self.geometry.heads, self.feature_map)))
        return self._state_cache[1]

    def forward(self, query, key, value, attention_mask, causal, dropout, scale):
        if torch.is_grad_enabled() or self.training:
            z, kvec = self.ntk_state()
        else:
            z, kvec, decode_state = self._inference_state()
            if dropout == 0:
                out = ntk_decode_step(query, key, value, decode_state, attn_mask=attention_mask, scale=scale)
                if out is not None:  # a generation step
                    return out
        fmap = self.feature_map
        if self.training and self.feature_dropout > 0:
            fmap = _DroppedFeatures(fmap, self.feature_dropout)
        return ntk_attention(
            query, key, value, z, kvec,
            feature_map=fmap, causal=causal, attn_mask=attention_mask, scale=scale, dropout_p=dropout,
        )


class NTKLayer(AttentionAdapterLayer):
    adapter_layer_names = ("ntk_state",)
    state_class = NTKState
