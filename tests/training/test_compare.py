"""`ntk-attn compare` end to end on a tiny model: JSON shape, selection on validation, table, plots."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from pathlib import Path

import peft
import pytest
import transformers

from ntk_attention import cli
from ntk_attention.training.compare import provenance, report
from ntk_attention.training.compare.runs import check_run
from ntk_attention.training.compare.variants import check_starts, parse_grid, parse_variant


def test_compare_grid_writes_json_table_plots_and_ntk_adapter(tmp_path, tiny_bert, sst_files):
    out, work = tmp_path / "results", tmp_path / "work"
    argv = ["compare", "--name", "tiny", "--variants", "head", "ntk-m4=ntk:virtual_prefix_length=4",
            "--lr-grid", "head=1e-2", "ntk-m4=1e-3,3e-2", "--seeds", "0", "1", "--jobs", "2",
            "--model", tiny_bert, "--data", sst_files[0], "--eval-data", sst_files[1], "--train-size", "24",
            "--validation", "16", "--epochs", "1", "--batch-size", "8", "--threads", "1",
            "--out-dir", str(out), "--work-dir", str(work)]
    assert cli.main(argv) == 0
    record = json.loads((out / "tiny.json").read_text())
    assert set(record["methods"]) == {"head", "ntk-m4"} and "tiny" in record["command"]
    assert record["budget"]["train_size"] == 24 and record["machine"]["cpu_count"] >= 1
    assert record["machine"]["packages"]["transformers"] == transformers.__version__  # what a rerun must match
    assert record["machine"]["packages"]["peft"] == peft.__version__
    ntk = record["methods"]["ntk-m4"]
    assert ntk["config"] == {"virtual_prefix_length": 4}
    grid = ntk["validation_grid"]
    assert set(grid) == {"0.001", "0.03"} and grid[f"{ntk['learning_rate']:g}"] == max(grid.values())
    assert ntk["dev_accuracy"] == pytest.approx(statistics.mean(ntk["dev_accuracy_per_seed"]))
    assert ntk["dev_accuracy_std"] == pytest.approx(statistics.stdev(ntk["dev_accuracy_per_seed"]))
    for key in ("trainable_params", "train_seconds", "peak_rss_mb"):
        assert ntk[key] > 0
    assert record["methods"]["head"]["trainable_params_excl_head"] == 0
    assert "| ntk-m4 |" in (out / "tiny.md").read_text()
    for plot in ("tiny-params.png", "tiny-time.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    assert record["best_ntk_variant"] == "ntk-m4" and (out / "tiny" / "ntk" / "adapter_model.safetensors").is_file()
    # A second call finds every run done and rewrites the same numbers without training again.
    (out / "tiny.json").unlink()
    assert cli.main(argv) == 0
    def numbers(methods):  # without the call that measured them (its load average differs)
        return {label: {k: v for k, v in row.items() if k != "measured_by"} for label, row in methods.items()}
    assert numbers(json.loads((out / "tiny.json").read_text())["methods"]) == numbers(record["methods"])
    # No NTK variant within the parameter limit: the copy of the earlier call is not this call's, and
    # compare deletes nothing it did not write in the same call: refused, before anything is written.
    copied = {p.name: p.read_bytes() for p in (out / "tiny" / "ntk").iterdir()}
    (out / "tiny.json").unlink()
    with pytest.raises(ValueError, match=r"tiny/ntk holds an adapter that is not.*none qualifies"):
        cli.main(argv + ["--ntk-adapter-max-params", str(ntk["trainable_params_excl_head"] - 1)])
    assert {p.name: p.read_bytes() for p in (out / "tiny" / "ntk").iterdir()} == copied
    assert not (out / "tiny.json").exists()
    # A widened grid trains the new rate only: the old rates' validation scores come back unchanged.
    out_widened = tmp_path / "results-widened"  # the adapter copied above may no longer be the best
    widened = [{"ntk-m4=1e-3,3e-2": "ntk-m4=1e-3,3e-2,1e-1", str(out): str(out_widened)}.get(arg, arg) for arg in argv]
    assert cli.main(widened) == 0
    grid_now = json.loads((out_widened / "tiny.json").read_text())["methods"]["ntk-m4"]["validation_grid"]
    assert set(grid_now) == {"0.001", "0.03", "0.1"}
    assert {lr: grid_now[lr] for lr in grid} == pytest.approx(grid)
    assert "resume from their checkpoints" in (work / "tiny" / "ntk-m4" / "seed0" / "log.txt").read_text()


def test_compare_never_removes_an_adapter_it_did_not_write(tmp_path):
    """`compare` with its defaults once ended with shutil.rmtree of the committed shipped adapter."""
    from ntk_attention.training.compare.report import write_results

    run = tmp_path / "work" / "ntk" / "seed0" / "adapter"
    run.mkdir(parents=True)
    (run / "adapter_model.safetensors").write_bytes(b"new")
    committed = tmp_path / "results" / "sst2-minilm" / "ntk"
    committed.mkdir(parents=True)
    (committed / "adapter_model.safetensors").write_bytes(b"committed")
    summary = {"method": "ntk", "trainable_params_excl_head": 10, "learning_rate": 1e-3, "validation_grid": {"0.001": 0.5},
               "dev_accuracy": 0.5, "adapter": str(run)}
    record = {"methods": {"ntk": summary}}
    with pytest.raises(ValueError, match="does not delete what it did not write"):
        write_results(str(tmp_path / "results"), "sst2-minilm", record)
    assert (committed / "adapter_model.safetensors").read_bytes() == b"committed"
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["sst2-minilm"]  # nothing else written


def test_compare_writes_under_runs_by_default():
    from ntk_attention.cli import build_parser

    parser, rest = build_parser(["compare"])
    args = parser.parse_args(rest)
    assert args.out_dir == os.path.join("runs", "results") and args.work_dir == os.path.join("runs", "compare")


def test_ntk_variant_starts_from_each_seeds_prefix_adapter(tmp_path, tiny_bert, sst_files):
    out, work = tmp_path / "results", tmp_path / "work"
    argv = ["compare", "--name", "start", "--variants", "p3=prefix:num_virtual_tokens=3",
            "ntk-from-p3=ntk:init_from=p3:feature_map=random:num_features=16:seeds=1", "--lr-grid", "p3=1e-2", "ntk-from-p3=1e-3",
            "--seeds", "0", "1", "--jobs", "2", "--model", tiny_bert, "--data", sst_files[0], "--eval-data", sst_files[1],
            "--train-size", "24", "--validation", "16", "--epochs", "1", "--batch-size", "8", "--threads", "1",
            "--out-dir", str(out), "--work-dir", str(work)]
    assert cli.main(argv) == 0
    record = json.loads((out / "start.json").read_text())
    started = record["methods"]["ntk-from-p3"]
    assert started["init_from"] == "p3" and started["config"] == {"feature_map": "random", "num_features": 16}
    assert record["best_ntk_variant"] == "ntk-from-p3"
    assert started["seeds"] == [0] and record["methods"]["p3"]["seeds"] == [0, 1]  # seeds=1: the first seed only
    run = json.loads((work / "start" / "ntk-from-p3" / "seed0" / "adapter" / "training_run.json").read_text())
    assert run["init_from"] == str(work / "start" / "p3" / "seed0" / "adapter")
    assert "| ntk-from-p3 |" in (out / "start.md").read_text() and not (work / "start" / "ntk-from-p3" / "seed1").exists()


def test_causal_lm_comparison_scores_the_untuned_base(tmp_path, tiny_llama, math_files):
    out = tmp_path / "results"
    argv = ["compare", "--name", "math", "--variants", "base", "ntk=ntk:k_init=0", "--lr-grid", "ntk=1e-2", "--seeds", "0",
            "--model", tiny_llama, "--data", math_files[0], "--eval-data", math_files[1], "--train-size", "24",
            "--validation", "8", "--epochs", "1", "--batch-size", "8", "--threads", "1", "--max-new-tokens", "3",
            "--generate-size", "4", "--out-dir", str(out), "--work-dir", str(tmp_path / "work")]
    assert cli.main(argv) == 0
    methods = json.loads((out / "math.json").read_text())["methods"]
    base, ntk = methods["base"], methods["ntk"]
    assert base["trainable_params"] == 0 and base["generated"] == 4 and 0 <= base["dev_exact_match"] <= 1
    assert base["dev_loss"] > 0 and ntk["dev_loss"] > 0 and "dev_exact_match" in ntk
    assert ntk["dev_loss_before"] == pytest.approx(base["dev_loss"], rel=1e-5)  # k_init=0: the exact start is the base
    assert "| base | 0 (0) | - | untuned |" in (out / "math.md").read_text()
    assert "--threads 1" in (tmp_path / "work" / "math" / "base" / "log.txt").read_text()  # the base's eval too


def test_variant_and_grid_specs():
    variants = [parse_variant("lora"), parse_variant("p64=prefix:num_virtual_tokens=64")]
    assert (variants[1].label, variants[1].method, variants[1].config) == ("p64", "prefix", ["num_virtual_tokens=64"])
    assert parse_grid(["prefix=1e-2,3e-2"], variants)["p64"] == [1e-2, 3e-2]
    ranks = [parse_variant("lora"), parse_variant("lora-r4=lora:r=4")]  # "lora" names a label and a method
    assert parse_grid(["lora=1e-4,1e-3", "lora-r4=3e-3"], ranks) == {"lora": [1e-4, 1e-3], "lora-r4": [3e-3]}
    assert parse_grid(["lora-r4=3e-3", "lora=1e-4"], ranks) == {"lora": [1e-4], "lora-r4": [1e-4]}  # the later wins
    with pytest.raises(ValueError, match=r"needs a label first.*full=full:seeds=1"):
        parse_variant("full:seeds=1")
    with pytest.raises(ValueError, match="unknown method"):
        parse_variant("x=adapter")
    with pytest.raises(ValueError, match=r"--lr-grid .full.: names none of the variants"):
        parse_grid(["full=1e-5"], variants)
    with pytest.raises(ValueError, match="must be numbers"):
        parse_grid(["lora=fast"], variants)
    started = parse_variant("n=ntk:init_from=p64:feature_map=elu:seeds=1")
    assert (started.init_from, started.config, started.seeds) == ("p64", ["feature_map=elu"], 1)
    with pytest.raises(ValueError, match="seeds must be a count"):
        parse_variant("n=ntk:seeds=0")
    with pytest.raises(ValueError, match="starts an ntk variant"):
        parse_variant("l=lora:init_from=p64")
    with pytest.raises(ValueError, match="must be a prefix variant listed before it"):
        check_starts([started, variants[1]])


def test_a_cached_result_of_another_grid_config_or_seed_is_refused():
    """Rerunning compare with a changed --lr-grid or variant must not reuse the old numbers silently."""
    variant = parse_variant("ntk-m4=ntk:virtual_prefix_length=4")
    result = {"method": "ntk", "config": {"virtual_prefix_length": 4}, "seed": 0, "adapter": "run/adapter",
              "grid": [{"learning_rate": 1e-3}, {"learning_rate": 3e-3}]}
    assert check_run(result, variant, 0, [3e-3, 1e-3], "run") is result
    # a run folder moved under another label keeps a result.json naming the old adapter
    with pytest.raises(ValueError, match="adapter folder"):
        check_run(result, variant, 0, [1e-3, 3e-3], "moved")
    for variant_spec, seed, rates, named in [("ntk-m4=ntk:virtual_prefix_length=4", 0, [1e-3], "learning rates"),
                                             ("ntk-m4=ntk:virtual_prefix_length=8", 0, [1e-3, 3e-3], "config"),
                                             ("ntk-m4=ntk:virtual_prefix_length=4", 1, [1e-3, 3e-3], "seed"),
                                             ("ntk-m4=prefix:num_virtual_tokens=4", 0, [1e-3, 3e-3], "method")]:
        with pytest.raises(ValueError, match=named):
            check_run(result, parse_variant(variant_spec), seed, rates, "run")


def test_a_cached_run_of_an_older_default_is_refused(tmp_path):
    """`ntk` has no options, so a run made before a default changed once passed as today's `ntk`."""
    from ntk_attention import NTKConfig

    folder = tmp_path / "ntk" / "seed0"
    NTKConfig(task_type="SEQ_CLS").save_pretrained(str(folder / "adapter"))
    result = {"method": "ntk", "config": {}, "seed": 0, "task": "classification", "adapter": str(folder / "adapter"),
              "grid": [{"learning_rate": 1e-3}]}
    assert check_run(result, parse_variant("ntk"), 0, [1e-3], str(folder)) is result
    config_file = folder / "adapter" / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**saved, "feature_map": "taylor:degree=2", "k_init": 0.01}))
    with pytest.raises(ValueError, match=r"feature_map 'taylor:degree=2' \(asked: '.*'\), k_init 0.01 \(asked: 0.0\)"):
        check_run(result, parse_variant("ntk"), 0, [1e-3], str(folder))


def test_compare_replaces_its_own_earlier_copy_but_not_a_changed_one(tmp_path, monkeypatch):
    """A new best NTK variant replaces the adapter an earlier call copied for the same comparison; a copy
    edited since, or one of another comparison, is left alone and the call refused."""
    from ntk_attention.training.compare.report import COPY_RECORD, write_results

    monkeypatch.setattr(report, "markdown_table", lambda record: "")  # the adapter copy is under test here
    monkeypatch.setattr(report, "plot", lambda record, prefix: None)

    def run_folder(label: str, payload: bytes) -> str:
        folder = tmp_path / "work" / label / "seed0" / "adapter"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(payload)
        return str(folder)

    def record(label: str, adapter: str) -> dict:
        return {"methods": {label: {"method": "ntk", "trainable_params_excl_head": 10, "learning_rate": 1e-3,
                                    "validation_grid": {"0.001": 0.5}, "dev_accuracy": 0.5, "adapter": adapter}}}

    out = tmp_path / "results"
    target = out / "task" / "ntk"
    write_results(str(out), "task", record("ntk", run_folder("ntk", b"first")))
    assert (target / "adapter_model.safetensors").read_bytes() == b"first"
    assert json.loads((target / COPY_RECORD).read_text())["variant"] == "ntk"
    second = record("ntk-kv", run_folder("ntk-kv", b"second"))
    write_results(str(out), "task", second)
    assert (target / "adapter_model.safetensors").read_bytes() == b"second"
    assert json.loads((target / COPY_RECORD).read_text())["variant"] == "ntk-kv"
    assert sorted(p.name for p in (out / "task").iterdir()) == ["ntk"]  # nothing left beside it
    # A copy recorded for another comparison, or one changed by hand: refused, the folder untouched.
    first = record("ntk", str(tmp_path / "work" / "ntk" / "seed0" / "adapter"))
    copy = json.loads((target / COPY_RECORD).read_text())
    (target / COPY_RECORD).write_text(json.dumps({**copy, "comparison": "other"}))
    with pytest.raises(ValueError, match="compare did not copy there for 'task'"):
        write_results(str(out), "task", first)
    (target / COPY_RECORD).write_text(json.dumps(copy))
    (target / "adapter_model.safetensors").write_bytes(b"edited")
    with pytest.raises(ValueError, match="does not delete what it did not write"):
        write_results(str(out), "task", first)
    assert (target / "adapter_model.safetensors").read_bytes() == b"edited"


def test_source_commit_names_this_checkout_and_nothing_else(tmp_path):
    """One version string covers many commits: rows record the checkout's commit, and no other repository's."""
    package = Path(provenance.__file__).resolve().parents[2]
    head = subprocess.run(["git", "-C", str(package), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert provenance.source_commit().split("+")[0] == head.stdout.strip()
    assert provenance.source_commit(tmp_path) is None  # not a repository
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty",
                    "-m", "other"], check=True)
    (tmp_path / "__init__.py").write_text("")
    assert provenance.source_commit(tmp_path) is None  # a repository that does not track the package (a venv inside a project)
