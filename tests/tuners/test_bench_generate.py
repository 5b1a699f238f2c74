"""``ntk-attn bench generate`` end to end on a small saved model."""

from __future__ import annotations

import json

from tuner_models import build

from ntk_attention.cli import main
from ntk_attention.ops.fused import cpu_kernel


def test_bench_generate_writes_results_and_ntk_state_does_not_grow(tmp_path, capsys):
    build("llama-gqa").save_pretrained(tmp_path / "model")
    out = tmp_path / "results"
    argv = ["bench", "generate", "--model", str(tmp_path / "model"), "--prefix-lengths", "4", "64",
            "--prompt-length", "6", "--new-tokens", "3", "--batch-size", "2", "--out-dir", str(out), "--device", "cpu"]
    assert main(argv) == 0
    assert "| ntk | 64 |" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"bench_generate.json", "bench_generate.md", "bench_generate.png"}
    written = json.loads((out / "bench_generate.json").read_text())
    assert written["setup"]["cpu_decode_kernel"] == (cpu_kernel.compiled() is not None)  # which decode path ran
    rows = {(r["method"], r["m"]): r for r in written["results"]}
    assert set(rows) == {("base", None), ("ntk", 4), ("ntk", 64), ("prefix", 4), ("prefix", 64)}
    assert rows[("ntk", 4)]["adapter_mib"] == rows[("ntk", 64)]["adapter_mib"] > 0
    assert rows[("prefix", 64)]["adapter_mib"] == 16 * rows[("prefix", 4)]["adapter_mib"]
    assert all(r["kv_cache_mib"] == rows[("base", None)]["kv_cache_mib"] for r in rows.values())
    assert all(r["decode_tokens_per_s"] > 0 for r in rows.values())
