"""Model integration, PEFT-style: NTK-Attention and exact prefix tuning for transformers models.

    model = get_ntk_model(base_model, NTKConfig())          # or PrefixConfig(num_virtual_tokens=16)
    model.save_pretrained(path); NTKModel.from_pretrained(base_model, path)
"""

from .config import AdapterConfig
from .model import NTKModel, get_ntk_model, read_adapter_config
from .ntk import NTKConfig
from .prefix import PrefixConfig

__all__ = ["AdapterConfig", "NTKConfig", "PrefixConfig", "NTKModel", "get_ntk_model", "read_adapter_config"]
