"""Registering an attention function with transformers and switching a model to it: how segment attention
(`attention.py`) and FlexAttention (`flex.py`) take the place of SDPA."""

from __future__ import annotations

from typing import Any


def switch_attention(model: Any, name: str, forward: Any, mask: Any) -> bool:
    """Register `forward` and `mask` with transformers under `name` and switch a model that runs SDPA to them;
    whether the model now runs `name`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, mask)
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(name)
    return getattr(model.config, "_attn_implementation", None) == name
