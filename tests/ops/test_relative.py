"""relative_ntk_attention against its plain reference: values and gradients over shapes, masks, GQA,
state per query or per KV head, dtypes; the zero state is SDPA exactly."""

import pytest
import torch
import torch.nn.functional as F

from ntk_attention.ops.naive import relative_ntk_attention_naive
from ntk_attention.ops.relative import relative_ntk_attention

SHAPES = [  # B, H, H_kv, L, S, D
    (2, 4, 4, 6, 6, 8),
    (1, 4, 2, 5, 5, 8),  # GQA
    (2, 6, 2, 3, 9, 16),  # decoding several tokens over a cache
    (1, 4, 1, 1, 7, 8),  # one decode step
]
MASKS = ["none", "causal", "bool", "additive", "bool+causal"]


def inputs(B, H, H_kv, L, S, D, dtype, per_kv_head=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    heads = H_kv if per_kv_head else H

    def rand(*shape, positive=False):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        return (x.abs() if positive else x).to(dtype).requires_grad_(True)

    return (rand(B, H, L, D), rand(B, H_kv, S, D), rand(B, H_kv, S, D), rand(heads, D, D),
            rand(heads, D, positive=True))


def mask_for(kind, B, L, S):
    causal = "causal" in kind
    if kind.startswith("bool"):
        mask = torch.rand(B, 1, L, S, generator=torch.Generator().manual_seed(1)) > 0.3
        mask[..., -1] = True  # the newest key stays visible, so no row is empty under causal
        return mask, causal
    if kind == "additive":
        return torch.randn(B, 1, L, S, generator=torch.Generator().manual_seed(2)), causal
    return None, causal


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("per_kv_head", [False, True])
def test_matches_reference_with_gradients(shape, kind, dtype, tol, per_kv_head):
    B, H, H_kv, L, S, D = shape
    q, k, v, z, kvec = inputs(*shape, dtype, per_kv_head)
    mask, causal = mask_for(kind, B, L, S)
    out = relative_ntk_attention(q, k, v, z, kvec, causal=causal, attn_mask=mask)
    ref = relative_ntk_attention_naive(q, k, v, z, kvec, causal=causal, attn_mask=mask)
    assert out.shape == (B, H, L, D) and out.dtype == dtype
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v, z, kvec))
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v, z, kvec))
    for name, a, b in zip("q k v z kvec".split(), grads, ref_grads):
        torch.testing.assert_close(a, b, atol=10 * tol, rtol=10 * tol, msg=f"gradient of {name}")


def test_zero_state_is_sdpa_bit_for_bit_and_trains():
    q, k, v, z, kvec = inputs(2, 4, 2, 6, 6, 8, torch.float32)
    with torch.no_grad():
        z.zero_()
        kvec.zero_()
    out = relative_ntk_attention(q, k, v, z, kvec, causal=True)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(out, expected)
    gz, gk = torch.autograd.grad(out.square().sum(), (z, kvec))
    assert gz.abs().sum() > 0 and gk.abs().sum() > 0  # both get a gradient at the exact start


def test_share_does_not_depend_on_the_rows_own_mass():
    """Scaling every score up (a sharper row, more mass) leaves the prefix's share unchanged."""
    q, k, v, z, kvec = inputs(1, 2, 2, 4, 4, 8, torch.float64)
    v = torch.zeros_like(v)  # the output is then the prefix term alone: N / (1 + c)
    out = relative_ntk_attention(q, k, v, z, kvec)
    shifted = relative_ntk_attention(q, k + 0.0, v, z, kvec, attn_mask=torch.full((1, 1, 4, 4), 5.0, dtype=torch.float64))
    torch.testing.assert_close(out, shifted)


def test_bfloat16_close_to_float32():
    q, k, v, z, kvec = inputs(2, 4, 2, 8, 8, 16, torch.float32)
    ref = relative_ntk_attention(q, k, v, z, kvec, causal=True)
    out = relative_ntk_attention(*(x.detach().bfloat16() for x in (q, k, v)), z, kvec, causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("L,S", [(0, 5), (3, 0), (0, 0)])
def test_empty_sequences(L, S):
    q, k, v, z, kvec = inputs(2, 4, 2, L, S, 8, torch.float32)
    out = relative_ntk_attention(q, k, v, z, kvec)
    ref = relative_ntk_attention_naive(q, k, v, z, kvec)
    assert out.shape == (2, 4, L, 8)
    torch.testing.assert_close(out, ref)


def test_bad_state_shape_is_named():
    q, k, v, z, kvec = inputs(1, 4, 2, 3, 3, 8, torch.float32)
    with pytest.raises(ValueError, match="z"):
        relative_ntk_attention(q, k, v, z[:, :4], kvec)
