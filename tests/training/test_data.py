"""Bad input fails with a clear error before any model is loaded or any training starts."""

from __future__ import annotations


import pytest

from ntk_attention import cli
from ntk_attention.training import data as D
from ntk_attention.training.evaluate import final_number
from ntk_attention.training.options import parse_options

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
    from ntk_attention.training.methods import method_config

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


def test_validation_slice_too_large(tmp_path, sst_files):
    fails(tmp_path, "--data", sst_files[0], "--validation", "5000", match="leaves no training")


BAD_NUMBERS = [("--epochs", "0"), ("--epochs", "-1"), ("--epochs", "nan"), ("--epochs", "inf"), ("--threads", "0"),
               ("--batch-size", "0"), ("--lr", "0"), ("--lr", "nan"), ("--head-lr", "-1e-2"), ("--train-size", "0"),
               ("--validation", "0"), ("--validation", "nan"), ("--split-seed", "-1"), ("--seed", "-3"),
               ("--max-length", "0"), ("--eval-size", "0"), ("--max-new-tokens", "0"), ("--generate-size", "-2"),
               ("--generate-batch-size", "0"), ("--num-labels", "0"), ("--epochs", "two")]


@pytest.mark.parametrize("option,value", BAD_NUMBERS)
def test_bad_numbers_are_refused_by_the_parser_naming_the_option(tmp_path, capsys, monkeypatch, option, value):
    """`--epochs 0` once saved an untrained adapter; `--epochs nan` failed only after two evaluations."""
    import ntk_attention.training.models as M

    monkeypatch.setattr(M, "load_tokenizer", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit:
        cli.main([*train_args(option, value), "--output-dir", str(tmp_path / "out")])
    assert exit.value.code == 2 and f"argument {option}: expected" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["eval", "--batch-size", "0"], ["compare", "--jobs", "0"], ["compare", "--seeds", "-1"],
                                  ["compare", "--epochs", "nan"], ["compare", "--ntk-adapter-max-params", "-5"]])
def test_bad_numbers_of_eval_and_compare(capsys, argv):
    with pytest.raises(SystemExit):
        cli.main([*argv, "--data", "x.tsv"] + (["--adapter", "a"] if argv[0] == "eval" else []))
    assert f"argument {argv[1]}: expected" in capsys.readouterr().err


def test_every_numeric_option_is_checked_by_its_type():
    """No command has a plain int/float option left: each one refuses 0, negatives or nan by itself
    (bench op / generate belong to the operator benchmarks and are checked there)."""
    from ntk_attention.cli import build_parser, COMMANDS

    plain = []
    for words in (words for words in COMMANDS if words[0] != "bench"):
        parser, _ = build_parser(list(words))
        plain += [f"{' '.join(words)} {action.option_strings[0]}" for action in parser._actions
                  if action.type in (int, float)]
    # Checked after parsing, with messages naming them (tests/experiments/test_quick_runs.py).
    allowed = {"experiment approx-error --prefix-lengths", "experiment approx-error --train-prefix-lengths",
               "experiment convergence --prefix-lengths", "experiment rank --ranks", "experiment approx-error --seed",
               "experiment convergence --seed", "experiment rank --seed"}
    assert sorted(set(plain) - allowed) == []


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


def plan_for(*argv):
    """prepare() alone: every check of `ntk-attn train` that runs before a model is loaded."""
    from ntk_attention.cli import build_parser
    from ntk_attention.training.train import prepare

    parser, rest = build_parser(["train", *argv])
    return prepare(parser.parse_args(rest))


def test_a_stray_label_is_refused_unless_num_labels_says_so(tmp_path, tiny_bert):
    """One label 7 in binary data once trained an 8-class head."""
    data = write_rows(tmp_path / "d.tsv", ["label", "sentence"], [[0, "good"], [1, "bad"]] * 10 + [[7, "odd"]])
    fails(tmp_path, "--data", data, "--model", tiny_bert, match=r"classes 2, 3, 4, 5, 6 never occur.*--num-labels K")
    fails(tmp_path, "--data", data, "--model", tiny_bert, "--num-labels", "2", match="label 7 is outside the model's 2 classes")
    assert plan_for("--data", data, "--model", tiny_bert, "--num-labels", "8")["num_labels"] == 8
    single = write_rows(tmp_path / "one.tsv", ["label", "sentence"], [[0, "good"]] * 20)
    fails(tmp_path, "--data", single, "--model", tiny_bert, match="only class 0 occurs")
    assert plan_for("--data", single, "--model", tiny_bert, "--num-labels", "2")["num_labels"] == 2
    fails(tmp_path, "--data", single, "--model", tiny_bert, "--num-labels", "1", match="at least 2 classes")


def test_a_local_looking_model_path_that_does_not_exist_fails_at_once(tmp_path, monkeypatch, sst_files):
    """`--model my_models/minilm` once spent 52 s retrying the hub and ended in an 88-line traceback."""
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_models").mkdir()
    monkeypatch.setattr(huggingface_hub, "repo_exists", lambda *a, **k: pytest.fail("the hub was asked"))
    for path in ("my_models/minilm", "models/a/b", "./minilm", "minilm/", "~/nowhere/minilm", "my models"):
        fails(tmp_path, "--data", sst_files[0], "--model", path, match=f"model folder '{path}' does not exist")
    # HF_HUB_OFFLINE: a hub name that is not in the local cache fails without any network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fails(tmp_path, "--data", sst_files[0], "--model", "some-org/some-model", match="not in the hub cache, and HF_HUB_OFFLINE")


def test_a_hub_name_is_asked_once(tmp_path, monkeypatch, sst_files):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    asked = []
    monkeypatch.setattr(huggingface_hub, "repo_exists", lambda name, **k: asked.append(name) or False)
    fails(tmp_path, "--data", sst_files[0], "--model", "some-org/some-model", match="neither a local folder nor a model on the hub")

    def unreachable(name, **k):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "repo_exists", unreachable)
    fails(tmp_path, "--data", sst_files[0], "--model", "some-org/unreachable-model", match="the hub cannot be reached")
    assert asked == ["some-org/some-model"]
