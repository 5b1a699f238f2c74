"""Bad input gets a clear error naming what is wrong; nothing loads partially or silently."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from tuner_models import build

from ntk_attention import NTKConfig, PrefixConfig, get_feature_map, ntk_attention
from ntk_attention.tuners.config import adapter_sha256


@pytest.fixture()
def saved(tmp_path):
    model = get_peft_model(build("llama-gqa"), NTKConfig())
    model.save_pretrained(tmp_path)
    return tmp_path


def rewrite_config(folder, **edit):
    """Edit fields and sign the result, as a consistent file with those values would be."""
    path = folder / "adapter_config.json"
    data = {**json.loads(path.read_text()), **edit}
    data["adapter_sha256"] = adapter_sha256(folder / "adapter_model.safetensors", data)
    path.write_text(json.dumps(data))


def test_config_fields_edited_by_hand_are_refused_except_the_base_reference(saved):
    path = saved / "adapter_config.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "base_model_name_or_path": "my-org/my-base", "revision": "v2"}))
    assert PeftModel.from_pretrained(build("llama-gqa"), saved).peft_config["default"].revision == "v2"
    path.write_text(json.dumps({**data, "virtual_prefix_length": 33.0}))
    with pytest.raises(ValueError, match="config fields were altered"):
        PeftModel.from_pretrained(build("llama-gqa"), saved)


def test_adapter_for_a_base_of_another_shape(saved):
    other = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=100, hidden_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128))
    with pytest.raises(ValueError, match=r"ntk_state\.default\.[zk] has shape \(4, 16(, 16)?\), this model needs \(4, 24(, 24)?\)"):
        PeftModel.from_pretrained(other, saved)


def test_adapter_with_missing_layers(saved):
    deeper = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128))
    with pytest.raises(ValueError, match=r"do not fit this model: missing \['base_model\.model\.model\.layers\.2"):
        PeftModel.from_pretrained(deeper, saved)


def test_truncated_or_altered_weights_are_refused(saved):
    weights = saved / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:100])
    with pytest.raises(ValueError, match="sha256 differs"):
        PeftModel.from_pretrained(build("llama-gqa"), saved)
    altered = bytearray(good)
    altered[-3] ^= 0x01  # one bit of the last tensor: still finite, still parses
    weights.write_bytes(bytes(altered))
    with pytest.raises(ValueError, match="does not match .*adapter_config.json"):
        PeftModel.from_pretrained(build("llama-gqa"), saved)


def test_config_and_weights_of_two_saves_are_refused(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for folder, value in ((first, 0.1), (second, 0.2)):
        model = get_peft_model(build("llama-gqa"), NTKConfig())
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.fill_(value)
        model.save_pretrained(folder)
    (first / "adapter_model.safetensors").write_bytes((second / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="mixes two saves"):
        PeftModel.from_pretrained(build("llama-gqa"), first)


def test_leftovers_of_a_killed_save_are_removed(saved):
    leftover = saved / ".adapter_config.json.abc123.tmp"
    leftover.write_text("{half")
    get_peft_model(build("llama-gqa"), NTKConfig()).save_pretrained(saved)
    assert not leftover.exists()
    assert PeftModel.from_pretrained(build("llama-gqa"), saved)


def test_non_finite_values_with_a_matching_checksum(saved):
    weights = saved / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = next(n for n in tensors if n.endswith(".z"))
    tensors[name][0, 0, 0] = float("nan")
    save_file(tensors, weights)
    rewrite_config(saved)
    with pytest.raises(ValueError, match="must hold finite"):
        PeftModel.from_pretrained(build("llama-gqa"), saved)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"library_version": "99.0.0"}, "written by ntk-attention 99.0.0, newer than the installed"),
        ({"library_version": "garbage"}, r"adapter_config.json: library_version 'garbage' is not a version number"),
        ({"peft_type": "PREFIX_ATTENTION"}, "unknown fields"),
        ({"surprise": 1}, r"unknown fields \['surprise'\]"),
        ({"rank": 3}, "rank must be None"),
        ({"virtual_prefix_length": "32"}, r"NTKConfig.virtual_prefix_length must be a number"),
        ({"base_model_class": "BertForSequenceClassification"}, "made for a BertForSequenceClassification, this model is a LlamaForCausalLM"),
    ],
)
def test_bad_config_file(saved, edit, message):
    rewrite_config(saved, **edit)
    with pytest.raises((ValueError, TypeError), match=message):
        PeftModel.from_pretrained(build("llama-gqa"), saved)


def test_config_file_is_not_json(saved):
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError):  # PEFT reads peft_type first: json's own error
        PeftModel.from_pretrained(build("llama-gqa"), saved)
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        NTKConfig.from_pretrained(saved)


def test_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):
        PeftModel.from_pretrained(build("llama-gqa"), tmp_path / "nothing")


def test_config_records_what_loading_needs(saved):
    data = json.loads((saved / "adapter_config.json").read_text())
    assert data["peft_type"] == "NTK" and data["base_model_class"] == "LlamaForCausalLM"
    assert data["adapter_sha256"] == adapter_sha256(saved / "adapter_model.safetensors", data)
    assert {"base_model_name_or_path", "gguf_file", "task_type", "library_version", "virtual_prefix_length", "feature_map"} <= data.keys()


class NoInterfaceModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = build("llama-gqa").config
        self.attn = nn.MultiheadAttention(8, 2)


def test_model_without_the_attention_interface():
    with pytest.raises(TypeError, match="need a transformers PreTrainedModel, got NoInterfaceModel"):
        get_peft_model(NoInterfaceModel(), NTKConfig())
    model = tf.GPT2Model(tf.GPT2Config(n_embd=16, n_layer=1, n_head=2))
    model.h[0].attn = nn.Identity()  # an attention module that does not dispatch through ALL_ATTENTION_FUNCTIONS
    with pytest.raises(TypeError, match="GPT2Model does not route attention through transformers' AttentionInterface"):
        get_peft_model(model, NTKConfig())


def test_unsupported_base_implementation_and_a_second_method():
    model = build("llama-gqa")
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2'"):
        get_peft_model(model, NTKConfig())
    wrapped = get_peft_model(build("llama-gqa"), NTKConfig())
    with pytest.raises(ValueError, match="already has a NTKLayer"):
        get_peft_model(wrapped.get_base_model(), PrefixConfig())
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        get_peft_model(wrapped.get_base_model(), NTKConfig())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"feature_map": "cosine"}, "unknown feature_map 'cosine'"),
        ({"feature_map": "elu:num_features=8"}, "feature_map='elu:num_features=8'"),
        ({"k_parametrization": "softplus", "k_init": 0.0}, "k_init must be > 0"),
        ({"virtual_prefix_length": 0}, "virtual_prefix_length must be > 0"),
        ({"virtual_prefix_length": float("inf")}, "virtual_prefix_length must be finite"),
        ({"virtual_prefix_length": "32"}, "virtual_prefix_length must be a number"),
        ({"k_init": float("nan")}, "k_init must be finite"),
        ({"rank": 4.0}, "rank must be an int"),
        ({"rank_init_std": -1.0}, "rank_init_std must be >= 0"),
        ({"per_kv_head": 1}, "per_kv_head must be True or False"),
        ({"feature_dropout": 1.0}, "feature_dropout must be < 1"),
        ({"task_type": "TRANSLATE"}, "task_type must be one of"),
        ({"modules_to_save": "classifier"}, "modules_to_save must be a list"),
        ({"layers_to_transform": [-1]}, "layers_to_transform must be non-negative"),
    ],
)
def test_bad_ntk_config_fields(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        NTKConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"num_virtual_tokens": 0}, "num_virtual_tokens must be >= 1"), ({"num_virtual_tokens": 2.5}, "num_virtual_tokens must be an int"),
     ({"init_std": float("inf")}, "init_std must be finite"), ({"init_std": True}, "init_std must be a number")],
)
def test_bad_prefix_config_fields(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        PrefixConfig(**kwargs)


def test_rank_above_what_z_can_hold_is_refused_before_anything_is_attached():
    model = build("llama-gqa")
    with pytest.raises(ValueError, match=r"rank=1000 is above what Z \[r=16, d_v=16\] can hold"):
        get_peft_model(model, NTKConfig(rank=1000))
    assert model.config._attn_implementation == "sdpa"
    assert get_peft_model(model, NTKConfig(rank=16))  # the same model takes a config that fits


def test_sequence_classification_needs_a_head():
    model = tf.BertModel(tf.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ValueError, match="task_type='SEQ_CLS' trains the head .*BertModel has none"):
        get_peft_model(model, NTKConfig(task_type="SEQ_CLS"))


def test_modules_to_save_must_exist():
    with pytest.raises(ValueError, match="modules_to_save"):
        get_peft_model(build("llama-gqa"), NTKConfig(modules_to_save=["head"]))


def test_callable_feature_map_of_the_wrong_size_gives_the_shape_error():
    q = k = v = torch.randn(1, 2, 3, 8)
    fmap = get_feature_map(lambda x: torch.exp(x[..., :3]), num_features=5)  # claims 5, gives 3
    with pytest.raises((ValueError, RuntimeError)) as info:
        ntk_attention(q, k, v, torch.zeros(2, 5, 8), torch.zeros(2, 5), feature_map=fmap)
    assert "cannot be saved" not in str(info.value)
    assert "CallableFeatureMap" in repr(fmap)


def test_wrong_head_layout_at_call_time():
    from transformers import AttentionInterface

    from ntk_attention.tuners.attention_hook import hook_name

    model = get_peft_model(build("llama-gqa"), NTKConfig())
    attention = model.get_base_model().model.layers[0].self_attn
    hook = AttentionInterface()[hook_name("sdpa")]
    q, kv = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)  # head dim 8, the adapter was built for 16
    with pytest.raises(RuntimeError, match="adapter built for HeadGeometry"):
        hook(attention, q, kv, kv, None, 0.0, 0.35)
