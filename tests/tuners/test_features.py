"""Config options: low rank, k parametrisations, feature maps, feature dropout; gradient
checkpointing and bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from tuner_models import build, inputs_for, randomize_adapter

from ntk_attention import NTKConfig, PrefixConfig, adapter_config, adapter_states, get_ntk_model
from ntk_attention.tuners.ntk.layer import _NonNegative


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "config",
    [NTKConfig(rank=4, k_init=0.0), NTKConfig(feature_map="random:num_features=24", k_init=0.0),
     NTKConfig(feature_map="taylor:degree=2", k_init=0.0)],
    ids=["rank4", "random24", "taylor2"],
)
def test_options_start_at_identity_and_train_every_tensor(config):
    base, batch = build("llama-gqa"), inputs_for("llama-gqa")
    with torch.no_grad():
        reference = base(**batch).logits
    model = get_ntk_model(base, config)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)
    _, grads = loss_and_grads(model, batch)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_low_rank_shapes_and_count():
    model = get_ntk_model(build("llama-gqa"), NTKConfig(rank=4))
    shapes = {n.rsplit(".", 1)[-1]: tuple(p.shape) for n, p in get_peft_model_state_dict(model).items()}
    assert shapes == {"z_a": (4, 16, 4), "z_b": (4, 4, 16), "k": (4, 16)}


@pytest.mark.parametrize("tied", ["tied", "free"])
def test_state_per_kv_head_is_a_query_head_state_repeated_over_the_group(tied, tmp_path):
    """llama-gqa has 4 query heads on 2 KV heads: per_kv_head stores half the state, and behaves as
    the per-query-head adapter whose state repeats each KV head's over its group."""
    batch = inputs_for("llama-gqa")
    shared = get_ntk_model(build("llama-gqa"), NTKConfig(per_kv_head=True, z_parametrization=tied))
    randomize_adapter(shared)
    assert {tuple(p.shape) for p in get_peft_model_state_dict(shared).values()} == {(2, 16, 16), (2, 16)}
    repeated = get_ntk_model(build("llama-gqa"), NTKConfig(z_parametrization=tied))
    with torch.no_grad():
        for a, b in zip(adapter_states(shared), adapter_states(repeated)):
            for name, p in a.named_parameters():
                getattr(b, name).copy_(p.repeat_interleave(2, 0))
    torch.testing.assert_close(shared(**batch).logits, repeated(**batch).logits, rtol=1e-5, atol=1e-6)
    _, grads = loss_and_grads(shared, batch)
    assert all(g.abs().sum() > 0 for g in grads.values())
    shared.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build("llama-gqa"), tmp_path)
    assert adapter_config(loaded).per_kv_head and torch.equal(loaded(**batch).logits, shared(**batch).logits)
    with pytest.raises(TypeError, match="per_kv_head"):
        NTKConfig(per_kv_head="yes")


def test_k_stays_non_negative_and_recovers():
    theta = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    k = _NonNegative.apply(theta)
    assert k.tolist() == [0.0, 0.0, 2.0]
    k.backward(torch.tensor([1.0, 1.0, 1.0]))  # descent would lower k everywhere
    assert theta.grad.tolist() == [0.0, 1.0, 1.0]  # blocked only below 0
    theta.grad = None
    _NonNegative.apply(theta).backward(torch.tensor([-1.0, -1.0, -1.0]))  # descent would raise k
    assert theta.grad.tolist() == [-1.0, -1.0, -1.0]


def test_denominator_stays_positive_whatever_the_optimizer_does():
    model = get_ntk_model(build("llama-gqa"), NTKConfig())
    with torch.no_grad():
        for layer in adapter_states(model):
            layer.k.fill_(-5.0)  # an optimizer overshoot
            _, kvec = layer.ntk_state()
            assert (kvec >= 0).all()
    loss, _ = loss_and_grads(model, inputs_for("llama-gqa"))
    assert torch.isfinite(loss)


def test_virtual_prefix_length_scales_the_state():
    model = get_ntk_model(build("llama-gqa"), NTKConfig(virtual_prefix_length=8.0))
    randomize_adapter(model)
    layer = adapter_states(model)[0]
    z, k = layer.ntk_state()
    per_token_k = layer.k.clamp_min(0)
    assert torch.equal(k, 8.0 * per_token_k)  # the mass and the values of Z = diag(k) W are both stored / m
    torch.testing.assert_close(z, (8.0 * per_token_k).unsqueeze(-1) * (8.0 * layer.z), rtol=1e-6, atol=0)


def test_paper_parametrisation_is_not_an_identity_start():
    base, batch = build("llama-gqa"), inputs_for("llama-gqa")
    with torch.no_grad():
        reference = base(**batch).logits
        model = get_ntk_model(base, NTKConfig(k_parametrization="softplus", k_init=0.018, virtual_prefix_length=1.0))
        assert torch.allclose(adapter_states(model)[0].ntk_state()[1], torch.full((4, 16), 0.018))
        assert not torch.equal(model(**batch).logits, reference)


def test_feature_dropout_only_in_training():
    model = get_ntk_model(build("llama-gqa"), NTKConfig(feature_dropout=0.5))
    randomize_adapter(model)
    batch = {k: v for k, v in inputs_for("llama-gqa").items() if k != "labels"}
    with torch.no_grad():
        eval_out = model(**batch).logits
        assert torch.equal(model(**batch).logits, eval_out)
        model.train()
        torch.manual_seed(0)
        train_a = model(**batch).logits
        torch.manual_seed(1)
        train_b = model(**batch).logits
    assert not torch.equal(train_a, train_b)


@pytest.mark.parametrize("config", [NTKConfig(), PrefixConfig(num_virtual_tokens=4)], ids=["ntk", "prefix"])
def test_gradient_checkpointing_gives_the_same_gradients(config):
    batch = inputs_for("llama-gqa")
    plain = get_ntk_model(build("llama-gqa"), config)
    randomize_adapter(plain)
    plain.train()
    loss, grads = loss_and_grads(plain, batch)
    checkpointed = get_ntk_model(build("llama-gqa"), config)
    randomize_adapter(checkpointed)
    checkpointed.activation_checkpointing_enable()
    assert checkpointed.is_gradient_checkpointing
    checkpointed.train()
    loss_ckpt, grads_ckpt = loss_and_grads(checkpointed, batch)
    assert torch.allclose(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        assert torch.allclose(grads[name], grads_ckpt[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("arch", ["llama-gqa", "bert"])
def test_bf16_autocast_runs_and_trains(arch):
    model = get_ntk_model(build(arch), NTKConfig())
    randomize_adapter(model, scale=0.1)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**inputs_for(arch)).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() and g.dtype == torch.float32 for g in grads)
