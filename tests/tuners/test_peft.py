"""An NTK adapter on top of a PEFT LoRA model: both train, both save and load together."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from tuner_models import build, inputs_for, train_steps

from ntk_attention import NTKConfig, NTKModel, get_ntk_model


def test_ntk_and_lora_train_save_and_load_together(tmp_path):
    batch = inputs_for("llama-gqa")
    lora = get_peft_model(build("llama-gqa"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model = get_ntk_model(lora, NTKConfig())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any(".ntk_adapter." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train_steps(model, batch, steps=5, lr=1e-2)
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable

    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = model(**inputs).logits
        with model.disable_adapter():  # turns off LoRA too: the plain base
            assert torch.equal(model(**inputs).logits, build("llama-gqa")(**inputs).logits)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "peft_adapter" / "adapter_model.safetensors").exists()
    loaded = NTKModel.from_pretrained(build("llama-gqa"), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)
