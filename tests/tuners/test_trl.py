"""TRL's SFTTrainer takes NTKConfig as its peft_config and trains the adapter (a tiny Llama with MiniLM's
tokenizer, for speed; SmolLM2-135M ran the same way by hand, see docs/integration.md)."""

from __future__ import annotations

import datasets
import pytest
import torch
import transformers as tf

from ntk_attention import NTKConfig, PrefixConfig

trl = pytest.importorskip("trl")


@pytest.mark.parametrize("config", [NTKConfig(), PrefixConfig(num_virtual_tokens=4)], ids=["ntk", "prefix"])
def test_sft_trainer_trains_the_adapter(config, minilm_dir, tmp_path):
    tokenizer = tf.AutoTokenizer.from_pretrained(minilm_dir)
    tokenizer.eos_token = tokenizer.sep_token
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id))
    data = datasets.Dataset.from_dict({"text": ["the cat sat on the mat .", "a dog ran in the park ."] * 8})
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                         report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = trl.SFTTrainer(model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=config)
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(".attention_adapter." in n for n in trainable)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]
    now = dict(trainer.model.named_parameters())
    assert all(not torch.equal(now[n], before) for n, before in trainable.items())
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
