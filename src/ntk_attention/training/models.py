"""Models for training: load the base, make it trainable for a method, save and reload the result.

Methods: ``ntk`` and ``prefix`` (this package's tuners), ``lora`` (PEFT), ``full`` (every weight),
``head`` (the new classification head only). Head policy, the same for every method: on a
classification task the freshly initialised head always trains. ``build_method_model`` is the one
place that turns a base model into a trainable one; ``save_trained`` / ``load_trained`` write and
read a folder that records everything ``ntk-attn eval`` needs (``training_run.json``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile

import torch
import transformers
from safetensors.torch import load_file, save_file

METHODS = ("ntk", "prefix", "lora", "full", "head")
RUN_FILE = "training_run.json"  # what eval needs: base model, task, method, columns
HEAD_FILE = "head.safetensors"  # the trained head of a `head` run


def check_model_source(model: str, gguf_file: str | None) -> None:
    """Fail before training when a local model folder or its GGUF file is not there (hub names are
    checked by the hub)."""
    looks_local = model.startswith((".", os.path.sep, "~"))
    if looks_local and not os.path.exists(model):
        raise ValueError(f"model folder {model!r} does not exist")
    if gguf_file is not None and os.path.isdir(model) and not os.path.isfile(os.path.join(model, gguf_file)):
        raise ValueError(f"GGUF file {gguf_file!r} is not in the model folder {model!r}")


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
    else:
        base = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, **_gguf(gguf_file))
        head = []
    quantizer = getattr(base, "hf_quantizer", None)
    if gguf_file and quantizer is not None and all(p.is_floating_point() for p in base.parameters()):
        # transformers de-quantises GGUF weights to float32 on load but keeps the GGUF "quantizer",
        # and Trainer refuses to train a "quantized" model that is not a PEFT model.
        quantizer.remove_quantization_config(base)
    if base.config.pad_token_id is None and pad_token_id is not None:
        base.config.pad_token_id = pad_token_id  # sequence classification finds the last token by it
    return base, head


def _gguf(gguf_file: str | None) -> dict:
    return {"gguf_file": gguf_file} if gguf_file else {}


def method_config(method: str, task: str, options: dict):
    """The config object for ``method`` with ``options`` (from ``--config key=value``) applied.
    LoRA defaults to r=8 on PEFT's per-architecture targets (query/value for BERT, q_proj/v_proj
    for Llama)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if method in ("full", "head"):
        if options:
            raise ValueError(f"method {method!r} takes no --config options, got {sorted(options)}")
        if method == "head" and task != "classification":
            raise ValueError("method 'head' trains a classification head; it needs a classification task")
        return None
    if method == "lora":
        import peft

        defaults = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1}
        task_type = peft.TaskType.SEQ_CLS if task == "classification" else peft.TaskType.CAUSAL_LM
        return _make_config(peft.LoraConfig, {**defaults, **options, "task_type": task_type}, method)
    from ..tuners import METHODS as TUNER_METHODS
    from ..tuners.ntk.config import fold_feature_options

    if method == "ntk":  # --config feature_map=random num_features=64 joins the spec
        options = fold_feature_options(options)
    return _make_config(TUNER_METHODS[method].config_class, options, method)


def _make_config(config_class, options: dict, method: str):
    known = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown {method} config field(s) {unknown}; known fields: {sorted(known)}")
    return config_class(**options)


def build_method_model(base: torch.nn.Module, method: str, config, head_modules: list[str],
                       gguf_file: str | None = None) -> torch.nn.Module:
    """Wrap or freeze ``base`` for ``method``; the head modules train in every method."""
    if method == "full":
        return base.requires_grad_(True)
    if method == "head":
        base.requires_grad_(False)
        for name in head_modules:
            base.get_submodule(name).requires_grad_(True)
        return base
    config = copy.deepcopy(config)
    config.modules_to_save = sorted(set(config.modules_to_save or []) | set(head_modules))
    if method == "lora":
        import peft

        return peft.get_peft_model(base, config)
    import peft

    config.task_type = "SEQ_CLS" if head_modules else "CAUSAL_LM" if base.can_generate() else None
    config.gguf_file = gguf_file
    return peft.get_peft_model(base, config)


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
    if missing or run["method"] not in METHODS or run["task"] not in ("classification", "causal-lm"):
        raise ValueError(f"{path}: invalid run record (missing {missing} or unknown method/task)")
    return run


def load_trained(folder: str, model: str | None = None, gguf_file: str | None = None):
    """Rebuild (model, tokenizer, run record) from a folder written by ``save_trained``. ``model`` (and its
    ``gguf_file``) replaces the recorded base, e.g. when that lives on another machine; a recorded
    ``pkg:PACKAGE/PATH`` resolves to the installed package."""
    from ..tuners.config import resolve_reference

    run = read_run(folder)
    method, task = run["method"], run["task"]
    if method == "full":
        tokenizer = load_tokenizer(folder)
        auto = transformers.AutoModelForSequenceClassification if task == "classification" else transformers.AutoModelForCausalLM
        return auto.from_pretrained(folder, dtype=torch.float32), tokenizer, run
    if model is not None:
        check_model_source(model, gguf_file)
        base_model = model
    else:
        base_model, gguf_file = resolve_reference(run["base_model"]), run.get("gguf_file")
    tokenizer = load_tokenizer(base_model, gguf_file)
    base, _ = load_base(base_model, task, num_labels=run.get("num_labels"),
                        gguf_file=gguf_file, pad_token_id=tokenizer.pad_token_id)
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
