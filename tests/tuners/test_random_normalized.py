"""``random:normalize=true``: positive random features divided by their sum, times sqrt(r)."""

from __future__ import annotations

import math

import pytest
import torch
from tuner_models import build, inputs_for

from ntk_attention import NTKConfig, get_feature_map, get_ntk_model, ntk_attention
from ntk_attention.ops.naive import ntk_attention_naive
from ntk_attention.tuners.ntk.config import fold_feature_options


def plain_formula(x, scale, w):
    """phi_f(x) = exp(w_f.y - |y|^2 / 2) / sqrt(r), y = x sqrt(scale); then phi / sum(phi) * sqrt(r)."""
    y = x.double() * math.sqrt(scale)
    r = w.shape[-1]
    phi = torch.exp(y @ w.double() - 0.5 * (y * y).sum(-1, keepdim=True)) / math.sqrt(r)
    return phi / phi.sum(-1, keepdim=True) * math.sqrt(r)


@pytest.mark.parametrize("num_features", [None, 8])
def test_values_against_the_plain_formula(num_features):
    spec = "random:normalize=true" if num_features is None else f"random:num_features={num_features}:normalize=true"
    fmap = get_feature_map(spec)
    plain = get_feature_map("random" if num_features is None else f"random:num_features={num_features}")
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    r = fmap.feature_dim(16)
    assert r == (16 if num_features is None else num_features)
    w = fmap.projection(16, x.device, torch.float64)
    torch.testing.assert_close(w, plain.projection(16, x.device, torch.float64), rtol=0, atol=0)  # same features
    out = fmap(x, 0.25)
    torch.testing.assert_close(out, plain_formula(x, 0.25, w), rtol=1e-12, atol=1e-14)
    # the same weights as the plain map, with a total of sqrt(r) for every query
    base = plain(x, 0.25)
    torch.testing.assert_close(out, base / base.sum(-1, keepdim=True) * math.sqrt(r), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.sum(-1), torch.full(x.shape[:-1], math.sqrt(r), dtype=torch.float64))
    assert (out > 0).all()


def test_large_queries_keep_their_mass():
    """Plain features underflow for |x| large (exp(-|x|^2/2)); normalised ones keep a total of sqrt(r)."""
    fmap = get_feature_map("random:normalize=true")
    x = torch.randn(4, 32) * 40.0
    assert get_feature_map("random")(x, 1.0).sum(-1).max() == 0.0
    out = fmap(x, 1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(-1), torch.full((4,), math.sqrt(32.0)))


def test_spec_is_canonical_and_plain_specs_do_not_change():
    assert get_feature_map("random:normalize=true").spec() == "random:normalize=true:seed=0"
    assert get_feature_map("random:normalize=false").spec() == "random:seed=0"
    assert get_feature_map("random:64:normalize=true").spec() == "random:normalize=true:num_features=64:seed=0"
    assert NTKConfig(feature_map="random:normalize=true").feature_map == "random:normalize=true:seed=0"
    # a variant spec ntk:feature_map=random:normalize=true gives these two config fields
    assert fold_feature_options({"feature_map": "random", "normalize": True}) == {"feature_map": "random:normalize=true:seed=0"}
    with pytest.raises(ValueError, match="normalize must be true or false"):
        get_feature_map("random:normalize=1")


@pytest.mark.parametrize("causal", [False, True])
def test_ntk_attention_matches_the_naive_formula(causal):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 7, 16) * 3.0, torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    z, kvec = torch.randn(4, 16, 16) * 0.3, torch.rand(4, 16)
    fmap = get_feature_map("random:normalize=true")
    args = [t.clone().requires_grad_() for t in (q, k, v, z, kvec)]
    ref = [t.clone().requires_grad_() for t in (q, k, v, z, kvec)]
    out = ntk_attention(*args, feature_map=fmap, causal=causal)
    expected = ntk_attention_naive(*ref, feature_map=fmap, causal=causal)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for a, b in zip(args, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_adapter_starts_at_identity_and_trains():
    base, batch = build("llama-gqa"), inputs_for("llama-gqa")
    with torch.no_grad():
        reference = base(**batch).logits
    model = get_ntk_model(base, NTKConfig(feature_map="random:normalize=true"))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)
    model(**batch).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
