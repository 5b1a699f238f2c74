"""AttentionTuner: the PEFT tuner (``peft.tuners.tuners_utils.BaseTuner``) shared by every method.

PEFT builds it from ``get_peft_model`` / ``PeftModel.from_pretrained`` through the mappings a method's
``register_method`` call fills. Its targets are the attention modules that dispatch through
transformers' attention interface; ``_create_and_replace`` hangs the method's tuner layer on each
(``module.attention_adapter``) instead of replacing the module, and switches the model's attention
implementation to the hook in ``attention_hook.py``. Everything else (masks, GQA, KV caches,
generation, modules_to_save, several named adapters, the file layout) is PEFT's and transformers' own.
"""

from __future__ import annotations

import os
import re

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers import PreTrainedModel

from .attention_hook import (
    ADAPTER_ATTR,
    SUPPORTED_BASE_IMPLEMENTATIONS,
    base_implementation_of,
    find_attention_modules,
    head_geometry,
    hook_name,
    layer_index,
    register_hooks,
)
from .config import TASK_HEADS, AdapterConfig
from .layer import CANNOT_MERGE, AdapterState, AttentionAdapterLayer


def transformers_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside ``model`` (itself, or the one a PEFT model wraps)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model
    if not isinstance(inner, PreTrainedModel):
        raise TypeError(f"NTK/prefix adapters need a transformers PreTrainedModel, got {type(model).__name__}")
    return inner


def _gguf_file_in(folder: str | None) -> str | None:
    """The GGUF file a base was loaded from: the single ``.gguf`` in a folder without config.json."""
    if not folder or not os.path.isdir(folder) or os.path.exists(os.path.join(folder, "config.json")):
        return None
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    return files[0] if len(files) == 1 else None


class AttentionTuner(BaseTuner):
    """Subclasses (one per method, in the method's ``model.py``) set ``prefix`` and ``tuner_layer_cls``."""

    tuner_layer_cls: type[AttentionAdapterLayer]
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config: AdapterConfig, model_config: dict) -> AdapterConfig:
        return peft_config  # targets are found structurally in _prepare_model, not by architecture name

    def _prepare_model(self, peft_config: AdapterConfig, model: nn.Module) -> None:
        """Checks before anything is attached, and the attention modules this adapter targets."""
        pretrained = transformers_model(model)
        base_impl = base_implementation_of(pretrained.config._attn_implementation)
        if base_impl not in SUPPORTED_BASE_IMPLEMENTATIONS:
            raise ValueError(
                f"{type(pretrained).__name__} uses attn_implementation={base_impl!r}; NTK/prefix adapters wrap "
                f"{SUPPORTED_BASE_IMPLEMENTATIONS}: load the model with attn_implementation='sdpa'"
            )
        cls_name = type(pretrained).__name__
        if not peft_config.from_file:  # a config made in code goes with whatever model it is given
            peft_config.base_model_class = cls_name
        elif peft_config.base_model_class not in (None, cls_name):
            raise ValueError(f"the adapter was made for a {peft_config.base_model_class}, this model is a {cls_name}; "
                             "load the base with the same class (e.g. AutoModelForSequenceClassification for SEQ_CLS)")
        heads = TASK_HEADS.get(peft_config.task_type, ())
        names = [n for n, _ in pretrained.named_modules()]
        if heads and not any(n.split(".")[-1] in heads for n in names):
            raise ValueError(f"task_type={peft_config.task_type!r} trains the head {list(heads)}, but {cls_name} has none; "
                             "load the model with its task head (e.g. AutoModelForSequenceClassification)")
        task_heads = set(heads)
        absent = [m for m in (peft_config.modules_to_save or []) if m not in task_heads
                  and not any(n == m or n.endswith("." + m) for n in names)]
        if absent:
            raise ValueError(f"modules_to_save: no module named {absent} in {cls_name}")
        if not peft_config.base_model_name_or_path:
            peft_config.base_model_name_or_path = pretrained.config._name_or_path or None
        if peft_config.gguf_file is None:
            peft_config.gguf_file = _gguf_file_in(peft_config.base_model_name_or_path)
        self._targets = self._select_targets(find_attention_modules(model), peft_config)

    def _post_injection_hook(self, model: nn.Module, config: AdapterConfig, adapter_name: str) -> None:
        """Only once every layer is attached: a refused config leaves the model's attention as it was."""
        pretrained = transformers_model(model)
        register_hooks()
        pretrained.set_attn_implementation(hook_name(base_implementation_of(pretrained.config._attn_implementation)))

    @staticmethod
    def _select_targets(found: list[tuple[str, nn.Module]], config: AdapterConfig) -> set[str]:
        names = [n for n, _ in found]
        wanted = config.target_modules
        if isinstance(wanted, str):
            names = [n for n in names if re.fullmatch(wanted, n)]
        elif wanted is not None:
            names = [n for n in names if any(n == w or n.endswith("." + w) for w in wanted)]
        if config.layers_to_transform is not None:
            names = [n for n in names if layer_index(n) in config.layers_to_transform]
        if not names:
            numbers = sorted({layer_index(n) for n, _ in found if layer_index(n) is not None})
            raise ValueError(f"target_modules={wanted!r} with layers_to_transform={config.layers_to_transform} matches no "
                             f"attention module; the model has {len(found)} (layers {numbers}), e.g. {found[0][0]!r}")
        return set(names)

    def _check_target_module_exists(self, peft_config: AdapterConfig, key: str) -> bool:
        return key in self._targets

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs) -> None:
        layer = getattr(target, ADAPTER_ATTR, None)
        if layer is not None and not isinstance(layer, self.tuner_layer_cls):
            raise ValueError(f"{current_key} already has a {type(layer).__name__}; a model takes one adapter method at a time")
        if layer is not None and adapter_name in layer.states:
            raise ValueError(f"{current_key} already has an adapter named {adapter_name!r}; unload() it or add_adapter() another name")
        new = layer is None
        if new:
            layer = self.tuner_layer_cls(head_geometry(target, target.config)).train(target.training)
            layer.set_adapter(adapter_name)
        layer.update_layer(adapter_name, peft_config, device=next(target.parameters()).device)  # may refuse the config
        if new:
            target.add_module(ADAPTER_ATTR, layer)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """PEFT's key mapping, then what PEFT only warns about is refused: missing, unexpected, misshapen or
        non-finite tensors."""
        remapped = super()._remap_adapter_state_dict_for_load(model=model, config=config, adapter_name=adapter_name, state_dict=state_dict)
        own = model.state_dict()
        expected = {k for k in own if f".{adapter_name}." in k and (
            f".{ADAPTER_ATTR}." in k or ".modules_to_save." in k)}
        missing, unexpected = sorted(expected - remapped.keys()), sorted(remapped.keys() - expected)
        if missing or unexpected:
            raise ValueError(
                f"adapter weights do not fit this model: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} (saved for another model or layer choice?)")
        for name, tensor in remapped.items():
            if tensor.shape != own[name].shape:
                raise ValueError(f"adapter weight {name} has shape {tuple(tensor.shape)}, this model needs "
                                 f"{tuple(own[name].shape)} (saved for a base of another shape?)")
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise ValueError(f"adapter weight {name} must hold finite floating-point values")
        return remapped

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            raise ValueError(CANNOT_MERGE)
        pretrained = transformers_model(self.model)
        for module in list(self.model.modules()):
            if isinstance(getattr(module, ADAPTER_ATTR, None), AttentionAdapterLayer):
                delattr(module, ADAPTER_ATTR)
        pretrained.set_attn_implementation(base_implementation_of(pretrained.config._attn_implementation))
        # Each ModulesToSaveWrapper gives back its active trained copy (PEFT's unload semantics). Done here and
        # not by BaseTuner's loop, whose _replace_module assumes a module with .weight (a RoBERTa head has none).
        for name, module in list(self.model.named_modules()):
            if isinstance(module, AuxiliaryTrainingWrapper):
                parent, _, child = name.rpartition(".")
                restored = module.unload_and_optionally_merge_module(merge=False, safe_merge=False, adapter_names=None)
                setattr(self.model.get_submodule(parent) if parent else self.model, child, restored)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model


def adapter_states(model: nn.Module, adapter_name: str | None = None) -> list[AdapterState]:
    """The states of one adapter (default: the active one) in model order, one per adapted attention module."""
    layers = [m for m in model.modules() if isinstance(m, AttentionAdapterLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no NTK/prefix adapter")
    if adapter_name is None:
        adapter_name = layers[0].active_adapters[0]
    return [layer.states[adapter_name] for layer in layers if adapter_name in layer.states]


def adapter_config(model: nn.Module, adapter_name: str | None = None) -> AdapterConfig:
    """The config of one adapter (default: the active one) of a PEFT model."""
    name = adapter_name or model.active_adapter
    config = model.peft_config[name]
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"adapter {name!r} is a {type(config).__name__}, not an NTK/prefix adapter")
    return config
