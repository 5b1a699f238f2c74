"""ntk-attention: NTK-Attention (an infinitely long trainable prefix in fixed size) for transformers."""

from .ops import (
    EluFeatureMap,
    FeatureMap,
    RandomFeatureMap,
    TaylorFeatureMap,
    get_feature_map,
    ntk_attention,
    prefix_attention,
    prefix_to_ntk,
)

__version__ = "0.1.0"

from .tuners import NTKConfig, NTKModel, PrefixConfig, get_ntk_model  # noqa: E402  (after __version__)

__all__ = [
    "ntk_attention",
    "prefix_attention",
    "prefix_to_ntk",
    "FeatureMap",
    "EluFeatureMap",
    "TaylorFeatureMap",
    "RandomFeatureMap",
    "get_feature_map",
    "NTKConfig",
    "PrefixConfig",
    "NTKModel",
    "get_ntk_model",
]
