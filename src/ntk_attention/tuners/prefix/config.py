"""PrefixConfig: exact prefix tuning (P-Tuning v2) through the same attention hook."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import AdapterConfig, check_number


@dataclass
class PrefixConfig(AdapterConfig):
    """Trainable keys and values ``[kv_heads, m, d]`` per attention layer, seen by every query.

    The prefix lives in the adapter, not in the KV cache, so it works on encoders (BERT, RoBERTa,
    ViT) as well as decoders; its keys are used as given (no rotary embedding), as in P-Tuning v2.
    init_std: standard deviation of the keys and values at the start.
    """

    PEFT_TYPE = "PREFIX_ATTENTION"
    default_learning_rate: ClassVar[float] = 3e-2
    learning_rate_grid: ClassVar[tuple[float, ...]] = (3e-3, 1e-2, 3e-2)

    num_virtual_tokens: int = 16
    init_std: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("PrefixConfig", "num_virtual_tokens", self.num_virtual_tokens, integer=True, minimum=1)
        check_number("PrefixConfig", "init_std", self.init_std, minimum=0)
