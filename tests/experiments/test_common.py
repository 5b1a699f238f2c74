"""The closed form and the measuring tools the theory experiments rest on."""

import math

import pytest
import torch

from ntk_attention import get_feature_map, ntk_attention, prefix_attention, prefix_to_ntk
from ntk_attention.experiments.common import (
    FitConfig,
    InputSampler,
    NTKState,
    apply_quick,
    check_prefix_lengths,
    feature_map_label,
    fit_ntk_state,
    no_prefix_attention,
    parse_feature_map,
    prefix_effect_error,
    prefix_mass_share,
)
from ntk_attention.experiments.rank import truncate


def test_one_token_prefix_with_an_exact_feature_map_is_prefix_attention():
    """phi(x) = exp(scale x.p - scale |p|^2 / 2) is exact for the single key p: phi(q) phi(p) = e^{scale q.p}."""
    sampler = InputSampler("projected", 8, seed=1)
    q, k, v = sampler.qkv(2, 5)
    prefix_k, prefix_v = sampler.prefix(1)
    p = prefix_k[0, 0]

    def exact_for_p(x, scale):
        return torch.exp(scale * x @ p.to(x.dtype) - scale * (p @ p) / 2).unsqueeze(-1)

    fmap = get_feature_map(exact_for_p, num_features=1)
    z, kvec = prefix_to_ntk(prefix_k, prefix_v, feature_map=fmap)
    out = ntk_attention(q, k, v, z, kvec, feature_map=fmap)
    torch.testing.assert_close(out, prefix_attention(q, k, v, prefix_k, prefix_v), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("m", [1, 2, 4])
def test_taylor_closed_form_is_near_exact_for_small_logits(m):
    """Degree-2 Taylor misses e^s by about s^3/6: tiny for |s| ~ 0.01, so tiny prefixes are reproduced."""
    sampler = InputSampler("gaussian", 8, seed=m, sigma=0.1)
    q, k, v = sampler.qkv(2, 6)
    prefix_k, prefix_v = sampler.prefix(m)
    exact = prefix_attention(q, k, v, prefix_k, prefix_v)
    z, kvec = prefix_to_ntk(prefix_k, prefix_v, feature_map="taylor")
    out = ntk_attention(q, k, v, z, kvec, feature_map="taylor")
    err = prefix_effect_error(out, exact, no_prefix_attention(q, k, v))
    assert err["rel_error"] < 1e-4
    # the ELU+1 map is not a kernel approximation: on the same prefix it misses by far more
    z, kvec = prefix_to_ntk(prefix_k, prefix_v, feature_map="elu")
    elu = prefix_effect_error(ntk_attention(q, k, v, z, kvec, feature_map="elu"), exact, no_prefix_attention(q, k, v))
    assert elu["rel_error"] > 100 * err["rel_error"]


def test_prefix_effect_error_is_0_when_exact_and_1_when_the_prefix_is_dropped():
    sampler = InputSampler("uniform", 4, seed=0)
    q, k, v = sampler.qkv(1, 3)
    prefix_k, prefix_v = sampler.prefix(7)
    exact = prefix_attention(q, k, v, prefix_k, prefix_v)
    no_prefix = no_prefix_attention(q, k, v)
    assert prefix_effect_error(exact, exact, no_prefix) == {"rel_error": 0.0, "mse": 0.0}
    dropped = prefix_effect_error(no_prefix, exact, no_prefix)
    assert dropped["rel_error"] == pytest.approx(1.0)
    assert dropped["mse"] == pytest.approx((no_prefix - exact).pow(2).mean().item())


def test_prefix_mass_share_over_chunks_matches_the_direct_softmax():
    sampler = InputSampler("projected", 8, seed=3)
    q, k, _ = sampler.qkv(2, 5)
    prefix_k, _ = sampler.prefix(50)
    scores = q @ torch.cat([prefix_k.expand(2, 1, 50, 8), k], dim=2).transpose(-1, -2) / math.sqrt(8)
    direct = torch.softmax(scores, -1)[..., :50].sum(-1).mean().item()
    assert prefix_mass_share(q, k, prefix_k, chunk=7) == pytest.approx(direct, rel=1e-10)


def test_closed_form_of_a_long_prefix_matches_one_pass_sums():
    """prefix_to_ntk sums in chunks at large m; the sums must equal the plain ones."""
    sampler = InputSampler("uniform", 4, seed=5)
    prefix_k, prefix_v = sampler.prefix(10_000)
    fmap = get_feature_map("random", num_features=16)
    z, kvec = prefix_to_ntk(prefix_k, prefix_v, feature_map=fmap)
    phi = fmap(prefix_k, 4**-0.5)
    torch.testing.assert_close(z, phi.transpose(-1, -2) @ prefix_v)
    torch.testing.assert_close(kvec, phi.sum(-2))


def test_input_sampler_distributions():
    uniform = InputSampler("uniform", 16, seed=0).qkv(4, 64)[0]
    assert uniform.abs().max() <= 1 and uniform.std().item() == pytest.approx(1 / math.sqrt(3), rel=0.1)
    gaussian = InputSampler("gaussian", 16, seed=0, sigma=0.5).qkv(4, 64)[0]
    assert gaussian.std().item() == pytest.approx(0.5, rel=0.1)
    # projected: keys and values of a token come from the same token, so they are correlated
    sampler = InputSampler("projected", 16, seed=0)
    k, v = sampler.prefix(4000)
    assert (k[0].T @ v[0] / 4000).abs().max() > 0.3
    # the same seed draws the same inputs
    torch.testing.assert_close(InputSampler("projected", 16, seed=0).prefix(4000)[0], k)


def test_fit_reduces_the_error_of_the_start():
    sampler = InputSampler("uniform", 8, seed=0)
    q, k, v = sampler.qkv(2, 16)
    prefix_k, prefix_v = sampler.prefix(32)
    fmap = get_feature_map("taylor")
    z, kvec, losses = fit_ntk_state(sampler, prefix_k, prefix_v, fmap, FitConfig(steps=60, lr=0.03, batch=4, length=16))
    assert z.shape == (1, fmap.feature_dim(8), 8) and kvec.shape == (1, fmap.feature_dim(8))
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    exact = prefix_attention(q, k, v, prefix_k, prefix_v)
    err = prefix_effect_error(ntk_attention(q, k, v, z, kvec, feature_map=fmap), exact, no_prefix_attention(q, k, v))
    assert err["rel_error"] < 1.0  # better than dropping the prefix


@pytest.mark.parametrize("spec", ["random:64", "elu"])
def test_fit_is_stable_when_the_prefix_holds_almost_all_the_mass(spec):
    # 16384 prefix keys against 16 input tokens: the denominator is almost all phi(q)^T k, so a k that
    # starts far below a real prefix's makes every step on Z huge (a start at 1% of it: loss 0.05 -> 3e3)
    sampler = InputSampler("projected", 16, seed=0)
    prefix_k, prefix_v = sampler.prefix(16384)
    _, _, losses = fit_ntk_state(sampler, prefix_k, prefix_v, parse_feature_map(spec),
                                 FitConfig(steps=40, lr=0.01, batch=2, length=16))
    assert max(losses) < 2 * losses[0] and losses[-1] < losses[0]


def test_low_rank_state_and_truncation():
    fmap = get_feature_map("elu")
    state = NTKState(fmap, m=10, head_dim=8, value_dim=8, kappa0=torch.ones(8), rank=3)
    z, kvec = state()
    assert z.shape == (1, 8, 8) and torch.count_nonzero(z) == 0  # Z_B starts at 0
    torch.testing.assert_close(kvec, 10 * torch.ones(1, 8))
    full = torch.randn(1, 20, 8, dtype=torch.float64)
    assert torch.linalg.matrix_rank(truncate(full, 3)[0]) == 3
    torch.testing.assert_close(truncate(full, 8), full)


@pytest.mark.parametrize("rank", [0, 9])
def test_rank_that_does_not_fit_is_refused(rank):
    with pytest.raises(ValueError, match="rank s must be between 1 and min"):
        NTKState(get_feature_map("elu"), m=10, head_dim=8, value_dim=8, kappa0=torch.ones(8), rank=rank)


@pytest.mark.parametrize(
    "spec, message",
    [("softmax", "unknown feature_map"), ("elu:3", "expected key=value"), ("random:x", "num_features must be a positive int"),
     ("taylor:5", "degree must be 1 or 2"), ("random:0", "num_features must be a positive int")],
)
def test_bad_feature_map_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_feature_map(spec)


def test_feature_map_specs():
    assert parse_feature_map("taylor:1").spec() == "taylor:degree=1"
    assert parse_feature_map("random:32").feature_dim(8) == 32
    assert feature_map_label(parse_feature_map("random:num_features=32:seed=4")) == "random:32"


def test_bad_inputs_and_lengths():
    with pytest.raises(ValueError, match="unknown input kind"):
        InputSampler("cauchy", 8)
    with pytest.raises(ValueError, match="m must be >= 1"):
        InputSampler("uniform", 8).prefix(0)
    with pytest.raises(ValueError, match="integers >= 1"):
        check_prefix_lengths([4, 0])


def test_quick_keeps_what_the_user_set():
    import argparse

    def add_arguments(parser):
        parser.add_argument("--a", type=int, default=1)
        parser.add_argument("--b", type=int, default=2)
        parser.add_argument("--quick", action="store_true")

    args = argparse.Namespace(a=5, b=2, quick=True)
    apply_quick(args, add_arguments, {"a": 10, "b": 20})
    assert (args.a, args.b) == (5, 20)


def test_prefix_share_is_the_direct_ratio_and_stable():
    from ntk_attention.experiments.common import prefix_share

    scores = torch.randn(3, 5, 7, dtype=torch.float64)
    c = torch.rand(3, 5, dtype=torch.float64) * 4
    c[0, 0] = 0  # an NTK row whose phi(q)^T k was clamped at 0 holds no prefix mass
    direct = c / (c + scores.exp().sum(-1))
    torch.testing.assert_close(prefix_share(torch.logsumexp(scores, -1), c.log()), direct)
    huge = prefix_share(torch.tensor([800.0, -800.0]), torch.tensor([900.0, -900.0]))
    assert torch.isfinite(huge).all() and huge[0] > 0.99 and huge[1] < 0.01
