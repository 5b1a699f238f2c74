"""PrefixState: one adapter's trainable prefix keys and values for one attention module; PrefixLayer: the
PEFT tuner layer that holds them by adapter name."""

from __future__ import annotations

import torch
from torch import nn

from ...ops import prefix_attention
from ..attention_hook import HeadGeometry
from ..layer import AdapterState, AttentionAdapterLayer
from .config import PrefixConfig


class PrefixState(AdapterState):
    def __init__(self, config: PrefixConfig, geometry: HeadGeometry):
        super().__init__(geometry)
        m = config.num_virtual_tokens
        self.prefix_k = nn.Parameter(torch.randn(geometry.kv_heads, m, geometry.head_dim) * config.init_std)
        self.prefix_v = nn.Parameter(torch.randn(geometry.kv_heads, m, geometry.v_head_dim) * config.init_std)

    def forward(self, query, key, value, attention_mask, causal, dropout, scale):
        # Attention dropout is not applied to prefix attention (the operator has none).
        return prefix_attention(
            query, key, value, self.prefix_k.to(query.dtype), self.prefix_v.to(query.dtype),
            causal=causal, attn_mask=attention_mask, scale=scale,
        )


class PrefixLayer(AttentionAdapterLayer):
    adapter_layer_names = ("prefix_attention_state",)
    state_class = PrefixState
