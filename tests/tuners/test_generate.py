"""Generation through the hook: the KV cache changes nothing, left padding changes nothing."""

from __future__ import annotations

import pytest
import torch
from tuner_models import VOCAB, build, randomize_adapter

from ntk_attention import NTKConfig, PrefixConfig, get_ntk_model

PROMPTS = [[5, 17, 42, 8, 99, 23], [61, 7], [33, 12, 90, 4]]


def greedy(model, ids, mask=None, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, **kwargs)


def left_padded(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2", "gpt2"])
@pytest.mark.parametrize("config", [NTKConfig(), PrefixConfig(num_virtual_tokens=5, init_std=0.5)], ids=["ntk", "prefix"])
def test_greedy_generation_with_cache_equals_without(arch, config):
    model = get_ntk_model(build(arch), config)
    randomize_adapter(model)
    ids, mask = left_padded(PROMPTS)
    with_cache = greedy(model, ids, mask)
    assert torch.equal(with_cache, greedy(model, ids, mask, use_cache=False))
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():  # the adapter matters
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, base_logits, atol=1e-3)
    assert with_cache.max() < VOCAB


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2"])
@pytest.mark.parametrize("config", [NTKConfig(), PrefixConfig(num_virtual_tokens=5, init_std=0.5)], ids=["ntk", "prefix"])
def test_batched_left_padded_generation_equals_one_by_one(arch, config):
    model = get_ntk_model(build(arch), config)
    randomize_adapter(model)
    ids, mask = left_padded(PROMPTS)
    batched = greedy(model, ids, mask)
    width = ids.shape[1]
    for row, prompt in enumerate(PROMPTS):
        alone = greedy(model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long))
        assert torch.equal(batched[row, width:], alone[0, len(prompt):]), row
