"""What a result records about how it was made: the command, the machine, the package versions and the
checkout's commit."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
from pathlib import Path

from ..options import forwarded_options


def command_line(args) -> str:
    """The command that reproduces this comparison, every option spelled out."""
    words = ["ntk-attn", "compare"]
    for name, value in vars(args).items():
        if name.startswith("_") or value is None:
            continue
        if isinstance(value, list):
            words += ["--" + name.replace("_", "-"), *[str(v) for v in value]] if value else []
        else:
            words += forwarded_options(args, [name])
    return shlex.join(words)


def package_versions() -> dict:
    """What a rerun must match to reproduce a row besides torch (pip resolves the newest on a fresh machine)."""
    import accelerate
    import datasets
    import peft
    import transformers

    from ... import __version__

    return {"ntk-attention": __version__, "ntk-attention commit": source_commit(),
            **{m.__name__: m.__version__ for m in (transformers, peft, accelerate, datasets)}}


def source_commit(package: Path | None = None) -> str | None:
    """The git commit of the checkout this library runs from (``+dirty`` with uncommitted changes to its
    code), None when it is not a git checkout: one version string covers many commits between releases."""
    package = package or Path(__file__).resolve().parents[2]
    try:
        def git(*words: str) -> subprocess.CompletedProcess:
            return subprocess.run(["git", "-C", str(package), *words], capture_output=True, text=True, timeout=10)

        commit = git("rev-parse", "--short=12", "HEAD")
        # a site-packages inside some other repository is not tracked there: no commit of ours
        if commit.returncode != 0 or git("ls-files", "--error-unmatch", "__init__.py").returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--", ".").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty else "")


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "load_average_at_start": os.getloadavg(),
            "packages": package_versions()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
