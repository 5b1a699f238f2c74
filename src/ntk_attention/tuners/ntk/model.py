"""NTKModel: the PEFT tuner of NTK-Attention (as LoraModel is LoRA's); built by ``peft.get_peft_model``."""

from __future__ import annotations

from ..model import AttentionTuner
from .layer import NTKLayer


class NTKModel(AttentionTuner):
    prefix = "ntk_"
    tuner_layer_cls = NTKLayer
