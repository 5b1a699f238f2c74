from .config import NTKConfig
from .model import NTKLayer

__all__ = ["NTKConfig", "NTKLayer"]
