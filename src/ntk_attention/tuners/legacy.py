"""Adapter folders written before the PEFT route (``adapter_config.json`` with ``method``, no ``peft_type``).

``load_legacy_adapter`` rebuilds such a folder as a PEFT model with the same outputs; ``save_pretrained`` on
the result writes the PEFT layout, which ``PeftModel.from_pretrained`` reads from then on.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .attention_hook import ADAPTER_ATTR
from .config import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, check_version, read_config_file
from .ntk.config import fold_feature_options
from .registry import METHODS

LEGACY_ATTR = "ntk_adapter"  # where the adapter hung on the attention module, and its tensors' names


def legacy_config(data: dict, source: str):
    """The config a legacy ``adapter_config.json`` describes; errors name ``source`` and the field."""
    data = dict(data)
    method = data.pop("method", None)
    if method not in METHODS:
        raise ValueError(f"{source}: field 'method' must be one of {sorted(METHODS)}, got {method!r}")
    data.pop("library", None)
    check_version(data.pop("library_version", None), source)
    if data.pop("peft_adapter_subfolder", None):
        raise ValueError(f"{source}: an NTK adapter saved on top of a LoRA model; the PEFT route takes one method "
                         "per model, so this folder cannot be loaded")
    cls = METHODS[method].config_class
    if method == "ntk":
        data.setdefault("feature_map", "elu")  # the default when these files were written
        if data["feature_map"] != "random" and data.get("feature_seed") == 0:
            del data["feature_seed"]  # written for every map, used by "random" only
        if data.get("feature_map") == "random" and data.get("num_features") is None:
            data["num_features"] = 256  # the default then; "random" alone is r = head dim now
        try:
            data = fold_feature_options(data)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
        data.setdefault("z_parametrization", "free")  # files from before the field trained a free Z
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{source}: unknown fields {unknown} for method {method!r}")
    try:
        return cls(**data)
    except TypeError as err:
        raise ValueError(f"{source}: {err}") from None


def load_legacy_adapter(model: nn.Module, path: str | os.PathLike, is_trainable: bool = False) -> PeftModel:
    """A PEFT model with the legacy adapter in ``path`` on ``model`` (names, shapes and values checked)."""
    folder = Path(path)
    data = read_config_file(folder)
    if "peft_type" in data:
        raise ValueError(f"{folder / CONFIG_NAME} is a PEFT adapter: load it with PeftModel.from_pretrained")
    config = legacy_config(data, str(folder / CONFIG_NAME))
    config.inference_mode = not is_trainable
    file = folder / SAFETENSORS_WEIGHTS_NAME
    try:
        tensors = load_file(str(file))
    except FileNotFoundError:
        raise FileNotFoundError(f"adapter weights {file} not found") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{file} is not a readable safetensors file ({err})") from None
    peft_model = get_peft_model(model, config)
    state_attr = peft_model.base_model.tuner_layer_cls.adapter_layer_names[0]
    old, new = f"{LEGACY_ATTR}.", f"{ADAPTER_ATTR}.{state_attr}."
    state = {"base_model.model." + (name.replace(old, new) if f".{old}" in f".{name}" else name): t
             for name, t in tensors.items()}
    try:
        set_peft_model_state_dict(peft_model, state)
    except (KeyError, ValueError) as err:
        raise ValueError(f"{file}: {err}") from None
    return peft_model.train(is_trainable)
