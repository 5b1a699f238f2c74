from .config import PrefixConfig
from .model import PrefixLayer

__all__ = ["PrefixConfig", "PrefixLayer"]
