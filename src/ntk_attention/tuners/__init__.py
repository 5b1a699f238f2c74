"""Model integration as PEFT methods: NTK-Attention and exact prefix tuning for transformers models.

    from peft import get_peft_model, PeftModel
    model = get_peft_model(base_model, NTKConfig())          # or PrefixConfig(num_virtual_tokens=16)
    model.save_pretrained(path); PeftModel.from_pretrained(base_model, path)

A method is one folder (config.py, layer.py, model.py and a ``register_method`` call in its
``__init__.py``) plus its import line below.
"""

from peft import PeftModel, get_peft_model

from . import ntk, prefix  # noqa: F401  (each registers its method with PEFT)
from .config import AdapterConfig
from .legacy import load_legacy_adapter
from .model import AttentionTuner, adapter_config, adapter_states
from .ntk import NTKConfig, NTKModel
from .prefix import PrefixConfig, PrefixModel
from .registry import METHODS, register_method


def get_ntk_model(model, config: AdapterConfig, adapter_name: str = "default") -> PeftModel:
    """A thin name for ``peft.get_peft_model(model, config)`` (the one route)."""
    return get_peft_model(model, config, adapter_name=adapter_name)


__all__ = [
    "AdapterConfig", "NTKConfig", "PrefixConfig", "NTKModel", "PrefixModel", "AttentionTuner", "METHODS",
    "register_method", "get_ntk_model", "adapter_states", "adapter_config", "load_legacy_adapter",
]
