"""The Triton kernel against the reference: natively on CUDA, else under the interpreter in a child.

The cases are in triton_cases.py (see there why a child process).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'ntk-attention[triton]')")

if torch.cuda.is_available():
    from triton_cases import *  # noqa: F401,F403  the same cases, compiled, every dtype
else:

    def test_triton_kernel_under_the_interpreter():
        cases = Path(__file__).with_name("triton_cases.py")
        env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "pytest", str(cases), "-q", "-p", "no:cacheprovider", "-x"],
                              capture_output=True, text=True, env=env, cwd=cases.parent, timeout=900)
        summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]
        assert " passed" in summary and "skipped" not in summary, summary
