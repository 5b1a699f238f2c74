"""The compiled CPU generation step (``cpu_decode.cpp``), built once per machine on first use.

``torch.utils.cpp_extension`` compiles it into torch's extension cache (``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``; about a minute with a C++ compiler, then a load of well under a
second). Without a compiler, or with ``NTK_ATTN_CPU_KERNEL=0``, ``compiled()`` is None and the
decode backend runs the same formula in PyTorch ops (``torch_decode.py``): slower per token, the same
result.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("cpu_decode.cpp")
ENV_SWITCH = "NTK_ATTN_CPU_KERNEL"

logger = logging.getLogger(__name__)
_loaded: dict[str, object] = {}


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


def compiled():
    """The extension module, or None (disabled, or it could not be built: warned once, with the reason)."""
    if not enabled():
        return None
    if "module" not in _loaded:
        _loaded["module"] = _build()
    return _loaded["module"]


def _build():
    try:
        from torch.utils.cpp_extension import load

        logger.info("ntk-attention: building the CPU decode kernel (once per machine, about a minute)")
        return load(name="ntk_attention_cpu_decode", sources=[str(SOURCE)], extra_cflags=["-O3"], verbose=False)
    except Exception as err:  # no compiler, no headers, a failed build: the PyTorch ops compute the same
        warnings.warn(f"ntk-attention: the CPU decode kernel could not be built ({type(err).__name__}: "
                      f"{str(err).strip().splitlines()[-1] if str(err).strip() else ''}); generation steps use "
                      f"PyTorch ops (slower, same result). Set {ENV_SWITCH}=0 to skip the attempt.", stacklevel=3)
        return None
