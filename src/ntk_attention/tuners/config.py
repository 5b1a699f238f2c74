"""What every method's config shares: a ``peft.PeftConfig`` with the attention-adapter fields, field checks,
portable base references, and an adapter folder whose config and weights are bound together.

A method's config derives from ``AdapterConfig`` and sets ``PEFT_TYPE`` (a string: PEFT's ``PeftType`` enum is
closed, its mappings take strings) and the training defaults ``default_learning_rate`` /
``learning_rate_grid`` that ``ntk-attn train`` and ``compare`` read.

Saving (``PeftModel.save_pretrained`` calls ``save_pretrained`` here after writing the weights) records one
sha256 over the weights file and the config's fields in ``adapter_config.json`` (``adapter_sha256``) and
writes that file atomically, so a folder holds one save's config and weights or is refused on load
(``from_pretrained`` checks the pair, the fields and the ntk-attention version before PEFT reads the
weights). Only the base reference (``base_model_name_or_path``, ``revision``) may be edited by hand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from packaging.version import InvalidVersion, Version
from peft import PeftConfig
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

from ..io import write_text

# task_type -> names of the head modules PEFT trains and saves with the adapter (PeftModelFor* add them).
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
    "CAUSAL_LM": (),
    "SEQ_2_SEQ_LM": (),
    "FEATURE_EXTRACTION": (),
}
# Not a PEFT task type: a config with it trains the ``classifier`` (as modules_to_save) under a plain PeftModel.
IMAGE_CLS = "IMAGE_CLS"
PACKAGE_REFERENCE = "pkg:"


def library_version() -> str:
    try:
        return importlib.metadata.version("ntk-attention")
    except importlib.metadata.PackageNotFoundError:  # a source tree on PYTHONPATH without an install
        return "0.0.0"


def check_number(owner: str, name: str, value, *, integer: bool = False, minimum=None, above=None, below=None,
                 optional: bool = False):
    """``value`` as a finite int/float within bounds, else a ValueError/TypeError naming ``owner.name``."""
    if value is None and optional:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        wanted = "an int" if integer else "a number"
        raise TypeError(f"{owner}.{name} must be {wanted}{' or None' if optional else ''}, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{owner}.{name} must be finite, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}, got {value!r}")
    if above is not None and not value > above:
        raise ValueError(f"{owner}.{name} must be > {above}, got {value!r}")
    if below is not None and not value < below:
        raise ValueError(f"{owner}.{name} must be < {below}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------- base references


def portable_reference(name_or_path: str | None) -> str | None:
    """A base reference another machine can resolve: a folder inside an installed package becomes
    ``pkg:PACKAGE/RELATIVE/PATH``; hub ids and other paths stay as given."""
    if not name_or_path or name_or_path.startswith(PACKAGE_REFERENCE) or not os.path.exists(name_or_path):
        return name_or_path
    path = Path(name_or_path).resolve()
    for package_dir in path.parents:
        if not package_dir.name.isidentifier():
            continue
        try:
            spec = importlib.util.find_spec(package_dir.name)
        except (ImportError, ValueError):
            continue
        locations = [Path(p).resolve() for p in (spec.submodule_search_locations or [])] if spec else []
        if package_dir in locations:
            return f"{PACKAGE_REFERENCE}{package_dir.name}/{path.relative_to(package_dir).as_posix()}"
    return name_or_path


def resolve_reference(reference: str | None) -> str | None:
    """The local path of a ``pkg:PACKAGE/PATH`` reference (error if the package is not installed); other
    references unchanged."""
    if not reference or not reference.startswith(PACKAGE_REFERENCE):
        return reference
    package, _, relative = reference[len(PACKAGE_REFERENCE):].partition("/")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"base model {reference!r} lives in the Python package {package!r}, which is not installed "
                         f"(pip install the package, or pass the model's path explicitly)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise ValueError(f"base model {reference!r}: {path} does not exist in the installed package {package!r}")
    return str(path)


# ------------------------------------------------------------------------------------------- the config


def weights_file(folder: str | os.PathLike) -> Path | None:
    folder = Path(folder)
    return next((folder / n for n in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME) if (folder / n).is_file()), None)


CHECKSUM_FIELD = "adapter_sha256"
UNBOUND_FIELDS = (CHECKSUM_FIELD, "base_model_name_or_path", "revision")  # where the base is, not what the adapter is


def adapter_sha256(weights: str | os.PathLike, config: dict) -> str:
    """sha256 of the weights file's bytes and the config's fields (canonical JSON, base reference left out)."""
    digest = hashlib.sha256()
    with open(weights, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    bound = {k: v for k, v in config.items() if k not in UNBOUND_FIELDS}
    digest.update(json.dumps(bound, sort_keys=True, allow_nan=False).encode())
    return digest.hexdigest()


_LEFTOVER = re.compile(r"^\.(adapter_config\.json|adapter_model\.safetensors)\..+\.tmp$")


@dataclass
class AdapterConfig(PeftConfig):
    """Fields shared by the attention-adapter methods (PEFT's ``task_type``, ``base_model_name_or_path``,
    ``revision`` and ``inference_mode`` come from ``PeftConfig``).

    target_modules: names, name suffixes (a list) or a regex (a string) of the attention modules to adapt;
        None = every attention module that runs through transformers' attention interface.
    layers_to_transform: layer indices (the first number in the attention module's name); None = all.
    modules_to_save: modules trained fully and saved with the adapter (PEFT's ModulesToSaveWrapper);
        ``task_type="SEQ_CLS"`` adds ``classifier`` / ``score`` as PEFT does. ``task_type="IMAGE_CLS"`` (not a
        PEFT task type) is stored as ``modules_to_save=["classifier"]`` with no task type.
    gguf_file: the GGUF file of the base, when it was loaded from one.
    base_model_class: the transformers class the adapter was made for (filled in; checked on load).
    library_version, adapter_sha256: written by ``save_pretrained`` and checked on load.
    """

    PEFT_TYPE: ClassVar[str] = ""
    from_file: ClassVar[bool] = False  # set on instances read by from_pretrained
    default_learning_rate: ClassVar[float]
    learning_rate_grid: ClassVar[tuple[float, ...]]
    # Fields whose default changed, with the old value: a saved file must state them.
    changed_defaults: ClassVar[dict[str, str]] = {}

    target_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    modules_to_save: list[str] | None = None
    gguf_file: str | None = None
    base_model_class: str | None = None
    library_version: str | None = None
    adapter_sha256: str | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        self.peft_type = self.PEFT_TYPE
        if self.task_type is not None:
            self.task_type = str(getattr(self.task_type, "value", self.task_type))
            if self.task_type == IMAGE_CLS:
                self.task_type = None
                self.modules_to_save = sorted(set(self.modules_to_save or []) | {"classifier"})
            elif self.task_type not in TASK_HEADS:
                raise ValueError(f"{owner}.task_type must be one of {sorted(TASK_HEADS) + [IMAGE_CLS]} or None, got {self.task_type!r}")
        super().__post_init__()
        for name in ("modules_to_save", "target_modules"):
            value = getattr(self, name)
            if value is None or (name == "target_modules" and isinstance(value, str)):
                continue
            if isinstance(value, str) or not all(isinstance(m, str) for m in value):
                raise TypeError(f"{owner}.{name} must be a list of module names, got {value!r}")
            setattr(self, name, list(value))
        if self.layers_to_transform is not None:
            layers = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) else self.layers_to_transform
            if isinstance(layers, (str, bytes)) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise ValueError(f"{owner}.layers_to_transform must be non-negative layer indices, got {self.layers_to_transform!r}")
            self.layers_to_transform = list(layers)
        if self.library_version is not None:
            try:
                Version(str(self.library_version))
            except InvalidVersion:
                raise ValueError(f"{owner}.library_version must be a version such as '0.1.0', got {self.library_version!r}") from None
        try:  # a pkg: reference becomes the installed path, for AutoPeftModel*; kept as is where the package is missing
            self.base_model_name_or_path = resolve_reference(self.base_model_name_or_path)
        except ValueError:
            pass  # loading onto a given base does not need it; load_trained resolves it and says what is missing

    def head_module_names(self) -> list[str]:
        heads = list(self.modules_to_save or [])
        return heads + [n for n in TASK_HEADS.get(self.task_type, ()) if n not in heads]

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["base_model_name_or_path"] = portable_reference(out.get("base_model_name_or_path"))
        if out.get("modules_to_save"):  # PeftModelForSequenceClassification appends its head names again
            out["modules_to_save"] = list(dict.fromkeys(out["modules_to_save"]))
        return out

    # ----------------------------------------------------------------------------------- folder

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write ``adapter_config.json`` beside the weights PEFT has just written, with their sha256, atomically."""
        folder = Path(save_directory)
        if folder.is_file():
            raise ValueError(f"{folder} is a file; save_pretrained needs a folder")
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.iterdir():  # temporary files of a save that was killed
            if _LEFTOVER.match(leftover.name):
                leftover.unlink(missing_ok=True)
        data = self.to_dict()
        if kwargs.get("auto_mapping_dict") is not None:
            data["auto_mapping"] = kwargs["auto_mapping_dict"]
        data["library_version"] = library_version()
        data = {k: sorted(v) if isinstance(v, set) else v for k, v in data.items()}
        weights = weights_file(folder)
        data[CHECKSUM_FIELD] = adapter_sha256(weights, data) if weights else None
        write_text(folder / CONFIG_NAME, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        folder = Path(pretrained_model_name_or_path, subfolder or "")
        if (folder / CONFIG_NAME).is_file():
            check_folder(folder, cls)
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config.from_file = True  # its base_model_class is checked against the model it is loaded on
        return config


def read_config_file(folder: str | os.PathLike) -> dict:
    file = Path(folder) / CONFIG_NAME
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}: not a saved adapter folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def check_version(version, source: str) -> None:
    if version is None:
        return
    try:
        written = Version(str(version))
    except InvalidVersion:
        raise ValueError(f"{source}: library_version {version!r} is not a version number") from None
    if written > Version(library_version()):
        raise ValueError(f"{source} was written by ntk-attention {version}, newer than the installed "
                         f"{library_version()}; upgrade ntk-attention to load it")


def check_folder(folder: Path, cls: type[AdapterConfig]) -> None:
    """Refuse a folder whose config is not ``cls``'s, names unknown fields, comes from a newer version, or
    does not match its weights file."""
    data = read_config_file(folder)
    source = str(folder / CONFIG_NAME)
    if "peft_type" not in data and "method" in data:
        raise ValueError(f"{source} is in the format of ntk-attention before the PEFT route; load it with "
                         "ntk_attention.load_legacy_adapter(model, folder) and save it again")
    if data.get("peft_type") != cls.PEFT_TYPE:
        raise ValueError(f"{source}: peft_type {data.get('peft_type')!r} is not {cls.__name__}'s {cls.PEFT_TYPE!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{source}: unknown fields {unknown} for {cls.__name__}")
    check_version(data.get("library_version"), source)
    missing = sorted(set(cls.changed_defaults) - set(data))
    if missing:
        raise ValueError(f"{source} records no {', '.join(missing)}, whose default has changed ("
                         + "; ".join(cls.changed_defaults[name] for name in missing) + "); add the field with the "
                         "value the adapter was trained with")
    weights = weights_file(folder)
    if weights is None:
        raise FileNotFoundError(f"{folder}: no {SAFETENSORS_WEIGHTS_NAME} beside {CONFIG_NAME}")
    recorded = data.get(CHECKSUM_FIELD)
    if not isinstance(recorded, str):
        raise ValueError(f"{source} records no {CHECKSUM_FIELD}, so it cannot be matched with {weights.name}; "
                         "save the adapter again with ntk-attention")
    if adapter_sha256(weights, data) != recorded:
        raise ValueError(f"{weights} does not match {source} (sha256 differs): the folder mixes two saves, or the "
                         "weights or config fields were altered (only base_model_name_or_path / revision may be "
                         "edited); save the adapter again")
