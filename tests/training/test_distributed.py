"""Resuming and multi-process training give the same adapter as one uninterrupted process."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ntk_attention import cli
from training_helpers import train_args

ADAPTER_FILE = "adapter_model.safetensors"


def adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "adapter", ADAPTER_FILE))


def assert_same(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)


def test_resume_gives_the_same_adapter(tmp_path, tiny_bert, sst_files):
    out = tmp_path / "run"
    argv = train_args("--model", tiny_bert, "--data", sst_files[0], "--train-size", "48", "--epochs", "2",
                      "--method", "ntk", "--lr", "3e-2", "--output-dir", str(out))
    assert cli.main(argv) == 0
    uninterrupted = adapter(out)
    # Interrupt after the first epoch: drop what the second epoch wrote, then resume.
    checkpoints = out / "checkpoints" / "lr-0.03"
    steps = sorted(int(p.name.split("-")[1]) for p in checkpoints.iterdir())
    assert steps == [6, 12]
    shutil.rmtree(checkpoints / "checkpoint-12")
    shutil.rmtree(out / "adapter")
    assert cli.main(argv + ["--resume"]) == 0
    assert_same(adapter(out), uninterrupted, atol=1e-6)


def test_two_processes_match_one(tmp_path, tiny_bert, sst_files):
    # k = softplus(theta): the default "nonneg" k projects each process's own gradient before DDP
    # averages them, which is not the projection of the average (reported to the tuners' owner).
    common = ["--model", tiny_bert, "--data", sst_files[0], "--train-size", "32", "--method", "ntk", "--lr", "3e-2",
              "--config", "k_parametrization=softplus", "k_init=0.01", "--no-group-by-length", "--threads", "1"]
    one = tmp_path / "one"
    assert cli.main(train_args(*common, "--batch-size", "8", "--output-dir", str(one))) == 0
    two = tmp_path / "two"
    # `accelerate launch --cpu` starts one process unless MPI is set up; --multi_gpu runs torchrun,
    # which on a machine without (visible) GPUs gives two CPU processes on gloo.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
              "-m", "ntk_attention.cli", *train_args(*common, "--batch-size", "4", "--output-dir", str(two),
                                                     "--result-json", str(tmp_path / "two.json"))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(launch, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((tmp_path / "two.json").read_text())["processes"] == 2
    # Global batch 8 either way: 2 x 4 per process with averaged gradients equals 1 x 8.
    assert_same(adapter(two), adapter(one), atol=1e-5)


def test_fsdp2_sharded_training_matches_one_process():
    """The adapter's tensors shard and train under torch's FSDP2 (two CPU processes on gloo)."""
    script = os.path.join(os.path.dirname(__file__), "fsdp_run.py")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(launch, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = dict(re.findall(r"(max_error|moved|tensors)=(\S+)", done.stdout))
    error, moved = float(found["max_error"]), float(found["moved"])
    assert int(found["tensors"]) == 6  # Z and k of both layers, the classifier's weight and bias
    assert moved > 1e-3 and error < 1e-6


def test_fsdp_asked_on_cpu_is_refused_not_run_as_ddp(tmp_path, tiny_bert, sst_files, monkeypatch):
    # accelerate enables FSDP on accelerator devices only; on CPU it would train plain DDP without a word
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    argv = train_args("--model", tiny_bert, "--data", sst_files[0], "--train-size", "32", "--method", "ntk",
                      "--output-dir", str(tmp_path / "run"))
    with pytest.raises(ValueError, match="FSDP was asked for"):
        cli.main(argv)
