"""NTKModel: the PEFT-style wrapper shared by every method (wrap, train, save, load, disable, unload).

The wrapper freezes the base model, hangs one adapter layer on each chosen attention module
(``module.ntk_adapter``), copies the heads named by ``modules_to_save`` / ``task_type`` so they
train while the originals stay untouched, and switches the model's attention implementation to the
hook in ``attention_hook.py``. Everything else (masks, GQA, KV caches, generation) stays the
model's own.
"""

from __future__ import annotations

import copy
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from ..io import write_atomically, write_text
from .attention_hook import (
    ADAPTER_ATTR,
    SUPPORTED_BASE_IMPLEMENTATIONS,
    AdapterLayer,
    base_implementation_of,
    find_attention_modules,
    head_geometry,
    hook_name,
    layer_index,
    register_hooks,
)
from .config import CONFIG_NAME, WEIGHTS_NAME, AdapterConfig, config_from_dict
from .ntk.model import NTKLayer
from .prefix.model import PrefixLayer

LAYER_CLASSES: dict[str, type[AdapterLayer]] = {"ntk": NTKLayer, "prefix": PrefixLayer}
PEFT_SUBFOLDER = "peft_adapter"


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def transformers_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside ``model`` (itself, or the one a PEFT model wraps)."""
    inner = model.get_base_model() if _is_peft_model(model) else model
    if not isinstance(inner, PreTrainedModel):
        raise TypeError(f"get_ntk_model needs a transformers PreTrainedModel (or a PEFT model around one), got {type(model).__name__}")
    return inner


def _gguf_file_in(folder: str | None) -> str | None:
    """The GGUF file a base was loaded from: the single ``.gguf`` in a folder without config.json."""
    if not folder or not os.path.isdir(folder) or os.path.exists(os.path.join(folder, "config.json")):
        return None
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    return files[0] if len(files) == 1 else None


def read_adapter_config(path: str | os.PathLike) -> tuple[AdapterConfig, dict]:
    """Read ``adapter_config.json`` from a folder: ``(config, file contents)``, validated."""
    file = Path(path) / CONFIG_NAME
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: not a saved NTK/prefix adapter folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    fields = {k: v for k, v in data.items() if k not in ("base_model_class", "peft_adapter_subfolder")}
    return config_from_dict(fields, source=str(file)), data


class NTKModel(nn.Module):
    """A transformers model with an NTK-Attention (or exact prefix) adapter; calls go to the base model."""

    def __init__(self, model: nn.Module, config: AdapterConfig):
        super().__init__()
        if isinstance(model, NTKModel):
            raise ValueError("the model already has an NTK/prefix adapter; unload() it first")
        if not isinstance(config, AdapterConfig) or config.method not in LAYER_CLASSES:
            raise TypeError(f"config must be an NTKConfig or a PrefixConfig, got {type(config).__name__}")
        pretrained = transformers_model(model)
        if any(isinstance(m, AdapterLayer) for m in model.modules()):
            raise ValueError(f"{type(pretrained).__name__} already has an NTK/prefix adapter attached; unload() it first")
        # A config shared with an adapted model already names the hook: read the implementation under it.
        base_impl = base_implementation_of(pretrained.config._attn_implementation)
        if base_impl not in SUPPORTED_BASE_IMPLEMENTATIONS:
            raise ValueError(
                f"{type(pretrained).__name__} uses attn_implementation={base_impl!r}; NTK/prefix adapters wrap "
                f"{SUPPORTED_BASE_IMPLEMENTATIONS}: load the model with attn_implementation='sdpa'"
            )
        config = copy.deepcopy(config)
        config.base_model_name_or_path = config.base_model_name_or_path or pretrained.config._name_or_path or None
        config.gguf_file = config.gguf_file or _gguf_file_in(config.base_model_name_or_path)
        self.base_model = model
        self.adapter_config = config
        self._base_implementation = base_impl
        self._trainable_before = {n for n, p in model.named_parameters() if p.requires_grad}
        self._wraps_peft = _is_peft_model(model)

        targets = self._select_layers(find_attention_modules(model), config)
        # A PEFT model has already frozen its base and left its own adapter trainable: keep that.
        keep = self._trainable_before if self._wraps_peft else set()
        for name, p in model.named_parameters():
            p.requires_grad_(name in keep)
        layer_cls = LAYER_CLASSES[config.method]
        for _, module in targets:
            device = next(module.parameters()).device
            layer = layer_cls(config, head_geometry(module, module.config)).to(device)
            setattr(module, ADAPTER_ATTR, layer.train(module.training))  # follow the model's train/eval mode
        self._original_heads = nn.ModuleDict()
        self._trained_heads: dict[str, nn.Module] = {}
        self._copy_heads(config.head_module_names())
        register_hooks()
        pretrained.set_attn_implementation(hook_name(base_impl))

    # ---------------------------------------------------------------- building

    @staticmethod
    def _select_layers(found, config):
        if config.layers_to_transform is None:
            return found
        targets = [(n, m) for n, m in found if layer_index(n) in config.layers_to_transform]
        if not targets:
            numbers = sorted({layer_index(n) for n, _ in found if layer_index(n) is not None})
            raise ValueError(f"layers_to_transform={config.layers_to_transform} matches no attention layer; the model has layers {numbers}")
        return targets

    def _copy_heads(self, names: list[str]) -> None:
        """Trainable copies of the saved modules replace them; the originals are kept for disable/unload."""
        explicit = set(self.adapter_config.modules_to_save or [])
        for wanted in names:
            matches = [n for n, _ in self.base_model.named_modules() if n == wanted or n.endswith("." + wanted)]
            if not matches and wanted in explicit:
                raise ValueError(f"modules_to_save: no module named {wanted!r} in {type(self.base_model).__name__}")
            for name in matches:
                original = self.base_model.get_submodule(name)
                trained = copy.deepcopy(original).requires_grad_(True)
                self._original_heads[name.replace(".", "__")] = original
                self._trained_heads[name] = trained
                self._set_submodule(name, trained)

    def _set_submodule(self, name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(self.base_model.get_submodule(parent) if parent else self.base_model, child, module)

    def adapter_layers(self) -> list[AdapterLayer]:
        return [m for m in self.base_model.modules() if isinstance(m, AdapterLayer)]

    # ---------------------------------------------------------------- calling

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ---------------------------------------------------------------- parameters

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors an adapter file holds: adapter layers and trained heads, named as in the base model."""
        heads = tuple(name + "." for name in self._trained_heads)
        return {
            n: p for n, p in self.base_model.named_parameters()
            if f".{ADAPTER_ATTR}." in f".{n}" or n.startswith(heads)
        }

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.base_model.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.base_model.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ---------------------------------------------------------------- switching off

    def _set_enabled(self, enabled: bool) -> None:
        for layer in self.adapter_layers():
            layer.active = enabled
        for name, trained in self._trained_heads.items():
            self._set_submodule(name, trained if enabled else self._original_heads[name.replace(".", "__")])

    @contextmanager
    def disable_adapter(self):
        """Run the untouched base model inside the block (a PEFT adapter underneath is disabled too)."""
        self._set_enabled(False)
        try:
            if self._wraps_peft:
                with self.base_model.disable_adapter():
                    yield
            else:
                yield
        finally:
            self._set_enabled(True)

    def unload(self) -> nn.Module:
        """Remove the adapter and return the base model as it was before ``get_ntk_model``."""
        self._set_enabled(False)
        for module in list(self.base_model.modules()):
            if isinstance(getattr(module, ADAPTER_ATTR, None), AdapterLayer):
                delattr(module, ADAPTER_ATTR)
        transformers_model(self.base_model).set_attn_implementation(self._base_implementation)
        for name, p in self.base_model.named_parameters():
            p.requires_grad_(name in self._trainable_before)
        base = self.base_model
        del self.base_model
        return base

    # ---------------------------------------------------------------- saving and loading

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (and the PEFT adapter underneath)."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().to("cpu").contiguous() for n, p in self.adapter_state_dict().items()}
        metadata = {"format": "pt", "method": self.adapter_config.method}
        write_atomically(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        data = self.adapter_config.to_dict()
        data["base_model_class"] = type(transformers_model(self.base_model)).__name__
        if self._wraps_peft:
            self.base_model.save_pretrained(folder / PEFT_SUBFOLDER)
            data["peft_adapter_subfolder"] = PEFT_SUBFOLDER
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        write_text(folder / CONFIG_NAME, text)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | os.PathLike, is_trainable: bool = False) -> "NTKModel":
        """Attach a saved adapter to a fresh base model; checks the config, names, shapes and values."""
        config, data = read_adapter_config(path)
        if data.get("peft_adapter_subfolder"):
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, Path(path) / data["peft_adapter_subfolder"], is_trainable=is_trainable)
        wrapped = cls(model, config)
        wrapped.load_adapter_weights(Path(path) / WEIGHTS_NAME)
        if not is_trainable:
            wrapped.requires_grad_(False)
            wrapped.eval()
        return wrapped

    def load_adapter_weights(self, file: str | os.PathLike) -> None:
        try:
            tensors = load_file(str(file))
        except FileNotFoundError:
            raise FileNotFoundError(f"adapter weights {file} not found") from None
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{file} is not a readable safetensors file ({err})") from None
        expected = self.adapter_state_dict()
        missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
        if missing or unexpected:
            raise ValueError(
                f"{file} does not fit this model: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} (adapter saved for another model or layer choice?)"
            )
        for name, param in expected.items():
            tensor = tensors[name]
            if tensor.shape != param.shape:
                raise ValueError(f"{file}: {name} has shape {tuple(tensor.shape)}, this model needs {tuple(param.shape)} (adapter saved for a base of another shape?)")
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise ValueError(f"{file}: {name} must hold finite floating-point values")
        with torch.no_grad():
            for name, param in expected.items():
                param.copy_(tensors[name])


def get_ntk_model(model: nn.Module, config: AdapterConfig) -> NTKModel:
    """Freeze ``model`` and add the adapter ``config`` describes (NTKConfig or PrefixConfig)."""
    return NTKModel(model, config)
