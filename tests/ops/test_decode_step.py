"""A generation step on the decode backend equals the full forward, and sees parameter updates.

The decode path and NTKLayer's reuse of (Z, k) between calls without gradient are both taken only
by cached greedy decoding; each token's logits must equal those of a full forward over the whole
sequence (the merged-state path), also after the adapter's parameters change in place.
"""

import torch
import transformers as tf

from ntk_attention.tuners import NTKConfig, get_ntk_model


def greedy_logits_with_cache(model, prompt, steps):
    out = model(input_ids=prompt, use_cache=True)
    cache, ids, logits = out.cache, prompt, []
    for _ in range(steps):
        token = out.logits[:, -1:].argmax(-1)
        ids = torch.cat([ids, token], dim=1)
        out = model(input_ids=token, cache=cache, use_cache=True)
        cache = out.cache
        logits.append(out.logits[:, -1])
    return ids, torch.stack(logits, 1)


def test_cached_decoding_matches_full_forward_before_and_after_an_update(monkeypatch):
    from ntk_attention.ops.fused.torch_decode import DecodeState

    decode_calls = []
    real_step = DecodeState.__call__
    monkeypatch.setattr(DecodeState, "__call__", lambda *a: decode_calls.append(1) or real_step(*a))
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=64)
    base = tf.LlamaForCausalLM(config).eval()
    model = get_ntk_model(base, NTKConfig(virtual_prefix_length=8.0, z_parametrization="free")).eval()
    prompt = torch.randint(0, 50, (2, 5))
    for update in range(2):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:  # a non-trivial state, changed in place the second time round
                    p.add_(torch.rand_like(p) * 0.5)
            ids, step_logits = greedy_logits_with_cache(model, prompt, 4)
        full = model(input_ids=ids).logits[:, prompt.shape[1]:]  # with gradient: (Z, k) computed afresh
        assert decode_calls and full.requires_grad
        assert torch.allclose(step_logits, full[:, : step_logits.shape[1]], atol=1e-5, rtol=1e-4), update
