"""The compiled CPU generation step (ops/fused/cpu_decode.cpp) against the PyTorch ops it replaces
(torch_decode.py) and the reference (naive.py): values on many shapes, dtypes, feature maps and
states, and the fallback when it cannot be built."""

import shutil
import warnings

import pytest
import torch

from ntk_attention import get_feature_map
from ntk_attention.ops import ntk_decode_state
from ntk_attention.ops.fused import cpu_kernel, torch_decode
from ntk_attention.ops.naive import ntk_attention_naive

from test_attention import assert_close, make_inputs

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler: the decode step runs its PyTorch ops")

SHAPES = [  # B, H, H_kv, S, D
    (1, 9, 3, 40, 64),  # SmolLM2's heads
    (3, 4, 4, 7, 16),
    (2, 6, 1, 1, 8),  # MQA, one cached key
    (17, 2, 2, 5, 4),  # more rows than one parallel chunk
]
MAPS = ["random", "random:normalize=true", "random:num_features=24:seed=3", "elu", "taylor"]


@pytest.fixture(scope="module")
def kernel():
    module = cpu_kernel.compiled()
    assert module is not None, "a C++ compiler is here, so the kernel must build"
    return module


class CountingKernel:
    def __init__(self, module):
        self.module, self.calls = module, 0

    def decode_step(self, *args):
        self.calls += 1
        return self.module.decode_step(*args)


def ops_step(q, k, v, state, mask, scale):
    """The same step in PyTorch ops (the kernel's reference)."""
    return torch_decode.decode_ntk_attention(q, k, v, state.stacked, state.feature_map, mask, scale)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("spec", MAPS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("state_heads", ["query", "kv"])
def test_compiled_step_equals_the_pytorch_ops_and_the_reference(kernel, monkeypatch, shape, spec, dtype, state_heads):
    B, H, H_kv, S, D = shape
    fmap = get_feature_map(spec)
    q, k, v, z, kvec = (t.detach() for t in make_inputs(B, H, H_kv, 1, S, D, D, fmap, dtype, "cpu", seed=S))
    if state_heads == "kv":
        z, kvec = z[:H_kv], kvec[:H_kv]
    state = ntk_decode_state(z, kvec, H, fmap)
    counting = CountingKernel(kernel)
    monkeypatch.setattr(cpu_kernel, "compiled", lambda: counting)
    out = state(q, k, v, None, D**-0.5)
    again = state(q, k, v, None, D**-0.5)  # with the arguments kept from the first call
    assert counting.calls == 2, "the compiled kernel was not taken"
    assert torch.equal(out, again)
    ops = ops_step(q, k, v, state, None, D**-0.5)
    ref = ntk_attention_naive(*(t.double() for t in (q, k, v, z, kvec)), fmap, False, None)
    assert out.dtype == dtype and out.shape == (B, H, 1, D)
    assert_close(out.float() if dtype == torch.bfloat16 else out, ops.float() if dtype == torch.bfloat16 else ops,
                 dtype, "compiled vs ops")
    assert_close(out.double(), ref, dtype, "compiled vs reference")


@pytest.mark.parametrize("case", ["negative-c", "zero-state", "keys-far-below"])
def test_compiled_step_edge_states(kernel, monkeypatch, case):
    fmap = get_feature_map("random")
    q, k, v, z, kvec = (t.detach() for t in make_inputs(2, 4, 2, 1, 9, 8, 8, fmap, torch.float32, "cpu"))
    if case == "negative-c":  # a signed k: c < 0 is clamped at 0
        kvec = -kvec
    elif case == "zero-state":  # the identity start: exactly softmax attention
        z, kvec = torch.zeros_like(z), torch.zeros_like(kvec)
    else:  # every score about -113: e^{-lse} would overflow float32 uncapped
        k = torch.full_like(k, -40.0)
        q = torch.ones_like(q)
    state = ntk_decode_state(z, kvec, 4, fmap)
    out = state(q, k, v, None, 8**-0.5)
    ops = ops_step(q, k, v, state, None, 8**-0.5)
    assert torch.isfinite(out).all()
    assert_close(out, ops, torch.float32, case)
    if case == "zero-state":
        plain = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
        assert_close(out, plain, torch.float32, "identity start")


def test_a_mask_that_masks_something_takes_the_pytorch_ops(kernel, monkeypatch):
    fmap = get_feature_map("random")
    q, k, v, z, kvec = (t.detach() for t in make_inputs(2, 4, 2, 1, 9, 8, 8, fmap, torch.float32, "cpu"))
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., :3] = False
    counting = CountingKernel(kernel)
    monkeypatch.setattr(cpu_kernel, "compiled", lambda: counting)
    out = ntk_decode_state(z, kvec, 4, fmap)(q, k, v, mask, 8**-0.5)
    assert counting.calls == 0, "a real mask reached the kernel"
    ref = ntk_attention_naive(q, k, v, z, kvec, fmap, False, mask)
    assert_close(out, ref, torch.float32, "masked")


def test_a_state_for_another_feature_count_is_refused_not_read_out_of_bounds(kernel):
    fmap = get_feature_map("random")  # r = D = 8 for these q, but the state below has r = 16
    q, k, v, _, _ = (t.detach() for t in make_inputs(1, 4, 2, 1, 5, 8, 8, fmap, torch.float32, "cpu"))
    state = ntk_decode_state(torch.zeros(4, 16, 8), torch.zeros(4, 16), 4, fmap)
    with pytest.raises(RuntimeError, match="projection must be a contiguous \\[D, r\\].*r = 16"):
        state(q, k, v, None, 8**-0.5)


def test_a_large_batch_takes_the_pytorch_ops(kernel, monkeypatch):
    fmap = get_feature_map("random")
    rows = torch_decode.KERNEL_MAX_ROWS // 4 + 1  # batch x 4 heads just above the limit
    q, k, v, z, kvec = (t.detach() for t in make_inputs(rows, 4, 2, 1, 6, 8, 8, fmap, torch.float32, "cpu"))
    counting = CountingKernel(kernel)
    monkeypatch.setattr(cpu_kernel, "compiled", lambda: counting)
    out = ntk_decode_state(z, kvec, 4, fmap)(q, k, v, None, 8**-0.5)
    assert counting.calls == 0, "a batch of many rows reached the kernel"
    assert_close(out, ntk_attention_naive(q, k, v, z, kvec, fmap, False, None), torch.float32, "large batch")


def test_a_failed_build_warns_once_and_the_step_still_computes(monkeypatch):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("cannot find a C++ compiler")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(cpu_kernel, "_loaded", {})
    fmap = get_feature_map("random")
    q, k, v, z, kvec = (t.detach() for t in make_inputs(1, 4, 2, 1, 5, 8, 8, fmap, torch.float32, "cpu"))
    state = ntk_decode_state(z, kvec, 4, fmap)
    with pytest.warns(UserWarning, match="could not be built .*cannot find a C\\+\\+ compiler"):
        out = state(q, k, v, None, 8**-0.5)
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        state(q, k, v, None, 8**-0.5)
    assert not again, "the failed build was retried or warned again"
    assert_close(out, ntk_attention_naive(q, k, v, z, kvec, fmap, False, None), torch.float32, "fallback")


def test_the_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv(cpu_kernel.ENV_SWITCH, "0")
    assert cpu_kernel.compiled() is None
