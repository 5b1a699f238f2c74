from ..registry import register_method
from .config import NTKConfig
from .layer import NTKLayer, NTKState
from .model import NTKModel

register_method("ntk", NTKConfig, NTKModel)

__all__ = ["NTKConfig", "NTKLayer", "NTKState", "NTKModel"]
