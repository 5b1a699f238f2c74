"""The PEFT tuner layer every method hangs on an attention module (``module.attention_adapter``).

It holds one state module per named adapter in a ``ModuleDict`` (the attribute named by
``adapter_layer_names``, as PEFT's layers do), so PEFT's ``set_adapter`` / ``disable_adapter`` /
``delete_adapter`` and state-dict code work on it unchanged. The attention hook asks it for the
active adapter's state and calls that with the head tensors.
"""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .attention_hook import HeadGeometry

CANNOT_MERGE = ("NTK-Attention and prefix adapters add attention terms, not weight deltas: they cannot be merged "
                "into the base weights; keep the PeftModel, or unload() to drop the adapter")


class AdapterState(nn.Module):
    """One adapter's trainable state for one attention module.

    Subclasses take ``(config, geometry)`` and implement ``forward(query [B,H,L,D], key, value,
    attention_mask, causal, dropout, scale) -> [B,H,L,D_v]``.
    """

    def __init__(self, geometry: HeadGeometry):
        super().__init__()
        self.geometry = geometry

    def extra_repr(self) -> str:
        g = self.geometry
        return f"heads={g.heads}, kv_heads={g.kv_heads}, head_dim={g.head_dim}"


class AttentionAdapterLayer(nn.Module, BaseTunerLayer):
    """Subclasses set ``adapter_layer_names = ("<prefix>state",)`` and ``state_class``."""

    state_class: type[AdapterState]

    def __init__(self, geometry: HeadGeometry):
        nn.Module.__init__(self)
        self.geometry = geometry
        setattr(self, self.adapter_layer_names[0], nn.ModuleDict())
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = []

    @property
    def states(self) -> nn.ModuleDict:
        return getattr(self, self.adapter_layer_names[0])

    def update_layer(self, adapter_name: str, config, device) -> None:
        self.states[adapter_name] = self.state_class(config, self.geometry).to(device).train(self.training)
        self.set_adapter(self.active_adapters)

    def active_state(self) -> AdapterState | None:
        """The state the hook runs, or None (disabled, or the active adapter does not adapt this module)."""
        # The hook asks at every layer and token: PEFT's properties and ModuleDict lookups read the same
        # attributes in several calls each, which costs a point of decode speed on SmolLM2.
        if self._disable_adapters:
            return None
        names = self._active_adapter
        states = self._modules[self.adapter_layer_names[0]]._modules
        active = [name for name in ((names,) if isinstance(names, str) else names) if name in states]
        if len(active) > 1:
            raise ValueError(f"adapters {active} are active at once; NTK/prefix adapters run one at a time: set_adapter(name)")
        return states[active[0]] if active else None

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise ValueError(CANNOT_MERGE)

    def unmerge(self) -> None:
        return None
