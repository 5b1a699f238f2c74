"""PrefixConfig: exact prefix tuning (P-Tuning v2) through the same attention hook."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import AdapterConfig


@dataclass
class PrefixConfig(AdapterConfig):
    """Trainable keys and values ``[kv_heads, m, d]`` per attention layer, seen by every query.

    The prefix lives in the adapter, not in the KV cache, so it works on encoders (BERT, RoBERTa,
    ViT) as well as decoders; its keys are used as given (no rotary embedding), as in P-Tuning v2.
    init_std: standard deviation of the keys and values at the start.
    """

    method = "prefix"
    # Training defaults read by ntk-attn train / compare.
    default_learning_rate = 3e-2
    learning_rate_grid = (3e-3, 1e-2, 3e-2)

    num_virtual_tokens: int = 16
    init_std: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ValueError(f"PrefixConfig.num_virtual_tokens must be a positive int, got {self.num_virtual_tokens!r}")
        if not self.init_std >= 0:
            raise ValueError(f"PrefixConfig.init_std must be >= 0, got {self.init_std!r}")
