"""Bad input fails with a clear error before any model is loaded or any training starts."""

from __future__ import annotations


import pytest

from ntk_attention import cli
from ntk_attention.training import data as D
from ntk_attention.training.evaluate import final_number
from ntk_attention.training.train import parse_options

from training_helpers import train_args, write_rows


def fails(tmp_path, *argv, match):
    """Run `ntk-attn train ...` expecting ValueError; nothing may be written to the output folder."""
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        cli.main([*train_args(*argv), "--output-dir", str(out)])
    assert not out.exists()


def test_missing_label_column(tmp_path):
    data = write_rows(tmp_path / "d.tsv", ["y", "sentence"], [[0, "good"], [1, "bad"]] * 10)
    fails(tmp_path, "--data", data, "--task", "classification", match="no label column 'label'")


def test_missing_text_column(tmp_path):
    data = write_rows(tmp_path / "d.tsv", ["label", "sentence"], [[0, "good"], [1, "bad"]] * 10)
    fails(tmp_path, "--data", data, "--text-column", "review", match="no text column 'review'")


def test_ambiguous_text_column(tmp_path):
    data = write_rows(tmp_path / "d.csv", ["label", "title", "body"], [[0, "a", "b"]] * 20, delimiter=",")
    fails(tmp_path, "--data", data, match="cannot tell the text column")


def test_empty_file_and_header_only(tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    fails(tmp_path, "--data", str(empty), match="is empty")
    header = write_rows(tmp_path / "header.tsv", ["label", "sentence"], [])
    fails(tmp_path, "--data", header, match="has no rows")


@pytest.mark.parametrize("label", ["positive", "1.5", "-1"])
def test_non_integer_labels(tmp_path, label):
    data = write_rows(tmp_path / "d.tsv", ["label", "sentence"], [[0, "good"], [label, "bad"]] * 10)
    fails(tmp_path, "--data", data, match="not a non-negative integer")


def test_eval_labels_outside_training_classes(tmp_path, sst_files):
    dev = write_rows(tmp_path / "dev.tsv", ["label", "sentence"], [[0, "good"], [5, "bad"]])
    fails(tmp_path, "--data", sst_files[0], "--eval-data", dev, match="outside the model's 2 classes")


def test_missing_and_unreadable_files(tmp_path):
    fails(tmp_path, "--data", str(tmp_path / "nope.tsv"), match="does not exist")
    other = tmp_path / "d.txt"
    other.write_text("label\tsentence\n0\tx\n")
    fails(tmp_path, "--data", str(other), match="expected a .tsv, .csv, .jsonl or .json file")
    broken = tmp_path / "d.jsonl"
    broken.write_text('{"question": "a", "answer": \n')
    fails(tmp_path, "--data", str(broken), match="could not be read as .jsonl")


def test_causal_fields(tmp_path, math_files):
    fails(tmp_path, "--data", math_files[0], "--prompt-field", "problem", "--task", "causal-lm", match="no field 'problem'")
    fails(tmp_path, "--data", math_files[0], "--answer-field", "solution", match="cannot tell the task")


def test_unknown_method_config_and_task():
    with pytest.raises(SystemExit):  # argparse names the allowed methods
        cli.main(train_args("--method", "adapterfusion"))
    from ntk_attention.training.models import method_config

    with pytest.raises(ValueError, match="unknown method"):
        method_config("adapterfusion", "classification", {})
    with pytest.raises(ValueError, match="unknown task"):
        D.check_table(None, "regression", D.Columns(), "x")


@pytest.mark.parametrize("method,field", [("ntk", "rnak"), ("prefix", "num_tokens"), ("lora", "rank")])
def test_unknown_config_field(tmp_path, sst_files, method, field):
    fails(tmp_path, "--data", sst_files[0], "--method", method, "--config", f"{field}=4", match=f"unknown {method} config field")


def test_config_on_methods_without_one(tmp_path, sst_files):
    fails(tmp_path, "--data", sst_files[0], "--method", "full", "--config", "r=4", match="takes no --config")
    fails(tmp_path, "--data", sst_files[0], "--method", "ntk", "--config", "rank", match="expected KEY=VALUE")


def test_head_method_needs_classification(tmp_path, math_files):
    fails(tmp_path, "--data", math_files[0], "--method", "head", match="needs a classification task")


def test_missing_gguf_file_and_model_folder(tmp_path, sst_files):
    fails(tmp_path, "--data", sst_files[0], "--model", str(tmp_path), "--gguf-file", "SmolLM2.gguf", match="GGUF file 'SmolLM2.gguf' is not in")
    fails(tmp_path, "--data", sst_files[0], "--model", str(tmp_path / "absent"), match="does not exist")


def test_bad_learning_rate_and_validation(tmp_path, sst_files):
    fails(tmp_path, "--data", sst_files[0], "--lr", "0", match="--lr must be positive")
    fails(tmp_path, "--data", sst_files[0], "--validation", "5000", match="leaves no training")


def test_validation_slice_is_fixed_and_disjoint(sst_files):
    table = D.load_table(sst_files[0])
    train_a, val_a = D.split_validation(table, 0.25, 40, seed=0)
    train_b, val_b = D.split_validation(table, 0.25, None, seed=0)
    assert (len(train_a), len(val_a), len(train_b)) == (40, 24, 72)
    assert val_a["sentence"] == val_b["sentence"]  # the slice does not depend on --train-size
    assert not set(val_a["sentence"]) & set(train_b["sentence"])


def test_text_column_autodetect_and_quotes(tmp_path):
    path = write_rows(tmp_path / "q.tsv", ["label", "content"], [[1, 'a "quoted" word'], [0, "NA"]])
    table = D.load_table(path)
    assert D.text_column(table, D.Columns(), path) == "content"
    assert table["content"] == ['a "quoted" word', "NA"]  # no CSV quoting, no NA parsing in GLUE TSVs
    assert D.check_classification(table, D.Columns(), path) == 2


def test_causal_encoding_masks_the_prompt(tiny_llama, math_files):
    from ntk_attention.training.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_llama)
    table = D.load_table(math_files[0]).select(range(3))
    encoded = D.encode_causal(table, tokenizer, "question", "answer", 512)
    for row, source in zip(encoded, table):
        prompt = D.prompt_ids(tokenizer, source["question"])
        assert row["input_ids"][: len(prompt)] == prompt
        assert row["labels"][: len(prompt)] == [D.IGNORE_INDEX] * len(prompt)
        assert row["labels"][len(prompt):] == row["input_ids"][len(prompt):]
        assert row["input_ids"][-1] == tokenizer.eos_token_id
        assert tokenizer.decode(prompt).endswith("< assistant >")  # the chat template was used


def test_parse_options_and_final_number():
    assert parse_options(["r=16", "target_modules=query,key", "feature_map=taylor", "rank=null"]) == {
        "r": 16, "target_modules": ["query", "key"], "feature_map": "taylor", "rank": None}
    assert final_number("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert final_number("the answer is 18.0 dollars") == "18"
    assert final_number("no digits") is None
