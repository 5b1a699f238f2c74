"""--resume after a kill: from the newest complete checkpoint, to the adapter of an uninterrupted run,
or a refusal that says why (another run's settings)."""

from __future__ import annotations

import os
import shutil
import json
import signal
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file

from ntk_attention import cli
from ntk_attention.training import checkpoints as C
from training_helpers import train_args

HERE = os.path.dirname(os.path.abspath(__file__))


def adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "adapter", "adapter_model.safetensors"))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-4, msg=name)


def run_argv(tiny_bert, sst_files, out, *extra):
    """6 steps an epoch, a checkpoint at steps 6 and 12."""
    return train_args("--model", tiny_bert, "--data", sst_files[0], "--train-size", "48", "--epochs", "2",
                      "--method", "ntk", "--lr", "3e-2", "--threads", "1", "--output-dir", str(out), *extra)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_bert, sst_files):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert cli.main(run_argv(tiny_bert, sst_files, out, "--result-json", str(out / "result.json"))) == 0
    return out


def test_resume_skips_incomplete_checkpoints_and_says_which_it_used(tmp_path, capsys, tiny_bert, sst_files, uninterrupted):
    """A kill while checkpoint-N is written once made every later --resume fail."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    shutil.rmtree(out / "adapter")
    checkpoints = out / "checkpoints" / "lr-0.03"
    (checkpoints / "checkpoint-13").mkdir()  # killed right after the folder was made
    state = checkpoints / "checkpoint-12" / "trainer_state.json"
    state.write_text(state.read_text()[:100])  # killed while the state was written
    capsys.readouterr()
    assert cli.main(run_argv(tiny_bert, sst_files, out, "--resume")) == 0
    err = capsys.readouterr().err
    assert "skipping incomplete" in err and "checkpoint-13 (no trainer_state.json" in err
    assert "checkpoint-12 (trainer_state.json is not readable JSON" in err
    assert f"resuming from {checkpoints / 'checkpoint-6'}" in err
    assert_same(adapter(out), adapter(uninterrupted))


def test_checkpoint_problems_name_the_file(tmp_path, uninterrupted):
    complete = uninterrupted / "checkpoints" / "lr-0.03" / "checkpoint-12"
    assert C.checkpoint_problem(str(complete)) is None
    for name, problem in [("adapter_model.safetensors", "adapter_model.safetensors is not readable"), ("optimizer.pt", "optimizer.pt is cut short"),
                          ("scheduler.pt", "scheduler.pt is cut short"), ("rng_state.pth", "rng_state.pth is cut short")]:
        broken = tmp_path / name
        shutil.copytree(complete, broken)
        data = (broken / name).read_bytes()
        (broken / name).write_bytes(data[: len(data) // 2])
        assert problem in C.checkpoint_problem(str(broken))
        (broken / name).unlink()
        assert C.checkpoint_problem(str(broken)).startswith("no ")


def test_resume_with_other_settings_is_refused_naming_them(tmp_path, monkeypatch, tiny_bert, sst_files, uninterrupted):
    """--resume with another --config once continued the old checkpoint under the new config."""
    from ntk_attention.training import models as M

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    before = sorted(str(p) for p in out.rglob("*"))
    monkeypatch.setattr(M, "load_tokenizer", lambda *a, **k: pytest.fail("a model was loaded"))
    for extra, named in [(["--config", "virtual_prefix_length=8"], r"config \{\} \(now \{'virtual_prefix_length': 8\}\)"),
                         (["--epochs", "3"], r"epochs 2\.0 \(now 3\.0\)"),
                         (["--method", "prefix", "--lr", "3e-2"], "method 'ntk' \\(now 'prefix'\\)")]:
        with pytest.raises(ValueError, match=named):
            cli.main(run_argv(tiny_bert, sst_files, out, "--resume", *extra))
    assert sorted(str(p) for p in out.rglob("*")) == before  # nothing touched

    shutil.copytree(uninterrupted, tmp_path / "old")
    (tmp_path / "old" / C.SETTINGS_FILE).unlink()  # a run of a version that did not record them
    with pytest.raises(ValueError, match="no run_settings.json"):
        cli.main(run_argv(tiny_bert, sst_files, tmp_path / "old", "--resume"))


def test_a_rate_trains_the_same_alone_or_after_another(tmp_path, tiny_bert, sst_files, uninterrupted):
    """Scoring the untuned model before the first rate drew from the random state that orders the
    data, so a rate's result depended on its place in the grid: adding a lower rate moved the others."""
    result = tmp_path / "result.json"
    assert cli.main(run_argv(tiny_bert, sst_files, tmp_path / "run", "--lr", "1e-3", "3e-2", "--result-json", str(result))) == 0
    second = {run["learning_rate"]: run["validation"] for run in json.loads(result.read_text())["grid"]}[3e-2]
    assert second == json.loads((uninterrupted / "result.json").read_text())["grid"][0]["validation"]


def test_resume_with_a_widened_grid_trains_only_the_new_rate(tmp_path, capsys, monkeypatch, tiny_bert, sst_files, uninterrupted):
    """Widening a suite's grid once meant training every old rate again (--resume refused the new list)."""
    from ntk_attention.training import train as T

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    trained_steps = []
    original = T.make_trainer
    def counting_trainer(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.add_callback(type("Count", (transformers.TrainerCallback,), {
            "on_step_end": lambda self, a, state, c, **k: trained_steps.append(a.learning_rate)})())
        return trainer
    monkeypatch.setattr(T, "make_trainer", counting_trainer)
    capsys.readouterr()
    result = tmp_path / "result.json"
    assert cli.main(run_argv(tiny_bert, sst_files, out, "--resume", "--lr", "3e-2", "1e-3", "--result-json", str(result))) == 0
    assert "learning rates [0.03] are now [0.03, 0.001]: [0.03] resume" in capsys.readouterr().err
    assert set(trained_steps) == {1e-3} and len(trained_steps) == 12  # the complete 0.03 run took no step
    grid = {run["learning_rate"]: run["validation"] for run in json.loads(result.read_text())["grid"]}
    old = json.loads((uninterrupted / "result.json").read_text())["grid"][0]
    assert set(grid) == {3e-2, 1e-3} and grid[3e-2] == pytest.approx(old["validation"])
    # the complete rate reports the seconds it took to train, not the resume's (~0 s, as before)
    seconds = {run["learning_rate"]: run["train_seconds"] for run in json.loads(result.read_text())["grid"]}
    assert seconds[3e-2] > 0.5 * old["train_seconds"] > 0


def test_a_fresh_start_does_not_leave_an_earlier_runs_checkpoints_to_resume_from(tmp_path, tiny_bert, sst_files, uninterrupted):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    stale = out / "checkpoints" / "lr-0.03" / "checkpoint-99"
    shutil.copytree(out / "checkpoints" / "lr-0.03" / "checkpoint-12", stale)
    assert cli.main(run_argv(tiny_bert, sst_files, out, "--epochs", "1")) == 0
    assert not stale.exists()
    assert sorted(p.name for p in (out / "checkpoints" / "lr-0.03").iterdir()) == ["checkpoint-6"]


def killed(point: str, argv: list[str]) -> str:
    """Run train in a subprocess that SIGKILLs itself at ``point``; return its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, os.path.join(HERE, "crash_run.py"), point, "--", *argv],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == -signal.SIGKILL, f"{point} was not reached: {done.returncode}\n{done.stderr[-3000:]}"
    return done.stderr


def test_runs_killed_mid_epoch_mid_checkpoint_and_mid_save_resume_to_the_uninterrupted_adapter(
        tmp_path, capsys, tiny_bert, sst_files, uninterrupted):
    """One run killed three times in a row, each time resumed with the same command (a cut
    trainer_state.json, optimizer.pt ...: test_resume_skips_incomplete_checkpoints and
    test_checkpoint_problems_name_the_file)."""
    out = tmp_path / "run"
    checkpoints = out / "checkpoints" / "lr-0.03"
    argv = run_argv(tiny_bert, sst_files, out, "--resume")

    killed("step:4", argv)  # mid-epoch, before any checkpoint
    assert not checkpoints.exists() or not any(checkpoints.iterdir())

    err = killed("checkpoint:12:adapter_model.safetensors", argv)  # a cut weights file in checkpoint-12
    assert "no complete checkpoint" in err and "starts from the beginning" in err

    err = killed("save", argv)  # a half-written adapter folder
    # the cut weights come before trainer_state.json, which Trainer writes last
    assert "checkpoint-12 (no trainer_state.json" in err and f"resuming from {checkpoints / 'checkpoint-6'}" in err
    assert not (out / "adapter").exists() and any(p.name.startswith(".saving-") for p in out.iterdir())

    capsys.readouterr()
    assert cli.main(argv) == 0
    assert f"resuming from {checkpoints / 'checkpoint-12'}" in capsys.readouterr().err
    assert_same(adapter(out), adapter(uninterrupted))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the killed save's staging folder is gone


def test_resume_refuses_a_run_made_under_another_default(tmp_path, monkeypatch, tiny_bert, sst_files, uninterrupted):
    """The options ({} for the default) once were all --resume compared: a checkpoint made under an
    older default would have continued under the new one."""
    from ntk_attention.training import models as M

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    settings_file = out / C.SETTINGS_FILE
    recorded = json.loads(settings_file.read_text())
    assert recorded["method_fields"]["feature_map"] == "random:seed=0"
    settings_file.write_text(json.dumps({**recorded, "method_fields": {**recorded["method_fields"], "feature_map": "taylor:degree=2"}}))
    monkeypatch.setattr(M, "load_tokenizer", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match=r"method_fields .*'taylor:degree=2'"):
        cli.main(run_argv(tiny_bert, sst_files, out, "--resume"))
    # a file from a version that did not record the fields resumes: there is nothing to compare
    settings_file.write_text(json.dumps({k: v for k, v in recorded.items() if k != "method_fields"}))
    monkeypatch.undo()
    assert cli.main(run_argv(tiny_bert, sst_files, out, "--resume")) == 0
