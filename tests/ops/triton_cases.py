"""Cases for the Triton kernel (``backend="triton"``) against ops/naive.py: values and gradients.

Run by test_triton.py: on CUDA in its own process, compiled, in every dtype; without a GPU in a
child process under Triton's interpreter on CPU tensors, in float32 (the interpreter's bfloat16
dot products are not exact). ``TRITON_INTERPRET=1`` must be set before triton itself is imported
(its own library functions are compiled or interpreted then), which in a test session has long
happened, hence the child. By hand: ``TRITON_INTERPRET=1 pytest tests/ops/triton_cases.py``.
"""

import os
import warnings

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'ntk-attention[triton]')")

CUDA = torch.cuda.is_available()
if not CUDA:
    from ntk_attention.ops.fused import triton_ntk

    if not triton_ntk.INTERPRETED or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and triton not interpreted: run with TRITON_INTERPRET=1 set before python starts",
                    allow_module_level=True)

from test_attention import assert_close, make_inputs, make_mask  # noqa: E402

from ntk_attention import get_feature_map, ntk_attention  # noqa: E402
from ntk_attention.ops import BackendRefused, select_backend  # noqa: E402
from ntk_attention.ops.backends import TRITON  # noqa: E402
from ntk_attention.ops.naive import ntk_attention_naive  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if CUDA else [torch.float32]
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 1e-2}

# B, H, H_kv, L, S, D, Dv: several 16-wide tiles under the interpreter, decode (L = 1), L > S, GQA,
# D_v != D, head dims that are not powers of two.
SHAPES = [
    (1, 1, 1, 1, 1, 4, 4),
    (2, 4, 2, 20, 37, 8, 8),
    (1, 4, 1, 1, 40, 16, 16),  # decode over a cache, MQA
    (1, 2, 2, 33, 9, 8, 8),  # more queries than keys: top causal rows see nothing
    (2, 2, 2, 17, 17, 12, 5),
    (1, 3, 3, 5, 23, 4, 12),
]


@pytest.fixture(autouse=True)
def quiet_interpreter():
    with warnings.catch_warnings():  # numpy's log(0) = -inf inside the interpreter is intended
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def check(q, k, v, z, kvec, fmap, causal, mask, dtype):
    def call():
        return ntk_attention(q, k, v, z, kvec, feature_map=fmap, causal=causal, attn_mask=mask, backend="triton")

    forward_only = dtype != torch.float32 and q.shape[-1] > TRITON.verified_half_grad_head_dim
    if forward_only:  # refused with gradients (backends.Triton says why); the forward is checked
        with pytest.raises(BackendRefused, match="triton: gradients in"):
            call()
        with torch.no_grad():
            out = call()
    else:
        out = call()
    inputs = [t.detach().float().requires_grad_() if t.dtype != torch.float32 else t for t in (q, k, v, z, kvec)]
    ref = ntk_attention_naive(*inputs, fmap, causal, mask)
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out.float(), ref, dtype, "output")
    if forward_only:
        return
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)).to(ref.device)
    grads = torch.autograd.grad(out, (q, k, v, z, kvec), g.to(dtype))
    ref_grads = torch.autograd.grad(ref, inputs, g)
    for name, a, b in zip("q k v z kvec".split(), grads, ref_grads):
        assert a.dtype == b.dtype if dtype == torch.float32 else True
        assert_close(a.float(), b, dtype, f"grad {name}")


@pytest.fixture(autouse=True)
def tolerances(monkeypatch):
    import test_attention

    monkeypatch.setattr(test_attention, "TOL", {**test_attention.TOL, **TOL})


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind,causal", [(None, False), (None, True), ("padding", True), ("random-bool", False),
                                              ("float", True)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_reference(shape, mask_kind, causal, dtype):
    B, H, H_kv, L, S, D, Dv = shape
    fmap = get_feature_map("elu")
    q, k, v, z, kvec = make_inputs(B, H, H_kv, L, S, D, Dv, fmap, dtype, DEVICE)
    check(q, k, v, z, kvec, fmap, causal, make_mask(mask_kind, B, H, L, S, DEVICE), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128])
def test_triton_head_dims_64_and_128(dtype, D):
    fmap = get_feature_map("elu")
    q, k, v, z, kvec = make_inputs(1, 2, 1, 18, 18, D, D, fmap, dtype, DEVICE, z_scale=0.05)
    check(q, k, v, z, kvec, fmap, True, None, dtype)


@pytest.mark.parametrize("fmap", [get_feature_map("taylor"), get_feature_map("taylor", degree=1),
                                  get_feature_map("random", num_features=24, seed=3)], ids=repr)
def test_triton_other_feature_maps_take_the_statistics_from_pytorch(fmap):
    q, k, v, z, kvec = make_inputs(2, 2, 1, 6, 19, 4, 4, fmap, torch.float32, DEVICE, z_scale=0.1)
    check(q, k, v, z, kvec, fmap, True, make_mask("padding", 2, 2, 6, 19, DEVICE), torch.float32)


def test_triton_takes_strided_views():
    """q, k, v as a model hands them over: [B, L, H, D] projections seen through transpose(1, 2)."""
    fmap = get_feature_map("elu")
    q, k, v, z, kvec = make_inputs(2, 4, 2, 19, 19, 8, 8, fmap, torch.float32, DEVICE)
    q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
    assert not q.is_contiguous()
    check(q, k, v, z, kvec, fmap, True, None, torch.float32)


@pytest.mark.parametrize("causal", [False, True])
def test_triton_state_per_kv_head(causal):
    fmap = get_feature_map("elu")
    q, k, v, z, kvec = make_inputs(2, 6, 2, 5, 21, 8, 4, fmap, torch.float32, DEVICE)
    z_kv, kvec_kv = z[:2].detach().requires_grad_(), kvec[:2].detach().requires_grad_()
    check(q, k, v, z_kv, kvec_kv, fmap, causal, None, torch.float32)


@pytest.mark.parametrize("logit", [1e3, -1e3])
def test_triton_stable_for_logits_in_the_thousands(logit):
    fmap = get_feature_map("elu")
    _, _, v, z, kvec = make_inputs(1, 2, 2, 8, 8, 4, 4, fmap, torch.float32, DEVICE)
    gen = torch.Generator().manual_seed(5)
    u = torch.randn(4, generator=gen)
    k = (u + 0.1 * torch.randn(1, 2, 8, 4, generator=gen)).to(DEVICE).requires_grad_()
    q = (u * logit / (0.5 * u.dot(u))).expand(1, 2, 8, 4).to(DEVICE).clone().requires_grad_()
    out = ntk_attention(q, k, v, z, kvec, causal=True, backend="triton")
    ref = ntk_attention_naive(*(t.double() for t in (q, k, v, z, kvec)), fmap, True, None)
    assert torch.isfinite(out).all()
    assert_close(out, ref.float(), torch.float32, "output")
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.sum(), (q, k, v, z, kvec)))


def test_triton_identity_start_is_softmax_attention_and_trains():
    fmap = get_feature_map("elu")
    q, k, v, z, kvec = make_inputs(2, 4, 2, 12, 12, 8, 8, fmap, torch.float32, DEVICE)
    with torch.no_grad():
        z.zero_()
        kvec.zero_()
    out = ntk_attention(q, k, v, z, kvec, causal=True, backend="triton")
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(out, sdpa, atol=1e-6, rtol=0)
    gz, gk = torch.autograd.grad(out.square().sum(), (z, kvec))
    assert torch.isfinite(gz).all() and gz.abs().sum() > 0 and gk.abs().sum() > 0


def test_a_gpu_without_the_shared_memory_gets_a_clear_error():
    from triton.runtime.errors import OutOfResources

    from ntk_attention.ops.fused.triton_ntk import _tiles_must_fit

    q = torch.zeros(1, 2, 3, 128, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"triton: the kernel's tiles do not fit this GPU .*head dim 128.*backend='auto'"):
        with _tiles_must_fit(q):
            raise OutOfResources(237568, 232448, "shared memory")


def test_triton_refusals_say_why():
    q, k = torch.randn(1, 2, 3, 4, dtype=torch.float64, device=DEVICE), torch.randn(1, 2, 3, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(BackendRefused, match="triton: torch.float64 not supported"):
        select_backend(q, k, backend="triton")
    with pytest.raises(BackendRefused, match="triton: no attention dropout"):
        select_backend(q.float(), k.float(), backend="triton", dropout_p=0.1)
    with pytest.raises(BackendRefused, match="triton: only ntk_attention"):
        select_backend(q.float(), k.float(), backend="triton", op="prefix")
    with pytest.raises(BackendRefused, match="triton: an empty batch or sequence"):
        select_backend(q.float()[:, :, :0], k.float(), backend="triton")
    half = torch.randn(1, 2, 3, 128, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(BackendRefused, match="triton: gradients in torch.bfloat16 at head dim 128"):
        select_backend(half, half, backend="triton", needs_grad=True)
    assert select_backend(half, half, backend="triton").name == "triton"  # the forward alone is exact
    # Never chosen by "auto": slower than the merged-state path in bfloat16 on an H200.
    assert select_backend(q.float(), k.float()).name != "triton"



if CUDA:  # full-size tiles: compiled on a GPU only (the interpreter is too slow for them)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("D", [64, 128])
    @pytest.mark.parametrize("L,S,causal", [(300, 300, True), (129, 515, True), (257, 200, False)])
    def test_triton_full_size_tiles(dtype, D, L, S, causal):
        """Lengths past several of the GPU's 64/128-row tiles and off their multiples, GQA 4:2."""
        fmap = get_feature_map("elu")
        q, k, v, z, kvec = make_inputs(2, 4, 2, L, S, D, D, fmap, dtype, DEVICE, z_scale=0.05)
        mask = make_mask("padding", 2, 4, L, S, DEVICE) if not causal else None
        check(q, k, v, z, kvec, fmap, causal, mask, dtype)
