"""The PEFT route on every architecture, as PEFT's test_custom_models.py does it: one table of
configurations crossed with architectures, each run through get_peft_model, training, save_pretrained,
PeftModel.from_pretrained, disable/unload; then PEFT's multi-adapter, Auto* and modules_to_save API."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from peft import (
    AutoPeftModelForCausalLM,
    AutoPeftModelForSequenceClassification,
    LoraConfig,
    PeftConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
)
from tuner_models import ARCHS, adapter_names, build, inputs_for, randomize_adapter

from ntk_attention import NTKConfig, PrefixConfig, adapter_states
from ntk_attention.tuners.attention_hook import ADAPTER_ATTR

# name -> config factory (task_type filled in per architecture)
CONFIGS = {
    "ntk": lambda: NTKConfig(),
    "ntk-free": lambda: NTKConfig(z_parametrization="free", k_parametrization="softplus", k_init=0.018),
    "ntk-random-rank": lambda: NTKConfig(feature_map="random:num_features=12:seed=2", rank=4),
    "ntk-taylor-per-kv": lambda: NTKConfig(feature_map="taylor:degree=1", per_kv_head=True, k_parametrization="signed"),
    "prefix": lambda: PrefixConfig(num_virtual_tokens=3),
}
TABLE = [(c, a) for c in CONFIGS for a in ARCHS if not (c == "ntk-taylor-per-kv" and a in ("bert", "roberta", "vit", "gpt2"))]


def make(config_name: str, arch: str):
    config = dataclasses.replace(CONFIGS[config_name](), task_type=ARCHS[arch][1])
    return get_peft_model(build(arch), config), inputs_for(arch)


def logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def is_head(name: str) -> bool:
    return ".modules_to_save." in name


@pytest.mark.parametrize("config_name,arch", TABLE)
def test_train_save_load_disable_unload(config_name, arch, tmp_path):
    model, batch = make(config_name, arch)
    reference = logits(build(arch), batch)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{ADAPTER_ATTR}." in n or is_head(n) for n in trainable)
    assert any(is_head(n) for n in trainable) == (ARCHS[arch][1] != "CAUSAL_LM")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.eval()
    with torch.no_grad():
        start = model(**batch).loss.item()
    model.train()
    for _ in range(5):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        assert model(**batch).loss.item() < start
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable

    expected = logits(model, batch)
    with model.disable_adapter():
        assert torch.equal(logits(model, batch), reference)
    model.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {f.name for f in tmp_path.iterdir()}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == model.peft_config["default"].peft_type

    loaded = PeftModel.from_pretrained(build(arch), tmp_path)
    assert torch.equal(logits(loaded, batch), expected)
    assert adapter_names(loaded) == adapter_names(model)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable_again = PeftModel.from_pretrained(build(arch), tmp_path, is_trainable=True)
    assert {n for n, p in trainable_again.named_parameters() if p.requires_grad} == trainable

    base = loaded.unload()
    assert not any(hasattr(m, ADAPTER_ATTR) for m in base.modules())
    assert base.config._attn_implementation == "sdpa"
    if ARCHS[arch][1] == "CAUSAL_LM":
        assert torch.equal(logits(base, batch), reference)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_default_starts_exactly_at_the_base_and_every_tensor_trains(arch):
    base, batch = build(arch), inputs_for(arch)
    reference = logits(base, batch)
    model = get_peft_model(base, dataclasses.replace(NTKConfig(), task_type=ARCHS[arch][1]))
    assert torch.equal(logits(model, batch), reference)  # heads are copies of the base's until trained
    model.train()
    model(**batch).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), \
        [n for n, g in grads.items() if g is None or not g.abs().sum() > 0]
    states = adapter_states(model)
    heads, d = states[0].geometry.heads, states[0].geometry.head_dim
    assert len(states) == 2
    assert sum(p.numel() for n, p in get_peft_model_state_dict(model).items() if f".{ADAPTER_ATTR}." in n) == 2 * heads * (d * d + d)


def test_named_adapters_add_set_disable_delete():
    model, batch = make("ntk", "llama-gqa")
    randomize_adapter(model, seed=1)
    first = logits(model, batch)
    model.add_adapter("other", NTKConfig(task_type="CAUSAL_LM"))
    model.set_adapter("other")
    randomize_adapter(model, seed=2)
    second = logits(model, batch)
    assert not torch.allclose(first, second)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other." in n for n in trainable)
    model.set_adapter("default")
    assert torch.equal(logits(model, batch), first)
    with model.disable_adapter():
        assert torch.equal(logits(model, batch), logits(build("llama-gqa"), batch))
    model.delete_adapter("default")
    assert list(model.peft_config) == ["other"]
    assert torch.equal(logits(model, batch), second)
    assert all(list(layer.states) == ["other"] for layer in (getattr(m, ADAPTER_ATTR) for m in model.modules() if hasattr(m, ADAPTER_ATTR)))


def test_several_adapters_saved_and_loaded_by_name(tmp_path):
    model, batch = make("prefix", "bert")
    randomize_adapter(model, seed=1)
    model.add_adapter("b", PrefixConfig(num_virtual_tokens=2, task_type="SEQ_CLS"))
    model.set_adapter("b")
    randomize_adapter(model, seed=2)
    expected_b = logits(model, batch)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "b" / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(build("bert"), tmp_path)
    loaded.load_adapter(tmp_path / "b", adapter_name="b")
    loaded.set_adapter("b")
    assert torch.equal(logits(loaded, batch), expected_b)


def test_two_active_adapters_are_refused():
    model, batch = make("ntk", "llama-gqa")
    model.add_adapter("other", NTKConfig(task_type="CAUSAL_LM"))
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="one at a time"):
        logits(model, batch)


def test_unload_keeps_the_trained_head_as_peft_does_and_merge_is_refused():
    model, batch = make("ntk", "bert")
    original = build("bert").classifier.weight.detach().clone()
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    trained = model.base_model.model.classifier.modules_to_save["default"].weight.detach().clone()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    assert model.get_base_model() is model.base_model.model
    base = model.unload()
    assert torch.equal(base.classifier.weight, trained) and not torch.equal(base.classifier.weight, original)
    assert not any(hasattr(m, ADAPTER_ATTR) for m in base.modules())


def test_modules_to_save_and_layers_to_transform(capsys):
    model = get_peft_model(build("llama-gqa"), NTKConfig(layers_to_transform=[1], modules_to_save=["lm_head"]))
    names = sorted(get_peft_model_state_dict(model))
    assert names == ["base_model.model.lm_head.weight",
                     "base_model.model.model.layers.1.self_attn.attention_adapter.ntk_state.k",
                     "base_model.model.model.layers.1.self_attn.attention_adapter.ntk_state.z"]
    model.print_trainable_parameters()
    assert "trainable params: 7,488" in capsys.readouterr().out  # 4 heads x (16^2 + 16) + lm_head 100 x 64
    with pytest.raises(ValueError, match="matches no attention module"):
        get_peft_model(build("llama-gqa"), NTKConfig(layers_to_transform=[7]))
    with pytest.raises(ValueError, match="matches no attention module"):
        get_peft_model(build("llama-gqa"), NTKConfig(target_modules=["q_proj"]))


def test_peft_config_and_auto_models_from_a_recorded_local_base(tmp_path):
    for arch, auto in (("llama-gqa", AutoPeftModelForCausalLM), ("bert", AutoPeftModelForSequenceClassification)):
        base_dir, adapter_dir = tmp_path / arch / "base", tmp_path / arch / "adapter"
        base = build(arch)
        base.save_pretrained(base_dir)
        model = get_peft_model(type(base).from_pretrained(base_dir), NTKConfig(task_type=ARCHS[arch][1]))
        randomize_adapter(model)
        batch = inputs_for(arch)
        expected = logits(model, batch)
        model.save_pretrained(adapter_dir)
        config = PeftConfig.from_pretrained(adapter_dir)
        assert isinstance(config, NTKConfig) and config.base_model_name_or_path == str(base_dir)
        loaded = auto.from_pretrained(adapter_dir)
        assert torch.allclose(logits(loaded, batch), expected, atol=1e-6)


def test_eager_base_implementation_is_kept():
    base = build("llama-gqa")
    base.set_attn_implementation("eager")
    batch = inputs_for("llama-gqa")
    reference = logits(base, batch)
    model = get_peft_model(base, NTKConfig(k_init=0.0))
    real = batch["attention_mask"].bool()  # fully masked padding rows are arbitrary in both
    assert torch.allclose(logits(model, batch)[real], reference[real], atol=1e-5)
    randomize_adapter(model)
    with model.disable_adapter():
        assert torch.equal(logits(model, batch), reference)


def test_one_method_per_model():
    lora = get_peft_model(build("llama-gqa"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError):
        lora.add_adapter("ntk", NTKConfig())


def test_importing_registers_once():
    import importlib

    import peft.mapping

    import ntk_attention.tuners.ntk as ntk_method

    importlib.reload(ntk_method)  # a second registration of the same method is a no-op
    assert peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING["NTK"].__qualname__ == "NTKConfig"
    assert peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING["PREFIX_ATTENTION"] == "prefix_attention_"
