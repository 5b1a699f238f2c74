"""One registration per method: its name, config class and tuner class, made known to PEFT and to this package.

PEFT's ``register_peft_method`` refuses names outside its closed ``PeftType`` enum, so the same three
mappings it fills are filled here with the method's string ``peft_type`` (PEFT looks them up with
``config.peft_type``, which may be a string since PEFT 0.17). Each method's ``__init__.py`` calls
``register_method`` once; importing ``ntk_attention`` registers them all (idempotent).
"""

from __future__ import annotations

from dataclasses import dataclass

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING


@dataclass(frozen=True)
class Method:
    name: str
    config_class: type
    model_class: type


METHODS: dict[str, Method] = {}


def register_method(name: str, config_class: type, model_class: type) -> None:
    """Make ``config_class`` (an ``AdapterConfig`` with ``PEFT_TYPE``) and its tuner ``model_class`` (an
    ``AttentionTuner`` with ``prefix``) available to ``get_peft_model``, ``PeftModel.from_pretrained``,
    ``PeftConfig.from_pretrained`` and to ``ntk-attn train --method name``."""
    peft_type = config_class.PEFT_TYPE
    known = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if known is not None and (known.__module__, known.__qualname__) != (config_class.__module__, config_class.__qualname__):
        raise ValueError(f"peft_type {peft_type!r} is already registered by {known.__module__}.{known.__qualname__}")
    if name in METHODS and METHODS[name].config_class.PEFT_TYPE != peft_type:
        raise ValueError(f"method name {name!r} is already registered for peft_type {METHODS[name].config_class.PEFT_TYPE!r}")
    taken = {p for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if t != peft_type}
    if model_class.prefix in taken:
        raise ValueError(f"tuner prefix {model_class.prefix!r} of {model_class.__name__} is taken by another PEFT method")
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_class
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_class
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = model_class.prefix
    METHODS[name] = Method(name, config_class, model_class)
