"""A free Z breaks causal decoders; Z = diag(k) W (the default) keeps the NTK term bounded.

The first query of a causal decoder sees only itself, so its own mass ``sum_l e^{s_il}`` is about 1
(SmolLM2-135M: ``e^{-6}`` to ``e^{9}`` across layers and rows). A free ``Z`` moved by a few Adam
steps adds ``phi(q)^T Z`` there while ``phi(q)^T k`` can be ~0 (the projection holds half of k at
0), so the attention output leaves the range of the values it averages and the model breaks.
"""

from __future__ import annotations

import pytest
import torch
from tuner_models import build, inputs_for, train_steps

from ntk_attention import NTKConfig, adapter_states, get_ntk_model
from ntk_attention.tuners.ntk.layer import _Gated


def output_over_value_range(z_parametrization: str, lr: float) -> torch.Tensor:
    """After 3 AdamW steps of the default config on a tiny Llama: per query position, the largest
    ``|attention output|`` over the largest ``|value|`` (and ``|W|``, the tied values) it can average."""
    model = get_ntk_model(build("llama-gqa"), NTKConfig(task_type="CAUSAL_LM", z_parametrization=z_parametrization))
    batch = inputs_for("llama-gqa", batch=4, length=16)
    batch["attention_mask"][:] = 1
    batch["labels"] = batch["input_ids"]
    train_steps(model, batch, 3, lr)
    ratios = []

    def record(layer, args, kwargs, out):
        value = args[2]
        bound = value.abs().amax(dim=(0, 2)).repeat_interleave(layer.geometry.heads // value.shape[1], 0)  # [H, D]
        if layer.tied:
            bound = torch.maximum(bound, layer.m * layer.z.detach().abs().amax(dim=1))  # the values m W
        ratios.append((out.abs().amax(dim=0) / bound.unsqueeze(1)).amax(dim=(0, 2)))  # [L]

    for layer in adapter_states(model):
        layer.register_forward_hook(record, with_kwargs=True)
    model.eval()
    with torch.no_grad():
        model(**batch)
    return torch.stack(ratios).amax(dim=0)


@pytest.mark.parametrize("lr", [1e-4, 1e-3])
def test_default_keeps_every_attention_output_within_its_values(lr):
    ratio = output_over_value_range("tied", lr)
    assert (ratio <= 1 + 1e-5).all(), ratio  # a weighted average of values and W, at every position


def test_free_z_leaves_the_value_range_at_the_first_position():
    ratio = output_over_value_range("free", 1e-3)
    assert ratio[0] > 2, ratio  # what broke SmolLM2 (loss 1.6 -> 8 after one step)
    assert ratio[0] == ratio.max()  # the first query, with the least mass of its own, goes furthest


def test_values_train_behind_closed_gates():
    k = torch.tensor([[0.0, 2.0]], requires_grad=True)
    w = torch.tensor([[[1.0, -1.0], [3.0, 0.5]]], requires_grad=True)
    z = _Gated.apply(k, w)
    assert torch.equal(z, torch.tensor([[[0.0, 0.0], [6.0, 1.0]]]))  # the forward is diag(k) W
    grad = torch.tensor([[[1.0, 2.0], [-1.0, 1.0]]])
    z.backward(grad)
    assert torch.equal(w.grad, grad)  # as if every gate were open, also where k = 0
    assert torch.equal(k.grad, (grad * w).sum(-1))  # the true gradient of k
