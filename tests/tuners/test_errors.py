"""Bad input gets a clear error naming what is wrong; nothing loads partially."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from torch import nn
from tuner_models import build

from ntk_attention import NTKConfig, PrefixConfig, adapter_config, get_ntk_model
from ntk_attention.tuners import read_adapter_config


@pytest.fixture()
def saved(tmp_path):
    model = get_ntk_model(build("llama-gqa"), NTKConfig())
    model.save_pretrained(tmp_path)
    return tmp_path


def test_adapter_for_a_base_of_another_shape(saved):
    import transformers as tf

    other = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=100, hidden_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128))
    with pytest.raises(ValueError, match=r"ntk_adapter\.z has shape \(4, 16, 16\), this model needs \(4, 24, 24\)"):
        PeftModel.from_pretrained(other, saved)


def test_adapter_with_missing_layers(saved):
    import transformers as tf

    deeper = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128))
    with pytest.raises(ValueError, match=r"does not fit this model: missing \['model\.layers\.2"):
        PeftModel.from_pretrained(deeper, saved)


def test_corrupt_safetensors(saved):
    weights = saved / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable safetensors file"):
        PeftModel.from_pretrained(build("llama-gqa"), saved)


def test_non_finite_values(saved):
    from safetensors.torch import load_file, save_file

    weights = saved / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.0.self_attn.ntk_adapter.z"][0, 0, 0] = float("nan")
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="must hold finite"):
        PeftModel.from_pretrained(build("llama-gqa"), saved)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"library_version": "99.0.0"}, "written by ntk-attention 99.0.0, newer than the installed"),
        ({"method": "lora"}, "field 'method' must be one of"),
        ({"surprise": 1}, r"unknown fields \['surprise'\]"),
        ({"rank": 3}, "rank must be None"),
    ],
)
def test_bad_config_file(saved, edit, message):
    path = saved / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(build("llama-gqa"), saved)


def test_config_file_is_not_json(saved):
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        read_adapter_config(saved)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        PeftModel.from_pretrained(build("llama-gqa"), tmp_path)


def test_config_records_what_eval_needs(saved):
    data = json.loads((saved / "adapter_config.json").read_text())
    assert data["method"] == "ntk" and data["base_model_class"] == "LlamaForCausalLM"
    assert {"base_model_name_or_path", "gguf_file", "task_type", "library_version", "virtual_prefix_length"} <= data.keys()


class NoInterfaceModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = build("llama-gqa").config
        self.attn = nn.MultiheadAttention(8, 2)


def test_model_without_the_attention_interface():
    from transformers import GPT2Config, GPT2Model

    with pytest.raises(TypeError, match="needs a transformers PreTrainedModel.*NoInterfaceModel"):
        get_ntk_model(NoInterfaceModel(), NTKConfig())
    model = GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2))
    model.h[0].attn = nn.Identity()  # an attention module that does not dispatch through ALL_ATTENTION_FUNCTIONS
    with pytest.raises(TypeError, match="GPT2Model does not route attention through transformers' AttentionInterface"):
        get_ntk_model(model, NTKConfig())


def test_unsupported_base_implementation_and_double_wrap():
    model = build("llama-gqa")
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2'"):
        get_ntk_model(model, NTKConfig())
    wrapped = get_ntk_model(build("llama-gqa"), NTKConfig())
    with pytest.raises(ValueError, match="already has an NTK/prefix adapter"):
        get_ntk_model(wrapped, NTKConfig())
    with pytest.raises(ValueError, match="already has an NTK/prefix adapter"):
        get_ntk_model(wrapped.base_model, PrefixConfig())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"feature_map": "cosine"}, "feature_map must be one of"),
        ({"num_features": 8}, r"\['num_features'\] do not apply to feature_map='elu'"),
        ({"k_parametrization": "softplus", "k_init": 0.0}, "k_init must be > 0"),
        ({"virtual_prefix_length": 0}, "virtual_prefix_length must be > 0"),
        ({"feature_dropout": 1.0}, "feature_dropout must be in"),
        ({"task_type": "TRANSLATE"}, "task_type must be one of"),
        ({"modules_to_save": "classifier"}, "modules_to_save must be a list"),
    ],
)
def test_bad_config_fields(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        NTKConfig(**kwargs)


def test_modules_to_save_must_exist():
    with pytest.raises(ValueError, match="modules_to_save: no module named 'head'"):
        get_ntk_model(build("llama-gqa"), NTKConfig(modules_to_save=["head"]))


def test_wrong_head_layout_at_call_time():
    from transformers import AttentionInterface

    from ntk_attention.tuners.attention_hook import hook_name

    model = get_ntk_model(build("llama-gqa"), NTKConfig())
    attention = model.base_model.model.layers[0].self_attn
    hook = AttentionInterface()[hook_name("sdpa")]
    q, kv = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)  # head dim 8, the adapter was built for 16
    with pytest.raises(RuntimeError, match="adapter built for HeadGeometry"):
        hook(attention, q, kv, kv, None, scaling=0.35)
