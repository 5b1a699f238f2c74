"""Fast paths (fused kernel, chunked) against the plain references in ops/naive.py."""


import pytest
import torch

from ntk_attention import get_feature_map, ntk_attention, prefix_attention, prefix_to_ntk
from ntk_attention.ops import backends
from ntk_attention.ops.fused import torch_states
from ntk_attention.ops.naive import ntk_attention_naive, prefix_attention_naive, prefix_to_ntk_naive

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FAST = {"cpu": ["fused-cpu", "chunked"], "cuda": ["fused-cuda", "chunked"]}  # flash-cuda: tested below
BACKENDS = [(d, b) for d in DEVICES for b in FAST[d]]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # Tiny tiles so the chunked path really loops over several key blocks on small shapes.
    monkeypatch.setattr(torch_states.Chunked, "tile_elements", 64)


def skip_unsupported(backend, dtype):
    if backend == "fused-cuda" and dtype == torch.float64:
        pytest.skip("the CUDA kernel has no float64; the chunked path covers it")


def make_inputs(B, H, H_kv, L, S, D, Dv, fmap, dtype, device, z_scale=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = fmap.feature_dim(D)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(device)

    q, k, v = rnd(B, H, L, D).to(dtype), rnd(B, H_kv, S, D).to(dtype), rnd(B, H_kv, S, Dv).to(dtype)
    z = rnd(H, r, Dv, s=z_scale).float()
    kvec = (torch.rand(H, r, generator=gen, dtype=torch.float64) * z_scale).to(device).float()
    if dtype == torch.float64:
        z, kvec = z.double(), kvec.double()
    return [t.requires_grad_() for t in (q, k, v, z, kvec)]


def make_mask(kind, B, H, L, S, device):
    gen = torch.Generator().manual_seed(1)
    if kind == "padding":  # left padding: batch row 1 ignores its first two keys
        m = torch.ones(B, 1, 1, S, dtype=torch.bool)
        m[-1, ..., :2] = False
        return m.to(device)
    if kind == "random-bool":  # includes rows that see no key at all
        m = torch.rand(B, H, L, S, generator=gen) > 0.4
        m[0, 0, 0] = False
        return m.to(device)
    if kind == "float":
        return (torch.randn(B, 1, L, S, generator=gen)).to(device)
    return None


def assert_close(fast, ref, dtype, what):
    ref = ref.to(fast.dtype)
    err = (fast.double() - ref.double()).abs().max().item()
    scale = max(1.0, ref.double().abs().max().item())
    assert err <= TOL[dtype] * scale, f"{what}: max abs error {err:.3e} (tolerance {TOL[dtype] * scale:.1e})"


SHAPES = [  # B, H, H_kv, L, S, D, Dv
    (1, 1, 1, 1, 1, 4, 4),
    (2, 4, 2, 7, 7, 8, 8),
    (2, 4, 1, 3, 9, 8, 8),  # decode-like: fewer queries than keys, MQA
    (1, 2, 2, 9, 4, 8, 8),  # more queries than keys: top causal rows see nothing
    (2, 2, 2, 6, 6, 8, 5),  # D_v < D
    (1, 3, 3, 5, 11, 4, 12),  # D_v > D
    (1, 6, 3, 33, 33, 16, 16),
]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind,causal", [(None, False), (None, True), ("padding", True), ("padding", False),
                                              ("random-bool", False), ("float", True), ("float", False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ntk_attention_matches_reference(device, backend, shape, mask_kind, causal, dtype):
    skip_unsupported(backend, dtype)
    B, H, H_kv, L, S, D, Dv = shape
    fmap = get_feature_map("elu")
    q, k, v, z, kvec = make_inputs(B, H, H_kv, L, S, D, Dv, fmap, dtype, device)
    mask = make_mask(mask_kind, B, H, L, S, device)
    out = ntk_attention(q, k, v, z, kvec, feature_map=fmap, causal=causal, attn_mask=mask, backend=backend)
    ref = ntk_attention_naive(q, k, v, z, kvec, fmap, causal, mask)
    assert out.shape == (B, H, L, Dv) and out.dtype == dtype
    assert_close(out, ref, dtype, "output")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, z, kvec), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v, z, kvec), g)
    for name, a, b in zip("q k v z kvec".split(), grads, ref_grads):
        assert_close(a, b, dtype, f"grad {name}")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("fmap", [get_feature_map("taylor"), get_feature_map("taylor", degree=1),
                                  get_feature_map("random", num_features=32, seed=3)], ids=repr)
def test_feature_maps_match_reference(device, backend, fmap):
    dtype = torch.float32 if backend == "fused-cuda" else torch.float64
    q, k, v, z, kvec = make_inputs(2, 2, 1, 6, 8, 4, 4, fmap, dtype, device, z_scale=0.1)
    out = ntk_attention(q, k, v, z, kvec, feature_map=fmap, causal=True, backend=backend)
    ref = ntk_attention_naive(q, k, v, z, kvec, fmap, True, None)
    assert_close(out, ref, dtype, "output")
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, z, kvec), g), torch.autograd.grad(ref, (q, z, kvec), g)):
        assert_close(a, b, dtype, "grad")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_bfloat16_matches_float32_reference(device, backend):
    fmap = get_feature_map("elu")
    q, k, v, z, kvec = make_inputs(2, 4, 2, 16, 16, 16, 16, fmap, torch.bfloat16, device)
    out = ntk_attention(q, k, v, z, kvec, causal=True, backend=backend)
    ref = ntk_attention_naive(q.float(), k.float(), v.float(), z, kvec, fmap, True, None)
    assert out.dtype == torch.bfloat16
    assert_close(out, ref, torch.bfloat16, "output")
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, z), g.bfloat16())
    qf = q.detach().float().requires_grad_()
    ref_grads = torch.autograd.grad(ntk_attention_naive(qf, k.float(), v.float(), z, kvec, fmap, True, None), (qf, z), g)
    for a, b in zip(grads, ref_grads):
        assert_close(a.float(), b, torch.bfloat16, "grad")


@pytest.mark.parametrize("backend", FAST["cpu"])
def test_gradcheck_float64(backend):
    fmap = get_feature_map("taylor")
    q, k, v, z, kvec = make_inputs(1, 2, 1, 5, 6, 3, 2, fmap, torch.float64, "cpu", z_scale=0.2)
    mask = torch.tensor([True, True, False, True, True, True]).expand(1, 1, 5, 6)

    def f(q, k, v, z, kvec):
        return ntk_attention(q, k, v, z, kvec, feature_map=fmap, causal=True, attn_mask=mask, backend=backend)

    assert torch.autograd.gradcheck(f, (q, k, v, z, kvec))

    pk = torch.randn(1, 4, 3, dtype=torch.float64, requires_grad=True)
    pv = torch.randn(1, 4, 2, dtype=torch.float64, requires_grad=True)

    def g(q, k, v, pk, pv):
        return prefix_attention(q, k, v, pk, pv, causal=True, attn_mask=mask, backend=backend)

    assert torch.autograd.gradcheck(g, (q, k, v, pk, pv))


def test_dropout_gradcheck_and_expectation():
    fmap = get_feature_map("elu")
    q, k, v, z, kvec = make_inputs(1, 2, 2, 4, 6, 3, 3, fmap, torch.float64, "cpu")

    def f(q, k, v, z, kvec):
        torch.manual_seed(7)  # same dropout masks in every evaluation
        return ntk_attention(q, k, v, z, kvec, causal=True, dropout_p=0.3)

    assert torch.autograd.gradcheck(f, (q, k, v, z, kvec))
    with torch.no_grad():
        plain = ntk_attention(q, k, v, z, kvec, causal=True)
        dropped = torch.stack([ntk_attention(q, k, v, z, kvec, causal=True, dropout_p=0.3) for _ in range(2000)])
    assert not torch.allclose(dropped[0], plain)
    # Inverted dropout keeps the expectation: the mean of many draws approaches the plain output.
    assert (dropped.mean(0) - plain).abs().max() < 0.05


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_identity_start_is_plain_attention_and_still_trains(device, backend):
    fmap = get_feature_map("elu")
    q, k, v, z, kvec = make_inputs(2, 4, 2, 12, 12, 8, 8, fmap, torch.float32, device)
    with torch.no_grad():
        z.zero_()
        kvec.zero_()
    out = ntk_attention(q, k, v, z, kvec, causal=True, backend=backend)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(out, sdpa, atol=1e-6, rtol=0)
    if backend == "fused-cpu":  # SDPA runs the same kernel here: bit for bit
        assert torch.equal(out, sdpa)
    gz, gk = torch.autograd.grad(out.square().sum(), (z, kvec))
    assert torch.isfinite(gz).all() and torch.isfinite(gk).all()
    assert gz.abs().sum() > 0 and gk.abs().sum() > 0


def authors_formula(q, k, v, z, kvec, fmap, scale):
    """The released code's computation: e^{s - rowmax} with the prefix term divided by e^{rowmax}."""
    s = scale * q @ k.transpose(-1, -2)
    s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    m = s.amax(-1, keepdim=True)
    e = torch.exp(s - m)
    phi = fmap(q, scale)
    return (e @ v + (phi @ z) / torch.exp(m)) / (e.sum(-1, keepdim=True) + (phi @ kvec.unsqueeze(-1)) / torch.exp(m))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("logit", [1e3, -1e3])
def test_stable_for_logits_in_the_thousands(device, backend, logit):
    fmap = get_feature_map("elu")
    _, _, v, z, kvec = make_inputs(1, 2, 2, 8, 8, 4, 4, fmap, torch.float32, device)
    gen = torch.Generator().manual_seed(5)
    u = torch.randn(4, generator=gen)
    k = (u + 0.1 * torch.randn(1, 2, 8, 4, generator=gen)).to(device).requires_grad_()
    # Every logit is about `logit`: +1000 makes the softmax sum dwarf the NTK term, -1000 the reverse.
    q = (u * logit / (0.5 * u.dot(u))).expand(1, 2, 8, 4).to(device).clone().requires_grad_()
    out = ntk_attention(q, k, v, z, kvec, causal=True, backend=backend)
    ref = ntk_attention_naive(q.double(), k.double(), v.double(), z.double(), kvec.double(), fmap, True, None)
    assert torch.isfinite(out).all()
    assert_close(out, ref.float(), torch.float32, "output")
    grads = torch.autograd.grad(out.sum(), (q, k, v, z, kvec))
    assert all(torch.isfinite(g).all() for g in grads)
    if logit < 0:
        with torch.no_grad():
            assert torch.isnan(authors_formula(q, k, v, z, kvec, fmap, 0.5)).any()  # what the released code gives


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("H,H_kv,H_prefix", [(4, 2, 2), (4, 2, 4), (3, 3, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_prefix_attention_matches_reference(device, backend, H, H_kv, H_prefix, dtype):
    skip_unsupported(backend, dtype)
    gen = torch.Generator().manual_seed(3)
    B, L, S, m, D = 2, 6, 9, 13, 8
    q = torch.randn(B, H, L, D, generator=gen).to(device, dtype).requires_grad_()
    k = torch.randn(B, H_kv, S, D, generator=gen).to(device, dtype).requires_grad_()
    v = torch.randn(B, H_kv, S, D, generator=gen).to(device, dtype).requires_grad_()
    pk = torch.randn(H_prefix, m, D, generator=gen).to(device, dtype).requires_grad_()
    pv = torch.randn(H_prefix, m, D, generator=gen).to(device, dtype).requires_grad_()
    mask = make_mask("padding", B, H, L, S, device)
    out = prefix_attention(q, k, v, pk, pv, causal=True, attn_mask=mask, backend=backend)
    ref = prefix_attention_naive(q, k, v, pk, pv, True, mask)
    assert_close(out, ref, dtype, "output")
    g = torch.randn_like(out)
    for name, a, b in zip("q k v pk pv".split(), torch.autograd.grad(out, (q, k, v, pk, pv), g),
                          torch.autograd.grad(ref, (q, k, v, pk, pv), g)):
        assert_close(a, b, dtype, f"grad {name}")


def test_prefix_to_ntk_closed_form():
    gen = torch.Generator().manual_seed(0)
    pk, pv = torch.randn(3, 50, 8, generator=gen, dtype=torch.float64), torch.randn(3, 50, 6, generator=gen, dtype=torch.float64)
    for fm in ("elu", "taylor", get_feature_map("random", num_features=16)):
        z, kvec = prefix_to_ntk(pk, pv, feature_map=fm, chunk_size=7)  # several chunks
        z_ref, k_ref = prefix_to_ntk_naive(pk, pv, fm)
        assert torch.allclose(z, z_ref) and torch.allclose(kvec, k_ref)

    # With a degree-2 Taylor map and small logits, NTK-Attention with the closed form reproduces the
    # exact prefix attention up to the third-order Taylor remainder.
    q, k = (torch.randn(1, 3, 5, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, 3, 5, 6, generator=gen, dtype=torch.float64)
    errors = []
    for s in (0.4, 0.2, 0.1):
        z, kvec = prefix_to_ntk(pk * s, pv, feature_map="taylor")
        exact = prefix_attention(q * s, k, v, pk * s, pv, causal=True)
        approx = ntk_attention(q * s, k, v, z, kvec, feature_map="taylor", causal=True)
        errors.append((exact - approx).abs().max().item())
    assert errors[2] < 1e-4 and errors[0] > errors[1] > errors[2]


def test_memory_is_linear_in_length():
    """Forward + backward at L = 8192 stays far below one L x L float32 matrix (256 MiB)."""
    import subprocess
    import sys

    code = r"""
import resource, torch
from ntk_attention import ntk_attention
torch.set_num_threads(1)
L, D = 8192, 64
q, k, v = (torch.randn(1, 1, L, D, requires_grad=True) for _ in range(3))
z, kv = torch.zeros(1, D, D, requires_grad=True), torch.zeros(1, D, requires_grad=True)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for backend in ("fused-cpu", "chunked"):
    ntk_attention(q, k, v, z, kv, causal=True, backend=backend).sum().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""
    grew_mb = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1])
    assert grew_mb < 128, f"peak memory grew by {grew_mb} MiB; an L x L float32 matrix would be 256 MiB"


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])  # non-causal GQA takes the folded path
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_state_per_kv_head_is_the_same_state_repeated_over_its_group(device, backend, causal, dtype):
    skip_unsupported(backend, dtype)
    B, H, H_kv, L, S, D, Dv = 2, 6, 2, 5, 7, 8, 4
    fmap = get_feature_map("elu")
    q, k, v, z, kvec = make_inputs(B, H, H_kv, L, S, D, Dv, fmap, dtype, device)
    z_kv, kvec_kv = z[:H_kv].detach().requires_grad_(), kvec[:H_kv].detach().requires_grad_()
    out = ntk_attention(q, k, v, z_kv, kvec_kv, feature_map=fmap, causal=causal, backend=backend)
    repeated = ntk_attention(q, k, v, z_kv.repeat_interleave(3, 0), kvec_kv.repeat_interleave(3, 0), feature_map=fmap,
                             causal=causal, backend=backend)
    ref = ntk_attention_naive(q, k, v, z_kv, kvec_kv, fmap, causal)
    assert_close(out, repeated, dtype, "output")
    assert_close(out, ref, dtype, "output vs reference")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, z_kv, kvec_kv), g)
    for name, a, b in zip("q k v z kvec".split(), grads, torch.autograd.grad(ref, (q, k, v, z_kv, kvec_kv), g)):
        assert_close(a, b, dtype, f"grad {name}")
    assert grads[3].shape == (H_kv, fmap.feature_dim(D), Dv)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: a.update(q=a["q"][0]), "q must have shape"),
        (lambda a: a.update(k=a["k"][:1]), "batch size differs"),
        (lambda a: a.update(k=a["k"][:, :, :, :3], v=a["v"]), "k head dim"),
        (lambda a: a.update(k=torch.randn(2, 3, 5, 4), v=torch.randn(2, 3, 5, 4)), "multiple of key/value heads"),
        (lambda a: a.update(v=a["v"][:, :, :4]), "same length S"),
        (lambda a: a.update(z=a["z"][:, :3]), "z must have shape"),
        (lambda a: a.update(kvec=a["kvec"][:1]), "kvec must have shape"),
        (lambda a: a.update(z=torch.zeros(3, 4, 4), kvec=torch.zeros(3, 4)), "z must have shape"),  # neither H nor H_kv
        (lambda a: a.update(z=torch.zeros(2, 4, 4)), "kvec must have shape"),  # z per KV head, kvec per query head
        (lambda a: a.update(k=a["k"].double()), "dtype"),
        (lambda a: a.update(feature_map="cosine"), "unknown feature_map"),
        (lambda a: a.update(feature_map=get_feature_map("taylor")), "z must have shape"),
        (lambda a: a.update(attn_mask=torch.ones(2, 4, 5, 6, dtype=torch.bool)), "attn_mask of shape"),
        (lambda a: a.update(attn_mask=torch.ones(5, 5, dtype=torch.int64)), "attn_mask must be boolean"),
        (lambda a: a.update(dropout_p=1.5), "dropout_p"),
        (lambda a: a.update(scale=-1.0), "scale"),
        (lambda a: a.update(backend="cuda-magic"), "unknown backend"),
        (lambda a: a.update(backend="fused-cpu", dropout_p=0.1), "fused-cpu: no dropout"),
        (lambda a: a.update(backend="fused-cuda"), "fused-cuda: a CUDA kernel, the inputs are on cpu"),
        (lambda a: a.update(scale=float("inf")), "scale"),
        (lambda a: a.update(q=torch.randn(2, 4, 5, 0), k=torch.randn(2, 2, 5, 0)), "head dims"),
    ],
)
def test_bad_input_names_the_problem(change, message):
    args = dict(q=torch.randn(2, 4, 5, 4), k=torch.randn(2, 2, 5, 4), v=torch.randn(2, 2, 5, 4),
                z=torch.zeros(4, 4, 4), kvec=torch.zeros(4, 4))
    change(args)
    with pytest.raises((ValueError, TypeError), match=message):
        ntk_attention(**args)


def test_prefix_bad_input():
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="prefix length m must be at least 1"):
        prefix_attention(q, k, v, torch.zeros(2, 0, 4), torch.zeros(2, 0, 4))
    with pytest.raises(ValueError, match="heads"):
        prefix_attention(q, k, v, torch.zeros(3, 2, 4), torch.zeros(3, 2, 4))
    with pytest.raises(ValueError, match="prefix_k head dim"):
        prefix_attention(q, k, v, torch.zeros(2, 2, 5), torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match="at least 1"):
        prefix_to_ntk(torch.zeros(2, 0, 4), torch.zeros(2, 0, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 4, 2, 16, 16, 16, 16), (1, 2, 2, 33, 33, 64, 64), (2, 2, 1, 8, 8, 32, 16)])
def test_flash_cuda_matches_reference(dtype, shape):
    B, H, H_kv, L, S, D, Dv = shape
    fmap = get_feature_map("elu")
    q, k, v, z, kvec = make_inputs(B, H, H_kv, L, S, D, Dv, fmap, dtype, "cuda")
    out = ntk_attention(q, k, v, z, kvec, causal=True, backend="flash-cuda")
    ref = ntk_attention_naive(*(t.float() for t in (q, k, v)), z, kvec, fmap, True, None)
    assert_close(out.float(), ref, torch.bfloat16, "output")
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v, z, kvec), g.to(dtype))
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_grads = torch.autograd.grad(ntk_attention_naive(qf, kf, vf, z, kvec, fmap, True, None), (qf, kf, vf, z, kvec), g)
    for name, a, b in zip("q k v z kvec".split(), grads, ref_grads):
        assert_close(a.float(), b, torch.bfloat16, f"grad {name}")


def test_ntk_term_stays_float32_under_autocast():
    fmap = get_feature_map("taylor")
    q, k, v, z, kvec = make_inputs(1, 2, 2, 8, 8, 8, 8, fmap, torch.bfloat16, "cpu")
    ref = ntk_attention(q, k, v, z, kvec, feature_map=fmap, causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ntk_attention(q, k, v, z, kvec, feature_map=fmap, causal=True)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("shape", [(1, 9, 3, 1, 40, 8, 8), (2, 4, 4, 1, 7, 8, 5), (2, 6, 1, 1, 1, 4, 4)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", [None, "padding", "random-bool", "float"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("state_heads", ["query", "kv"])
def test_decode_step_matches_reference_and_is_chosen_without_gradient(shape, mask_kind, dtype, state_heads):
    B, H, H_kv, L, S, D, Dv = shape
    fmap = get_feature_map("elu")
    q, k, v, z, kvec = make_inputs(B, H, H_kv, L, S, D, Dv, fmap, dtype, "cpu")
    if state_heads == "kv":
        z, kvec = z[:H_kv], kvec[:H_kv]
    mask = make_mask(mask_kind, B, H, L, S, "cpu")
    with torch.no_grad():
        assert backends.select_backend(q, k, needs_grad=False).name == "decode"
        out = ntk_attention(q, k, v, z, kvec, causal=True, attn_mask=mask, backend="decode")
        ref = ntk_attention_naive(*(t.float() if dtype == torch.bfloat16 else t for t in (q, k, v, z, kvec)), fmap, True, mask)
        assert torch.equal(ntk_attention(q, k, v, z, kvec, causal=True, attn_mask=mask), out)  # auto picks it
    assert out.dtype == dtype
    assert_close(out.float() if dtype == torch.bfloat16 else out, ref, dtype, "output")
    with pytest.raises(backends.BackendRefused, match="decode: inference only"):
        ntk_attention(q, k, v, z, kvec, causal=True, backend="decode")


@pytest.mark.parametrize("mask_kind", [None, "random-bool", "all-visible", "zero-float"])
def test_decode_step_with_a_prepared_state_equals_the_operator(mask_kind):
    from ntk_attention.ops import ntk_decode_state, ntk_decode_step

    fmap = get_feature_map("elu")
    q, k, v, z, kvec = (t.detach() for t in make_inputs(2, 6, 2, 1, 11, 8, 8, fmap, torch.float32, "cpu"))
    kvec[1] = 0.0  # a head without prefix mass: where it also sees no key the output is 0
    if mask_kind in ("all-visible", "zero-float"):  # masks that hide nothing take the unmasked merge
        mask = torch.ones(2, 1, 1, 11, dtype=torch.bool) if mask_kind == "all-visible" else torch.zeros(2, 6, 1, 11)
    else:
        mask = make_mask(mask_kind, 2, 6, 1, 11, "cpu")
    with torch.no_grad():
        state = ntk_decode_state(z, kvec, heads=6, feature_map=fmap)
        out = ntk_decode_step(q, k, v, state, attn_mask=mask)
        assert torch.equal(out, ntk_attention(q, k, v, z, kvec, attn_mask=mask, backend="decode"))
        ref = ntk_attention_naive(q, k, v, z, kvec, fmap, False, mask)
    assert_close(out, ref, torch.float32, "output")
    assert ntk_decode_step(q.repeat(1, 1, 2, 1), k, v, state) is None  # L = 2: not a decode step
    with pytest.raises(ValueError, match="state is for 6 heads, r = 8 features and D_v = 8"):
        ntk_decode_step(q[:, :3], k, v, state)
    assert ntk_decode_step(q.requires_grad_(), k, v, state) is None  # a gradient is wanted


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_rows_whose_scores_are_all_far_below_zero_are_not_shrunk(device, backend):
    # Every score is -100: an absolute floor of 1e-30 on the denominator (log = -69) scaled these
    # rows' outputs by e^-31, i.e. to 0, at the identity start.
    q = torch.full((1, 2, 3, 4), 10.0, device=device)
    k = torch.full((1, 2, 5, 4), -5.0, device=device)
    v = torch.randn(1, 2, 5, 4, generator=torch.Generator().manual_seed(0)).to(device)
    out = ntk_attention(q, k, v, torch.zeros(2, 4, 4, device=device), torch.zeros(2, 4, device=device), backend=backend)
    assert torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-6)
