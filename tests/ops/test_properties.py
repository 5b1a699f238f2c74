"""Hypothesis over the operator's argument space, in a child process (see operator_properties.py)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")


def test_operator_properties_hold_and_nothing_kills_the_process():
    here = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(here / "operator_properties.py"), "200"], capture_output=True, text=True,
                          env=env, timeout=600)
    if proc.returncode < 0:
        pytest.fail(f"the child died of {signal.Signals(-proc.returncode).name}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.strip().endswith("ok")
