"""Every architecture: identity at the start, parameter count, training touches only the adapter,
the loss goes down, save/load gives identical outputs on a fresh base, disable/unload."""

from __future__ import annotations

import pytest
import torch
from tuner_models import ARCHS, adapter_names, build, inputs_for, randomize_adapter

from ntk_attention import NTKConfig, NTKModel, PrefixConfig, get_ntk_model

ARCH_NAMES = list(ARCHS)


def logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_identity_at_init_and_parameter_count(arch):
    base, batch = build(arch), inputs_for(arch)
    reference = logits(base, batch)
    model = get_ntk_model(base, NTKConfig(k_init=0.0))  # the exact start (the default starts with a little mass)
    assert torch.equal(logits(model, batch), reference)
    layer = model.adapter_layers()[0]
    heads, d = layer.geometry.heads, layer.geometry.head_dim
    ntk_params = sum(p.numel() for n, p in model.adapter_state_dict().items() if ".ntk_adapter." in n)
    assert ntk_params == len(model.adapter_layers()) * heads * (d * d + d)
    assert len(model.adapter_layers()) == 2


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("method", ["ntk", "prefix"])
def test_training_changes_only_the_adapter_and_lowers_the_loss(arch, method):
    task = ARCHS[arch][1]
    config = NTKConfig(task_type=task) if method == "ntk" else PrefixConfig(num_virtual_tokens=4, task_type=task)
    model = get_ntk_model(build(arch), config)
    batch = inputs_for(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".ntk_adapter." in n or n.split("base_model.")[-1].startswith(("classifier", "score")) for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def eval_loss():  # without dropout, so that the comparison is not noise
        model.eval()
        with torch.no_grad():
            return model(**batch).loss.item()

    start = eval_loss()
    model.train()
    for step in range(6):
        model(**batch).loss.backward()
        if step == 0 and method == "ntk":
            for n in trainable:  # every NTK tensor trains from the first step
                grad = dict(model.named_parameters())[n].grad
                assert grad is not None and grad.abs().sum() > 0, n
        optimizer.step()
        optimizer.zero_grad()
    assert eval_loss() < start
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in trainable), n


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("config", [NTKConfig(), PrefixConfig(num_virtual_tokens=3)], ids=["ntk", "prefix"])
def test_save_load_round_trip_on_a_fresh_base(arch, config, tmp_path):
    batch = inputs_for(arch)
    config.task_type = ARCHS[arch][1]
    model = get_ntk_model(build(arch), config)
    randomize_adapter(model)
    for p in model.parameters():  # the trained heads too
        if p.requires_grad:
            p.data.add_(0.01)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)
    assert {f.name for f in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    loaded = NTKModel.from_pretrained(build(arch), tmp_path)
    assert torch.equal(logits(loaded, batch), expected)
    assert adapter_names(loaded) == adapter_names(model)
    assert not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("arch", ["llama-gqa", "bert"])
def test_disable_adapter_and_unload_give_the_base_back(arch):
    base, batch = build(arch), inputs_for(arch)
    reference = logits(base, batch)
    names = {n for n, _ in base.named_parameters()}
    model = get_ntk_model(base, NTKConfig(task_type=ARCHS[arch][1]))
    randomize_adapter(model)
    for p in model.parameters():
        if p.requires_grad:
            p.data.add_(0.1)
    adapted = logits(model, batch)
    assert not torch.allclose(adapted, reference)
    with model.disable_adapter():
        assert torch.equal(logits(model, batch), reference)
    assert torch.equal(logits(model, batch), adapted)
    unloaded = model.unload()
    assert unloaded is base and torch.equal(logits(unloaded, batch), reference)
    assert {n for n, _ in unloaded.named_parameters()} == names
    assert all(p.requires_grad for p in unloaded.parameters())
    assert unloaded.config._attn_implementation == "sdpa"


def test_layers_to_transform_and_print(capsys):
    model = get_ntk_model(build("llama-gqa"), NTKConfig(layers_to_transform=[1]))
    assert [n for n in model.adapter_state_dict()] == ["model.layers.1.self_attn.ntk_adapter.z", "model.layers.1.self_attn.ntk_adapter.k"]
    model.print_trainable_parameters()
    assert "trainable params: 1,088" in capsys.readouterr().out
    with pytest.raises(ValueError, match="layers_to_transform"):
        get_ntk_model(build("llama-gqa"), NTKConfig(layers_to_transform=[7]))


def test_eager_base_implementation_is_kept():
    torch.manual_seed(0)
    base = build("llama-gqa")
    base.set_attn_implementation("eager")
    batch = inputs_for("llama-gqa")
    reference = logits(base, batch)
    model = get_ntk_model(base, NTKConfig(k_init=0.0))
    real = batch["attention_mask"].bool()  # fully masked padding rows are arbitrary in both
    assert torch.allclose(logits(model, batch)[real], reference[real], atol=1e-5)
    randomize_adapter(model)
    with model.disable_adapter():
        assert torch.equal(logits(model, batch), reference)


def test_load_for_further_training(tmp_path):
    model = get_ntk_model(build("bert"), NTKConfig(task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path)
    loaded = NTKModel.from_pretrained(build("bert"), tmp_path, is_trainable=True)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    assert loaded.adapter_config == model.adapter_config
