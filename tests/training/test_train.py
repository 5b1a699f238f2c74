"""Every method trains a tiny random-weight model for a few steps; eval reloads the result alone."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from ntk_attention import cli
from ntk_attention.training import models as M
from ntk_attention.training.methods import build_method_model
from ntk_attention.training.options import parse_options
from ntk_attention.training.fit import ends_at_last_epoch
from training_helpers import train_args

# method -> (extra arguments, parameters of the method itself (without the head) for the tiny BERT:
# 2 layers, 4 heads, head dim 8, hidden 32)
METHODS = {
    "head": ([], 0),
    "ntk": ([], 2 * 4 * (8 * 8 + 8)),  # elu features: r = d = 8, Z [r, d] and k [r] per head
    "prefix": (["--config", "num_virtual_tokens=3"], 2 * 2 * 4 * 3 * 8),  # keys and values [heads, m, d]
    "lora": ([], 2 * 2 * 8 * (32 + 32)),  # r = 8 on query and value
    "full": ([], None),
}


def run_train(tmp_path, model, data, eval_data, *extra):
    out = tmp_path / "run"
    result_file = tmp_path / "result.json"
    args = train_args("--model", model, "--data", data, "--eval-data", eval_data, "--train-size", "32",
                      "--output-dir", str(out), "--result-json", str(result_file), *extra)
    assert cli.main(args) == 0
    return json.loads(result_file.read_text())


def run_eval(capsys, *argv):
    capsys.readouterr()
    assert cli.main(["eval", *argv]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1  # one JSON object and nothing else on stdout
    return json.loads(lines[0])


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_and_eval_reloads_it(tmp_path, capsys, tiny_bert, sst_files, method):
    extra, method_params = METHODS[method]
    result = run_train(tmp_path, tiny_bert, *sst_files, "--method", method, "--lr", "1e-2", *extra)
    head = 32 * 2 + 2  # the new classifier trains in every method
    assert result["trainable_params"] - result["trainable_params_excl_head"] == head
    if method_params is not None:
        assert result["trainable_params_excl_head"] == method_params
    else:
        assert result["trainable_params"] == result["total_params"]  # everything, embeddings included
    assert result["rows"] == {"train": 32, "validation": 16, "eval": 48}
    assert 0 <= result["after"]["eval"]["accuracy"] <= 1 and result["train_seconds"] > 0 and result["peak_rss_mb"] > 0

    run = M.read_run(result["adapter"])
    assert (run["method"], run["task"], run["base_model"]) == (method, "classification", tiny_bert)
    # eval needs only the folder and the data (dev's text column is 'content', found by itself).
    evaluated = run_eval(capsys, "--adapter", result["adapter"], "--data", sst_files[1])
    assert evaluated["rows"] == 48
    assert evaluated["accuracy"] == pytest.approx(result["after"]["eval"]["accuracy"])
    assert evaluated["loss"] == pytest.approx(result["after"]["eval"]["loss"], rel=1e-4)


def test_adapter_weights_move_from_their_start(tmp_path, tiny_bert, sst_files):
    result = run_train(tmp_path, tiny_bert, *sst_files, "--method", "ntk", "--lr", "1e-1")
    tensors = load_file(f"{result['adapter']}/adapter_model.safetensors")
    state = [t for name, t in tensors.items() if "classifier" not in name]
    assert state and any(t.abs().max() > 0 for t in state)  # Z starts at 0 and must have trained
    assert result["before"]["eval"] != result["after"]["eval"]


def test_lr_grid_is_chosen_on_the_validation_slice(tmp_path, tiny_bert, sst_files):
    result = run_train(tmp_path, tiny_bert, *sst_files, "--method", "head", "--lr", "1e-4", "3e-1")
    grid = {run["learning_rate"]: run["validation"]["accuracy"] for run in result["grid"]}
    assert set(grid) == {1e-4, 3e-1}
    assert grid[result["learning_rate"]] == max(grid.values())
    assert result["after"]["validation"]["accuracy"] == max(grid.values())


def test_each_rate_records_its_validation_after_every_epoch(tmp_path, capsys, tiny_bert, sst_files):
    result = run_train(tmp_path, tiny_bert, *sst_files, "--method", "head", "--lr", "1e-4", "3e-1", "--epochs", "3")
    for run in result["grid"]:
        epochs = run["validation_per_epoch"]
        assert [scores["epoch"] for scores in epochs] == [1.0, 2.0, 3.0]
        best = next(scores for scores in epochs if scores["epoch"] == run["best_epoch"])
        assert best["accuracy"] == run["validation"]["accuracy"] == max(scores["accuracy"] for scores in epochs)
    chosen = next(run for run in result["grid"] if run["learning_rate"] == result["learning_rate"])
    printed = capsys.readouterr().out
    assert "validation accuracy after each epoch: " + ", ".join(
        f"{scores['accuracy']:.4f}" for scores in chosen["validation_per_epoch"]) in printed
    assert ("the last epoch scored best" in printed) == (chosen["best_epoch"] == 3.0)


def test_a_run_whose_last_epoch_scored_best_is_flagged():
    assert ends_at_last_epoch(2.0, 2) and ends_at_last_epoch(1.5, 1.5)
    assert not ends_at_last_epoch(1.0, 2)
    assert not ends_at_last_epoch(1.0, 1)  # one epoch is always the last: it says nothing
    assert not ends_at_last_epoch(None, 2) and not ends_at_last_epoch(2.0, None)  # no best epoch, no budget recorded


def test_causal_lm_trains_on_answers_and_reports_exact_match(tmp_path, capsys, tiny_llama, math_files):
    result = run_train(tmp_path, tiny_llama, *math_files, "--method", "ntk", "--lr", "1e-2", "--max-new-tokens", "4")
    assert result["task"] == "causal-lm" and result["trainable_params"] == result["trainable_params_excl_head"]
    after = result["after"]["eval"]
    assert set(after) >= {"loss", "exact_match"} and 0 <= after["exact_match"] <= 1
    trained = [json.loads(line) for line in open(os.path.join(os.path.dirname(result["adapter"]), "predictions.jsonl"))]
    assert len(trained) == 6 and sum(row["match"] for row in trained) / 6 == after["exact_match"]
    predictions = tmp_path / "eval-predictions.jsonl"
    evaluated = run_eval(capsys, "--adapter", result["adapter"], "--data", math_files[1], "--max-new-tokens", "4",
                         "--predictions", str(predictions))
    assert evaluated["loss"] == pytest.approx(after["loss"], rel=1e-4)
    assert evaluated["exact_match"] == after["exact_match"] and evaluated["generated"] == 6
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [row["generated"] for row in rows] == [row["generated"] for row in trained]  # greedy: the same text
    for row in rows:
        assert set(row) == {"prompt", "reference", "generated", "reference_number", "generated_number", "match"}
        assert row["match"] == (row["reference_number"] is not None and row["generated_number"] == row["reference_number"])


def test_eval_scores_an_untuned_causal_lm_and_generates_on_fewer_rows(capsys, tiny_llama, math_files):
    evaluated = run_eval(capsys, "--model", tiny_llama, "--data", math_files[1], "--max-new-tokens", "3",
                         "--generate-size", "2")
    assert evaluated["method"] == "none" and evaluated["model"] == tiny_llama
    assert evaluated["rows"] == 6 and evaluated["generated"] == 2 and evaluated["loss"] > 0


def test_eval_of_a_base_model_needs_a_causal_lm_source(tmp_path, sst_files):
    with pytest.raises(ValueError, match="training_run.json is missing"):  # --model with --adapter: the base to use
        cli.main(["eval", "--adapter", str(tmp_path), "--model", "x", "--data", sst_files[1]])
    with pytest.raises(ValueError, match="does not exist"):
        cli.main(["eval", "--model", str(tmp_path / "missing"), "--data", sst_files[1]])


def test_ntk_run_starts_from_a_prefix_adapter(tmp_path, capsys, tiny_bert, sst_files):
    for name in ("prefix", "ntk"):
        (tmp_path / name).mkdir()
    prefix = run_train(tmp_path / "prefix", tiny_bert, *sst_files, "--method", "prefix", "--config", "num_virtual_tokens=3")
    options = ["feature_map=random", "num_features=64"]
    started = run_train(tmp_path / "ntk", tiny_bert, *sst_files, "--method", "ntk", "--init-from", prefix["adapter"],
                        "--config", *options)
    assert M.read_run(started["adapter"])["init_from"] == prefix["adapter"]
    # Before training, the run's model is the closed-form conversion with the prefix run's trained head.
    converted, _ = M.ntk_from_prefix_adapter(prefix["adapter"], parse_options(options))
    M.save_trained(converted, "ntk", M.read_run(prefix["adapter"]), str(tmp_path / "converted"))
    evaluated = run_eval(capsys, "--adapter", str(tmp_path / "converted"), "--data", sst_files[1])
    assert evaluated["loss"] == pytest.approx(started["before"]["eval"]["loss"], rel=1e-5)
    assert evaluated["loss"] != pytest.approx(prefix["before"]["eval"]["loss"], rel=1e-3)  # the head did train
    with pytest.raises(ValueError, match="expected a prefix adapter"):
        cli.main(train_args("--model", tiny_bert, "--data", sst_files[0], "--method", "ntk", "--init-from", started["adapter"]))
    with pytest.raises(ValueError, match="--method is 'lora'"):
        cli.main(train_args("--model", tiny_bert, "--data", sst_files[0], "--method", "lora", "--init-from", prefix["adapter"]))


def test_eval_rejects_a_folder_without_a_run_record(tmp_path, sst_files):
    with pytest.raises(ValueError, match="training_run.json is missing"):
        cli.main(["eval", "--adapter", str(tmp_path), "--data", sst_files[1]])


def test_saved_folder_is_replaced_whole(tmp_path, tiny_bert):
    base, head = M.load_base(tiny_bert, "classification", num_labels=2)
    model = build_method_model(base, "head", None, head)
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "stale.txt").write_text("from an older run")
    M.save_trained(model, "head", {"base_model": tiny_bert, "task": "classification"}, str(folder))
    assert sorted(p.name for p in folder.iterdir()) == [M.HEAD_FILE, M.RUN_FILE]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders left
    assert torch.equal(load_file(str(folder / M.HEAD_FILE))["classifier.weight"], model.classifier.weight)
    assert parse_options([]) == {}


def test_language_modeling_run_is_evaluated_again_from_its_folder(tmp_path, capsys, tiny_llama):
    """A language-modeling run (WikiText-2's task) reloads for ``eval --adapter`` like the other tasks."""
    texts = [f"article {i}: " + " ".join(f"word{(i * j) % 11}" for j in range(40)) for i in range(24)]
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:20]))
    test.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[20:]))
    result = run_train(tmp_path, tiny_llama, str(train), str(test), "--task", "language-modeling", "--method", "ntk",
                       "--lr", "1e-2", "--max-length", "32", "--validation", "4")
    assert M.read_run(result["adapter"])["task"] == "language-modeling"
    evaluated = run_eval(capsys, "--adapter", result["adapter"], "--data", str(test))
    assert evaluated["task"] == "language-modeling"
    assert evaluated["loss"] == pytest.approx(result["after"]["eval"]["loss"], rel=1e-4)
    assert evaluated["perplexity"] == pytest.approx(result["after"]["eval"]["perplexity"], rel=1e-4)


@pytest.mark.parametrize("record, named", [
    ({"task": "classification", "method": "ntk"}, "missing ['base_model']"),
    ({"base_model": "m", "task": "classification", "method": "adapterX"}, "unknown method 'adapterX'"),
    ({"base_model": "m", "task": "translation", "method": "ntk"}, "unknown task 'translation'"),
])
def test_a_run_record_that_cannot_be_loaded_names_what_is_wrong(tmp_path, record, named):
    (tmp_path / M.RUN_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="invalid run record") as error:
        M.read_run(str(tmp_path))
    assert named in str(error.value)
