"""Small random-weight models of each architecture (the same weights for the same seed) and helpers."""

from __future__ import annotations

import torch
import transformers as tf
from peft import get_peft_model_state_dict

from ntk_attention import adapter_states

VOCAB = 100
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def _decoder(config_cls, model_cls, **extra):
    return lambda: model_cls(config_cls(vocab_size=VOCAB, **SMALL, **extra))


def _gpt2():
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2))


def _vit():
    config = tf.ViTConfig(image_size=16, patch_size=4, num_labels=3, **SMALL)
    return tf.ViTForImageClassification(config)


# name -> (build the model, task_type, kind of input)
ARCHS = {
    "llama-gqa": (_decoder(tf.LlamaConfig, tf.LlamaForCausalLM, num_key_value_heads=2), "CAUSAL_LM", "text"),
    "qwen2": (_decoder(tf.Qwen2Config, tf.Qwen2ForCausalLM, num_key_value_heads=2), "CAUSAL_LM", "text"),
    "mistral": (_decoder(tf.MistralConfig, tf.MistralForCausalLM, num_key_value_heads=1), "CAUSAL_LM", "text"),
    "gpt2": (_gpt2, "CAUSAL_LM", "text"),
    "bert": (lambda: tf.BertForSequenceClassification(tf.BertConfig(vocab_size=VOCAB, num_labels=2, **SMALL)), "SEQ_CLS", "text"),
    "roberta": (
        lambda: tf.RobertaForSequenceClassification(
            tf.RobertaConfig(vocab_size=VOCAB, num_labels=2, max_position_embeddings=66, pad_token_id=1, **SMALL)
        ),
        "SEQ_CLS",
        "text",
    ),
    "vit": (_vit, "IMAGE_CLS", "image"),
}


def build(arch: str, seed: int = 0):
    """The same random weights for the same (arch, seed): a 'fresh base' is another call."""
    torch.manual_seed(seed)
    return ARCHS[arch][0]().eval()


def inputs_for(arch: str, batch: int = 2, length: int = 9, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    if ARCHS[arch][2] == "image":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=gen), "labels": torch.randint(0, 3, (batch,), generator=gen)}
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :3] = 0  # left padding in the first row
    labels = ids.masked_fill(mask == 0, -100) if ARCHS[arch][1] == "CAUSAL_LM" else torch.randint(0, 2, (batch,), generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def randomize_adapter(model, seed: int = 3, scale: float = 0.5) -> None:
    """Give every adapter a non-trivial state (the start is the identity, which tests nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for state in adapter_states(model):
            for name, p in state.named_parameters():
                values = torch.randn(p.shape, generator=gen) * scale
                p.copy_(values.abs() if name == "k" else values)


def adapter_names(model) -> set[str]:
    return set(get_peft_model_state_dict(model))


def train_steps(model, batch: dict, steps: int, lr: float) -> list[float]:
    """A few AdamW steps on the trainable parameters; the training losses, first to last."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses
