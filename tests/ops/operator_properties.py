"""Properties of the operator over its argument space, run in a child process by test_properties.py.

A crash inside a kernel (the CPU flash kernel died with SIGFPE on L = 0 or S = 0) would kill the
process that runs it, so these run in a child whose exit status the test reads. Every call must
either return what ``ops/naive.py`` returns (values and gradients) or raise ``BackendRefused`` for
an explicitly requested backend that cannot take the inputs, with the reason
``backend_refusals`` gives.

    python tests/ops/operator_properties.py [max_examples]
"""

from __future__ import annotations

import sys

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ntk_attention import get_feature_map, ntk_attention, prefix_attention
from ntk_attention.ops import BackendRefused, backend_refusals
from ntk_attention.ops.naive import ntk_attention_naive, prefix_attention_naive

CPU_BACKENDS = ["auto", "fused", "fused-cpu", "decode", "chunked"]
TOL = {torch.float64: 1e-9, torch.float32: 5e-5, torch.bfloat16: 5e-2}


def close(fast, ref, dtype, logit, what):
    """Max error relative to the reference's size; logits of size `logit` carry rounding of their own."""
    if fast.numel() == 0:
        assert ref.numel() == 0, what
        return
    # Where the formula itself overflows (c = 0 next to scores far below 0) only finiteness is asked.
    finite = torch.isfinite(ref)
    assert not (torch.isnan(fast) & finite).any(), f"{what}: NaN where the reference is finite"
    fast, ref = fast[finite], ref[finite]
    if fast.numel() == 0:
        return
    err = (fast.double() - ref.double()).abs().max().item()
    tol = TOL[dtype] * max(1.0, logit / 10) * max(1.0, ref.double().abs().max().item())
    assert err <= tol, f"{what}: max error {err:.3e} > {tol:.1e}"


def call(fn, backend, refusal_args):
    """fn(), or None where the named backend refused, checking the refusal is the one it reports."""
    try:
        return fn()
    except BackendRefused as err:
        assert backend not in ("auto", "chunked"), f"{backend} refused: {err}"
        reasons = backend_refusals(*refusal_args[:2], **refusal_args[2])
        named = [reasons[name] for name in reasons if name == backend] or [r for r in reasons.values() if r]
        assert any(r and r in str(err) for r in named), f"refusal {err} is not among {reasons}"
        return None


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
    B = draw(st.integers(0, 2))
    H_kv = draw(st.integers(1, 2))
    H = H_kv * draw(st.integers(1, 3))
    L, S = draw(st.integers(0, 5)), draw(st.integers(0, 6))
    D, Dv = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    logit = 1.0 if dtype == torch.bfloat16 else draw(st.sampled_from([1.0, 30.0, 1000.0]))
    return dict(
        dtype=dtype, B=B, H=H, H_kv=H_kv, L=L, S=S, D=D, Dv=Dv, logit=logit,
        causal=draw(st.booleans()),
        mask=draw(st.sampled_from([None, "padding", "random-bool", "none-visible", "float"])),
        fmap=draw(st.sampled_from(["elu", "taylor1"])),
        state_heads=draw(st.sampled_from(["query", "kv"])),
        identity=draw(st.booleans()),
        backend=draw(st.sampled_from(CPU_BACKENDS)),
        seed=draw(st.integers(0, 2**16)),
    )


def build(c):
    gen = torch.Generator().manual_seed(c["seed"])
    B, H, H_kv, L, S, D, Dv, dt = c["B"], c["H"], c["H_kv"], c["L"], c["S"], c["D"], c["Dv"], c["dtype"]
    fmap = get_feature_map("taylor", degree=1) if c["fmap"] == "taylor1" else get_feature_map("elu")
    r = fmap.feature_dim(D)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    # q . k ~ logit / scale, so scaled logits reach about `logit` (and +-1000 at the extreme).
    q = (rnd(B, H, L, D) * (c["logit"] ** 0.5) * D**0.25).to(dt)
    k = (rnd(B, H_kv, S, D) * (c["logit"] ** 0.5) * D**0.25).to(dt)
    v = rnd(B, H_kv, S, Dv).to(dt)
    Hs = H if c["state_heads"] == "query" else H_kv
    state_dt = torch.float64 if dt == torch.float64 else torch.float32
    z, kvec = (rnd(Hs, r, Dv) * 0.3).to(state_dt), (rnd(Hs, r).abs() * 0.3).to(state_dt)
    if c["identity"]:
        z, kvec = z * 0, kvec * 0
    mask = None
    if c["mask"] == "padding":
        mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
        mask[..., : S // 2] = False
    elif c["mask"] == "random-bool":
        mask = torch.rand(B, H, L, S, generator=gen) > 0.5
    elif c["mask"] == "none-visible":
        mask = torch.zeros(1, 1, L, S, dtype=torch.bool)
    elif c["mask"] == "float":
        mask = rnd(B, 1, L, S).float()
    return [t.requires_grad_() for t in (q, k, v, z, kvec)], mask, fmap


def check_ntk(c):
    (q, k, v, z, kvec), mask, fmap = build(c)
    dt = c["dtype"]
    has_mask = mask is not None or (c["causal"] and c["L"] != c["S"])
    inference = c["backend"] == "decode" or c["seed"] % 4 == 0  # a generation step: no gradient
    with torch.set_grad_enabled(not inference):
        out = call(lambda: ntk_attention(q, k, v, z, kvec, feature_map=fmap, causal=c["causal"], attn_mask=mask,
                                         backend=c["backend"]),
                   c["backend"], (q, k, dict(has_mask=has_mask, op="ntk", needs_grad=not inference)))
    if out is None:
        return
    assert out.shape == (c["B"], c["H"], c["L"], c["Dv"]) and out.dtype == dt
    # The reference in the inputs' own compute dtype: where beta is capped, the cap depends on it.
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v, z, kvec)]
    ref = ntk_attention_naive(*ins, fmap, c["causal"], mask)
    close(out, ref, dt, c["logit"], "output")
    if dt == torch.bfloat16 or inference:
        return
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dt)
    grads = torch.autograd.grad(out, (q, k, v, z, kvec), g, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, ins, g, allow_unused=True)
    for name, a, b in zip("q k v z kvec".split(), grads, ref_grads):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any()), f"grad {name}: one side missing"
            continue
        close(a, b, dt, c["logit"] ** 1.5, f"grad {name}")


def check_prefix(c):
    (q, k, v, _, _), mask, _ = build(c)
    gen = torch.Generator().manual_seed(c["seed"] + 1)
    m = 3
    pk = (torch.randn(c["H_kv"], m, c["D"], generator=gen) * (c["logit"] ** 0.5) * c["D"] ** 0.25).to(c["dtype"]).requires_grad_()
    pv = torch.randn(c["H_kv"], m, c["Dv"], generator=gen).to(c["dtype"]).requires_grad_()
    has_mask = mask is not None or (c["causal"] and c["L"] != c["S"])
    out = call(lambda: prefix_attention(q, k, v, pk, pv, causal=c["causal"], attn_mask=mask, backend=c["backend"]),
               c["backend"], (q, k, dict(has_mask=has_mask, op="prefix")))
    if out is None:
        return
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pv)]
    ref = prefix_attention_naive(*ins, c["causal"], mask)
    close(out, ref, c["dtype"], c["logit"], "prefix output")
    if c["dtype"] == torch.bfloat16:
        return
    grads = torch.autograd.grad(out.sum(), (q, k, v, pk, pv), allow_unused=True)
    for name, a, b in zip("q k v pk pv".split(), grads, torch.autograd.grad(ref.sum(), ins, allow_unused=True)):
        if a is not None and b is not None:
            close(a, b, c["dtype"], c["logit"] ** 1.5, f"prefix grad {name}")


def check_empty_inputs_on_every_backend():
    """L = 0, S = 0 and B = 0 on each CPU backend, forward and backward: a result or a refusal."""
    for B, L, S in [(1, 0, 3), (1, 3, 0), (0, 2, 2), (1, 0, 0)]:
        for backend in CPU_BACKENDS:
            for causal in (False, True):
                c = dict(dtype=torch.float32, B=B, H=2, H_kv=1, L=L, S=S, D=4, Dv=3, logit=1.0, causal=causal,
                         mask=None, fmap="elu", state_heads="query", identity=False, backend=backend, seed=0)
                check_ntk(c)
                check_prefix(c)


def main(max_examples: int) -> None:
    torch.set_num_threads(1)
    check_empty_inputs_on_every_backend()
    opts = settings(max_examples=max_examples, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck), database=None)
    opts(given(cases())(check_ntk))()
    opts(given(cases())(check_prefix))()
    print("ok")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 150)
