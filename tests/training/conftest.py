"""Fixtures: tiny random-weight models saved as local folders (with MiniLM's tokenizer) and small data files."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch
import transformers as tf

from ntk_attention.training.data import embedded_sst2
from ntk_attention.training.train import default_model
from training_helpers import write_rows

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"


def _tokenizer():
    return tf.AutoTokenizer.from_pretrained(default_model())


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer BERT encoder without a classification head, so the head is new as with MiniLM."""
    folder = str(tmp_path_factory.mktemp("tiny-bert"))
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=30522, max_position_embeddings=128, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, **SMALL)
    tf.BertModel(config).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A 2-layer Llama (GQA) with a chat template; [SEP] serves as end of answer."""
    folder = str(tmp_path_factory.mktemp("tiny-llama"))
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=30522, num_key_value_heads=2, max_position_embeddings=256, **SMALL)
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer = _tokenizer()
    tokenizer.eos_token = "[SEP]"
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sst_files(tmp_path_factory):
    """(train, dev) TSVs: the first 96 / 48 rows of the embedded sample; dev uses GLUE's 'content' header."""
    folder = tmp_path_factory.mktemp("sst")
    def head(split, n):
        with open(embedded_sst2(split), newline="") as handle:
            return list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[1 : n + 1]
    return (write_rows(folder / "train.tsv", ["label", "sentence"], head("train", 96)),
            write_rows(folder / "dev.tsv", ["label", "content"], head("dev", 48)))


@pytest.fixture(scope="session")
def math_files(tmp_path_factory):
    """(train, test) JSON lines in GSM8K's shape: question, answer ending in '#### n'."""
    folder = tmp_path_factory.mktemp("math")
    paths = []
    for name, count in (("train", 40), ("test", 6)):
        path = os.path.join(folder, f"{name}.jsonl")
        with open(path, "w") as handle:
            for i in range(count):
                a, b = i % 7, i % 5
                handle.write(json.dumps({"question": f"what is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}) + "\n")
        paths.append(path)
    return tuple(paths)
