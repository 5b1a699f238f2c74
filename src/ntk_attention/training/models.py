"""Models for training: check and load the base, save and reload the trained result.

Text tasks read their inputs with the model's tokenizer, ``image-classification`` with its image
processor (``load_processor`` gives whichever the task needs); an image classifier always gets a new
head of the task's classes, since a pretrained one is for the pretraining classes.

The methods that make a base trainable are in ``methods.py``. ``save_trained`` / ``load_trained``
write and read a folder that records everything ``ntk-attn eval`` needs (``training_run.json``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
import transformers
from safetensors.torch import load_file, save_file

from . import methods
from .data import TASKS

RUN_FILE = "training_run.json"  # what eval needs: base model, task, method, columns
HEAD_FILE = "head.safetensors"  # the trained head of a `head` run


def check_model_source(model: str, gguf_file: str | None) -> None:
    """Fail at once, in one line, when the model cannot be loaded: a local-looking path that does not
    exist, or a hub name that is neither in the local hub cache nor (when online) on the hub. Without
    this transformers retries the hub for about half a minute and ends in a long traceback."""
    if os.path.exists(model):
        if gguf_file is not None and os.path.isdir(model) and not os.path.isfile(os.path.join(model, gguf_file)):
            raise ValueError(f"GGUF file {gguf_file!r} is not in the model folder {model!r}")
        return
    if _looks_local(model):
        raise ValueError(f"model folder {model!r} does not exist")
    import huggingface_hub

    if isinstance(huggingface_hub.try_to_load_from_cache(model, gguf_file or "config.json"), str):
        return
    if _hub_offline():
        raise ValueError(f"model {model!r} is not a local folder and not in the hub cache, and HF_HUB_OFFLINE "
                         "forbids downloading it")
    try:
        found = huggingface_hub.repo_exists(model)
    except Exception as error:  # no network, proxy, DNS: one line instead of retries
        raise ValueError(f"model {model!r} is not a local folder and not in the hub cache, and the hub cannot "
                         f"be reached ({type(error).__name__}: {error})") from None
    if not found:
        raise ValueError(f"model {model!r} is neither a local folder nor a model on the hub")


def _looks_local(model: str) -> bool:
    """A path rather than a hub name ``NAME`` or ``ORG/NAME``: starts like a path, has a backslash or more
    than one separator, ends in one, names a folder that exists, or is not a valid hub name."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if model.startswith((".", "~", os.path.sep)) or "\\" in model or model.endswith("/") or model.count("/") > 1:
        return True
    if "/" in model and os.path.isdir(model.split("/")[0]):
        return True
    try:
        validate_repo_id(model)
    except HFValidationError:
        return True
    return False


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, also when set after it was imported."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def load_processor(model: str, task: str, gguf_file: str | None = None):
    """The tokenizer of a text model, or the image processor of an image model (ValueError when the model
    has none: ``check_image_processor`` runs before any model is loaded)."""
    if task == "image-classification":
        return check_image_processor(model)
    return load_tokenizer(model, gguf_file)


def check_image_processor(model: str):
    """The model's image processor; ValueError naming the folder when it has none (a ViT saved without
    ``ViTImageProcessor.save_pretrained``)."""
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "preprocessor_config.json")):
        raise ValueError(f"model folder {model!r} has no image processor (preprocessor_config.json): save one "
                         "beside the model, e.g. ViTImageProcessor(...).save_pretrained(folder)")
    try:
        return transformers.AutoImageProcessor.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise ValueError(f"model {model!r}: its image processor could not be loaded ({error})") from None


def load_tokenizer(model: str, gguf_file: str | None = None):
    tokenizer = transformers.AutoTokenizer.from_pretrained(model, **_gguf(gguf_file))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(model: str, task: str, *, num_labels: int | None = None, gguf_file: str | None = None, pad_token_id=None):
    """Load the pretrained model for ``task``; return (model, names of newly initialised head modules)."""
    if task == "classification":
        base, info = transformers.AutoModelForSequenceClassification.from_pretrained(
            model, num_labels=num_labels, output_loading_info=True, dtype=torch.float32, **_gguf(gguf_file)
        )
        head = sorted({key.rsplit(".", 1)[0] for key in info["missing_keys"]})
    elif task == "image-classification":
        base, head = _image_classifier(model, num_labels)
    else:
        base = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, **_gguf(gguf_file))
        head = []
    quantizer = getattr(base, "hf_quantizer", None)
    if gguf_file and quantizer is not None and all(p.is_floating_point() for p in base.parameters()):
        # transformers de-quantises GGUF weights to float32 on load but keeps the GGUF "quantizer",
        # and Trainer refuses to train a "quantized" model that is not a PEFT model.
        quantizer.remove_quantization_config(base)
    if pad_token_id is not None and base.config.pad_token_id is None:  # images: no pad token, no such field
        base.config.pad_token_id = pad_token_id  # sequence classification finds the last token by it
    return base, head


def _image_classifier(model: str, num_labels: int):
    """An image classifier with a new head of ``num_labels`` classes, and that head's module names."""
    base, info = transformers.AutoModelForImageClassification.from_pretrained(
        model, num_labels=num_labels, id2label={i: f"LABEL_{i}" for i in range(num_labels)},
        label2id={f"LABEL_{i}": i for i in range(num_labels)}, ignore_mismatched_sizes=True,
        output_loading_info=True, dtype=torch.float32)
    new = set(info["missing_keys"]) | {key for key, *_ in info["mismatched_keys"]}
    head = sorted({key.rsplit(".", 1)[0] for key in new})
    if not head:
        # the pretrained head has as many classes as this task, but they are the pretraining classes
        classifier = getattr(base, "classifier", None)
        if not isinstance(classifier, torch.nn.Module):
            raise ValueError(f"model {model!r}: its head has {num_labels} outputs already and no module named "
                             "'classifier' to start anew")
        # as a new head starts (ViT's _init_weights, which transformers 5 skips for loaded weights)
        for layer in classifier.modules():
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.trunc_normal_(layer.weight, std=getattr(base.config, "initializer_range", 0.02))
                torch.nn.init.zeros_(layer.bias)
        head = ["classifier"]
    return base, head


def _gguf(gguf_file: str | None) -> dict:
    return {"gguf_file": gguf_file} if gguf_file else {}


def check_prefix_start(folder: str, method: str, task: str, model: str) -> None:
    """``--init-from``: ``folder`` must be a prefix run on the same base model and task, for an ntk run."""
    if method != "ntk":
        raise ValueError(f"--init-from starts an ntk run from a prefix adapter; --method is {method!r}")
    run = read_run(folder)
    if run["method"] != "prefix":
        raise ValueError(f"--init-from {folder!r}: expected a prefix adapter, found method {run['method']!r}")
    if (run["task"], run["base_model"]) != (task, model):
        raise ValueError(f"--init-from {folder!r} was trained for {run['task']} on {run['base_model']!r}, "
                         f"this run is {task} on {model!r}")


def ntk_from_prefix_adapter(folder: str, options: dict):
    """A trainable NTK model whose ``(Z, k)`` is the closed form of the prefix adapter in ``folder``
    (its trained head comes along); returns (model, head module names)."""
    from ..convert import ntk_from_prefix

    prefix_model, _, run = load_trained(folder)
    return ntk_from_prefix(prefix_model, **options).train(), run.get("head_modules", [])


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: torch.nn.Module, head_modules: list[str]) -> dict:
    """Trainable parameters, with and without the head (the head trains in every method)."""
    trainable = trainable_parameters(model)
    head = sum(p.numel() for name, p in trainable.items() if any(f"{h}." in name for h in head_modules))
    total = sum(p.numel() for p in trainable.values())
    return {"trainable_params": total, "trainable_params_excl_head": total - head,
            "total_params": sum(p.numel() for p in model.parameters())}


def save_trained(model, method: str, run: dict, folder: str, tokenizer=None) -> None:
    """Write the trained result and ``training_run.json`` into ``folder``, atomically: everything goes
    to a temporary folder beside it, which then replaces ``folder``."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".saving-", dir=parent)
    try:
        if method == "head":
            state = {name: p.detach().cpu().contiguous() for name, p in trainable_parameters(model).items()}
            save_file(state, os.path.join(staging, HEAD_FILE))
        else:
            model.save_pretrained(staging)
        if method == "full" and tokenizer is not None:
            tokenizer.save_pretrained(staging)
        from ..tuners.config import portable_reference

        with open(os.path.join(staging, RUN_FILE), "w") as handle:  # a base inside a pip package as pkg:NAME/PATH
            json.dump({**run, "base_model": portable_reference(run["base_model"]), "method": method}, handle, indent=2)
        old = None
        if os.path.exists(folder):
            old = tempfile.mkdtemp(prefix=".replaced-", dir=parent)
            os.replace(folder, os.path.join(old, "previous"))
        os.replace(staging, folder)
        if old:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_run(folder: str) -> dict:
    path = os.path.join(folder, RUN_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{folder!r} is not a trained-model folder from ntk-attn train: {RUN_FILE} is missing")
    with open(path) as handle:
        run = json.load(handle)
    missing = [key for key in ("base_model", "task", "method") if key not in run]
    if missing:
        raise ValueError(f"{path}: invalid run record: missing {missing}")
    if run["method"] not in methods.NAMES:
        raise ValueError(f"{path}: invalid run record: unknown method {run['method']!r} (known: {sorted(methods.NAMES)})")
    if run["task"] not in TASKS:
        raise ValueError(f"{path}: invalid run record: unknown task {run['task']!r} (known: {list(TASKS)})")
    return run


def load_trained(folder: str, model: str | None = None, gguf_file: str | None = None):
    """Rebuild (model, tokenizer, run record) from a folder written by ``save_trained``. ``model`` (and its
    ``gguf_file``) replaces the recorded base, e.g. when that lives on another machine; a recorded
    ``pkg:PACKAGE/PATH`` resolves to the installed package."""
    from ..tuners.config import resolve_reference

    run = read_run(folder)
    method, task = run["method"], run["task"]
    if method == "full":
        tokenizer = load_processor(folder, task)
        auto = {"classification": transformers.AutoModelForSequenceClassification,
                "image-classification": transformers.AutoModelForImageClassification}.get(task, transformers.AutoModelForCausalLM)
        return auto.from_pretrained(folder, dtype=torch.float32), tokenizer, run
    if model is not None:
        check_model_source(model, gguf_file)
        base_model = model
    else:
        base_model, gguf_file = resolve_reference(run["base_model"]), run.get("gguf_file")
    tokenizer = load_processor(base_model, task, gguf_file)
    base, _ = load_base(base_model, task, num_labels=run.get("num_labels"),
                        gguf_file=gguf_file, pad_token_id=getattr(tokenizer, "pad_token_id", None))
    if method == "head":
        state = load_file(os.path.join(folder, HEAD_FILE))
        missing = sorted(set(state) - set(base.state_dict()))
        if missing:
            raise ValueError(f"{folder}: head weights {missing} do not belong to {base_model}")
        base.load_state_dict(state, strict=False)
        return base.eval(), tokenizer, run
    import peft

    from ..tuners import load_legacy_adapter
    from ..tuners.config import read_config_file

    if method == "lora" or "peft_type" in read_config_file(folder):
        loaded = peft.PeftModel.from_pretrained(base, folder)
    else:
        loaded = load_legacy_adapter(base, folder)
    return loaded.eval(), tokenizer, run
