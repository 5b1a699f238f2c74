"""PrefixModel: the PEFT tuner of exact prefix attention through the hook (encoders too)."""

from __future__ import annotations

from ..model import AttentionTuner
from .layer import PrefixLayer


class PrefixModel(AttentionTuner):
    prefix = "prefix_attention_"
    tuner_layer_cls = PrefixLayer
