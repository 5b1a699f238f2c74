"""Fields every adapter method shares, and the adapter_config.json round trip.

A method's config is a dataclass deriving from ``AdapterConfig`` with a class attribute ``method``
("ntk", "prefix"). ``to_dict`` writes the file's content; ``config_from_dict`` reads it back and
refuses what it cannot honour (unknown method, unknown fields, a newer library version).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

from packaging.version import Version

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# task_type -> names of the head modules trained and saved with the adapter (as PEFT does).
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
    "IMAGE_CLS": ("classifier",),
    "CAUSAL_LM": (),
    "SEQ_2_SEQ_LM": (),
    "FEATURE_EXTRACTION": (),
}


def library_version() -> str:
    from .. import __version__

    return __version__


@dataclass
class AdapterConfig:
    """Fields shared by all methods.

    task_type: one of ``TASK_HEADS`` (PEFT's names) or None; it adds the usual head to
        ``modules_to_save`` (``SEQ_CLS`` -> ``classifier`` / ``score``).
    modules_to_save: names (or name suffixes) of modules trained fully and saved with the adapter.
    layers_to_transform: layer indices (the first number in the attention module's name) that get
        the adapter; None = every attention layer.
    base_model_name_or_path, gguf_file: where the base model comes from; filled in from the model
        when left None, so that a saved adapter can rebuild its base.
    """

    method: ClassVar[str] = ""
    # field -> the value that files written before the field existed meant (config_from_dict fills it in)
    absent_field_values: ClassVar[dict] = {}

    task_type: str | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | None = None
    base_model_name_or_path: str | None = None
    gguf_file: str | None = None

    def __post_init__(self) -> None:
        if self.task_type is not None:
            self.task_type = str(getattr(self.task_type, "value", self.task_type))
            if self.task_type not in TASK_HEADS:
                raise ValueError(f"task_type must be one of {sorted(TASK_HEADS)} or None, got {self.task_type!r}")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save):
                raise TypeError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save)
        if self.layers_to_transform is not None:
            layers = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) else self.layers_to_transform
            if not all(isinstance(i, int) and i >= 0 for i in layers):
                raise ValueError(f"layers_to_transform must be non-negative layer indices, got {self.layers_to_transform!r}")
            self.layers_to_transform = list(layers)

    def head_module_names(self) -> list[str]:
        return list(self.modules_to_save or []) + [n for n in TASK_HEADS.get(self.task_type, ()) if n not in (self.modules_to_save or [])]

    def to_dict(self) -> dict:
        out = {"method": self.method, "library": "ntk-attention", "library_version": library_version()}
        out.update(dataclasses.asdict(self))
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def config_classes() -> dict[str, type[AdapterConfig]]:
    from .ntk.config import NTKConfig
    from .prefix.config import PrefixConfig

    return {cls.method: cls for cls in (NTKConfig, PrefixConfig)}


def config_from_dict(data: dict, source: str = "adapter config") -> AdapterConfig:
    """Rebuild a config from ``to_dict`` output; errors name ``source`` and the offending field."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
    data = dict(data)
    method = data.pop("method", None)
    data.pop("library", None)
    version = data.pop("library_version", None)
    classes = config_classes()
    if method not in classes:
        raise ValueError(f"{source}: field 'method' must be one of {sorted(classes)}, got {method!r}")
    if version is not None and Version(str(version)) > Version(library_version()):
        raise ValueError(
            f"{source} was written by ntk-attention {version}, newer than the installed {library_version()}; "
            "upgrade ntk-attention to load it"
        )
    cls = classes[method]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{source}: unknown fields {unknown} for method {method!r} (expected a subset of {sorted(known)})")
    try:
        return cls(**{**cls.absent_field_values, **data})
    except TypeError as err:
        raise ValueError(f"{source}: {err}") from None
