"""The README's python blocks run as written, in order, offline, and print what the README says."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_python_blocks_run_in_order_offline(tmp_path):
    text = README.read_text()
    blocks = python_blocks(text)
    assert len(blocks) >= 4, "the README's python blocks were not found"
    script = tmp_path / "readme_blocks.py"
    script.write_text("\n".join(f"# README block {i}\n{block}" for i, block in enumerate(blocks)))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(script)], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    # the README quotes the line print_trainable_parameters() gives; it must be the one printed
    quoted = re.search(r"The printed line is `(trainable params: [^`]+)`", text)
    assert quoted is not None
    assert quoted.group(1) in done.stdout
    assert "train_loss" in done.stdout + done.stderr  # the TRL block trained
    assert list(workdir.iterdir()) == []  # the blocks write only to the temporary folders they make


def test_readme_tables_are_the_committed_suite_summary():
    """The README's cross-task table and its table of every curve point are what `lead_table` and
    `variant_table` render from the committed suite.json, cell by cell."""
    import json

    from ntk_attention.training.suite import lead_table, variant_table

    summary = json.loads((README.parent / "benchmarks" / "results" / "suite" / "suite.json").read_text())
    labels = {label for task in summary["tasks"].values() for label in task["methods"]}
    for table, rows in ((lead_table(summary), len(summary["tasks"])), (variant_table(summary), len(labels))):
        assert table.count("\n") == rows + 2
        assert table in README.read_text(), "python benchmarks/readme_tables.py puts suite.json's tables in the README"
        assert table in (README.parent / "benchmarks" / "results" / "suite" / "suite.md").read_text()


def test_readme_tables_script_replaces_each_table_by_its_header(tmp_path):
    """`benchmarks/readme_tables.py` turns a README with stale tables into the committed one, and refuses a
    README where a table's header row is missing, naming it."""
    script, text = README.parent / "benchmarks" / "readme_tables.py", README.read_text()
    base_row = next(line for line in text.splitlines() if line.startswith("| base |"))
    stale = tmp_path / "README.md"
    stale.write_text(text.replace(base_row, "| base | 0.1 |"))
    done = subprocess.run([sys.executable, str(script), "--readme", str(stale)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert stale.read_text() == text
    header = next(line for line in text.splitlines() if line.startswith("| variant |"))
    stale.write_text(text.replace(header, "| variant | renamed |"))
    done = subprocess.run([sys.executable, str(script), "--readme", str(stale)], capture_output=True, text=True)
    assert done.returncode != 0 and "0 tables headed '| variant |" in done.stderr
    assert stale.read_text() == text.replace(header, "| variant | renamed |")  # left as it was
