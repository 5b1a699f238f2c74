"""The operator: NTK-Attention and exact prefix attention (fast paths) with plain references."""

from .attention import ntk_attention, ntk_decode_state, ntk_decode_step, prefix_attention, prefix_to_ntk
from .backends import BACKEND_NAMES, BackendRefused, backend_refusals, select_backend
from .feature_maps import (
    CallableFeatureMap,
    EluFeatureMap,
    FeatureMap,
    RandomFeatureMap,
    TaylorFeatureMap,
    feature_map_names,
    get_feature_map,
    register_feature_map,
)

__all__ = [
    "ntk_attention",
    "ntk_decode_state",
    "ntk_decode_step",
    "prefix_attention",
    "prefix_to_ntk",
    "BACKEND_NAMES",
    "BackendRefused",
    "backend_refusals",
    "select_backend",
    "FeatureMap",
    "EluFeatureMap",
    "TaylorFeatureMap",
    "RandomFeatureMap",
    "CallableFeatureMap",
    "get_feature_map",
    "register_feature_map",
    "feature_map_names",
]
