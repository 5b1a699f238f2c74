from ..registry import register_method
from .config import PrefixConfig
from .layer import PrefixLayer, PrefixState
from .model import PrefixModel

register_method("prefix", PrefixConfig, PrefixModel)

__all__ = ["PrefixConfig", "PrefixLayer", "PrefixState", "PrefixModel"]
