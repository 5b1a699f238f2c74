"""ntk-attention: NTK-Attention (an infinitely long trainable prefix in fixed size) for transformers.

Importing the package registers its PEFT methods (``NTKConfig``, ``PrefixConfig``) with PEFT, so that
``peft.get_peft_model``, ``PeftModel.from_pretrained`` and ``AutoPeftModel*`` know them.
"""

from .ops import (
    EluFeatureMap,
    FeatureMap,
    RandomFeatureMap,
    TaylorFeatureMap,
    feature_map_names,
    get_feature_map,
    ntk_attention,
    prefix_attention,
    prefix_to_ntk,
    register_feature_map,
)
from .tuners import (
    NTKConfig,
    NTKModel,
    PrefixConfig,
    PrefixModel,
    adapter_config,
    adapter_states,
    get_ntk_model,
    load_legacy_adapter,
)
from .tuners.config import library_version

__version__ = library_version()

__all__ = [
    "ntk_attention",
    "prefix_attention",
    "prefix_to_ntk",
    "FeatureMap",
    "EluFeatureMap",
    "TaylorFeatureMap",
    "RandomFeatureMap",
    "get_feature_map",
    "register_feature_map",
    "feature_map_names",
    "NTKConfig",
    "PrefixConfig",
    "NTKModel",
    "PrefixModel",
    "get_ntk_model",
    "adapter_states",
    "adapter_config",
    "load_legacy_adapter",
]
