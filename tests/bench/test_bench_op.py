"""``ntk-attn bench op`` / ``bench generate``: where results go, and what the op table holds."""

from __future__ import annotations

import argparse
import json

from ntk_attention.bench import generate
from ntk_attention.cli import main

TINY = ["bench", "op", "--lengths", "16", "32", "--heads", "2", "--head-dim", "8", "--repeats", "1",
        "--no-memory", "--prefix-ratios", "1", "--device", "cpu", "--threads", "1"]


def test_bench_op_writes_under_runs_by_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(TINY) == 0
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["runs/bench-op/bench-op-cpu.json", "runs/bench-op/bench-op-cpu.md", "runs/bench-op/bench-op-cpu.png"]
    result = json.loads((tmp_path / "runs/bench-op/bench-op-cpu.json").read_text())
    assert {r["label"] for r in result["rows"]} == {"sdpa", "ntk", "naive", "prefix m=1L"}
    assert all(r["ms"] > 0 for r in result["rows"])
    assert result["setup"]["ntk_backend"] == "fused-cpu"
    assert set(result["ratios"]) == {"16", "32"}
    assert "| ntk |" in capsys.readouterr().out


def test_bench_op_out_dir_is_the_named_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*TINY, "--out-dir", "elsewhere", "--name", "mine"]) == 0
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["mine.json", "mine.md", "mine.png"]
    assert not (tmp_path / "runs").exists()


def test_bench_generate_default_is_under_runs():
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    assert parser.parse_args([]).out_dir.startswith("runs/")
