"""The training methods of ``ntk-attn train`` / ``compare``, in one registry.

Each method says how its config is made from ``--config key=value`` fields (or that it takes none),
how a loaded base model becomes trainable, and its default learning rate and learning-rate grid.
``ntk`` and ``prefix`` read their defaults from their config classes (``NTKConfig`` /
``PrefixConfig``), so a tuner method keeps its training defaults beside its fields.

Head policy, the same for every method: on a classification task (text or image) the freshly
initialised head always trains (``head_modules``). Image models go through PEFT without a task type
(its sequence-classification wrapper passes ``input_ids``, a ViT takes ``pixel_values``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from typing import Callable

import torch

from ..tuners import METHODS as TUNER_METHODS
from ..tuners.config import AdapterConfig
from ..tuners.ntk.config import fold_feature_options
from .data import CLASSIFICATION_TASKS


@dataclass(frozen=True)
class TrainingMethod:
    name: str
    summary: str
    default_learning_rate: float
    learning_rate_grid: tuple[float, ...]
    # (task, options) -> config; None: the method takes no config fields
    make_config: Callable[[str, dict], object] | None
    # (base model, config, head module names, gguf file) -> the trainable model
    build: Callable[[torch.nn.Module, object, list[str], str | None], torch.nn.Module]

    @property
    def takes_config(self) -> bool:
        return self.make_config is not None


def _config_from_fields(config_class, method: str, options: dict):
    known = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown {method} config field(s) {unknown}; known fields: {sorted(known)}")
    return config_class(**options)


def _with_heads(config, head_modules: list[str]):
    config = copy.deepcopy(config)
    config.modules_to_save = sorted(set(config.modules_to_save or []) | set(head_modules))
    return config


def _lora_config(task: str, options: dict):
    """r=8 on PEFT's per-architecture targets (query/value for BERT, q_proj/v_proj for Llama; PEFT has
    none for ViT: give ``target_modules=q_proj,v_proj``, its names in transformers 5)."""
    import peft

    defaults = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1}
    return _config_from_fields(peft.LoraConfig, "lora", {**defaults, **options})


def _peft_task_type(base, head_modules) -> str | None:
    """PEFT's task wrapper for this base, one rule for every PEFT method."""
    if base.main_input_name != "input_ids":  # an image model: PEFT's task wrappers pass input_ids
        return None
    if head_modules:
        return "SEQ_CLS"
    return "CAUSAL_LM" if base.can_generate() else None


def _build_lora(base, config, head_modules, gguf_file):
    import peft

    config = _with_heads(config, head_modules)
    config.task_type = _peft_task_type(base, head_modules)
    return peft.get_peft_model(base, config)


def _build_adapter(base, config, head_modules, gguf_file):
    import peft

    config = _with_heads(config, head_modules)
    config.task_type = _peft_task_type(base, head_modules)
    config.gguf_file = gguf_file
    return peft.get_peft_model(base, config)


def _build_full(base, config, head_modules, gguf_file):
    return base.requires_grad_(True)


def _build_head(base, config, head_modules, gguf_file):
    base.requires_grad_(False)
    for name in head_modules:
        base.get_submodule(name).requires_grad_(True)
    return base


def _tuner(name: str, config_class) -> TrainingMethod:
    """A method registered in ``tuners`` (its folder's ``register_method``), with the training defaults
    its config class carries."""
    def make_config(task: str, options: dict):
        if name == "ntk":  # --config feature_map=random num_features=64 joins the feature-map spec
            options = fold_feature_options(options)
        return _config_from_fields(config_class, name, options)

    return TrainingMethod(name, f"{config_class.__name__} fields", config_class.default_learning_rate,
                          tuple(config_class.learning_rate_grid), make_config, _build_adapter)


REGISTRY: dict[str, TrainingMethod] = {method.name: method for method in (
    *(_tuner(name, method.config_class) for name, method in TUNER_METHODS.items()),
    TrainingMethod("lora", "PEFT LoRA (peft.LoraConfig fields)", 1e-3, (3e-4, 1e-3, 3e-3), _lora_config, _build_lora),
    TrainingMethod("full", "every weight", 5e-5, (2e-5, 5e-5, 1e-4), None, _build_full),
    # the head learns too slowly at 1e-3 on small budgets
    TrainingMethod("head", "the new classification head only", 1e-2, (3e-3, 1e-2, 3e-2), None, _build_head),
)}
NAMES = tuple(REGISTRY)


def get_method(name: str) -> TrainingMethod:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; expected one of {NAMES}")
    return REGISTRY[name]


def method_config(name: str, task: str, options: dict):
    """The config object for method ``name`` with ``options`` (from ``--config key=value``) applied."""
    method = get_method(name)
    if method.make_config is None:
        if options:
            raise ValueError(f"method {name!r} takes no --config options, got {sorted(options)}")
        if name == "head" and task not in CLASSIFICATION_TASKS:
            raise ValueError("method 'head' trains a classification head; it needs a classification task")
        return None
    return method.make_config(task, options)


def method_fields(config) -> dict:
    """What a tuner method's config sets beyond the fields every adapter has (``k_init``,
    ``feature_map``, ...), as a JSON file reads them back; {} for the other methods. Two runs with the
    same ``--config`` options but other defaults differ here."""
    if not isinstance(config, AdapterConfig):
        return {}
    shared = {f.name for f in dataclasses.fields(AdapterConfig)}
    own = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in shared}
    return json.loads(json.dumps(own))


def build_method_model(base: torch.nn.Module, name: str, config, head_modules: list[str],
                       gguf_file: str | None = None) -> torch.nn.Module:
    """Wrap or freeze ``base`` for method ``name``; the head modules train in every method."""
    return get_method(name).build(base, config, head_modules, gguf_file)
