"""Attention one segment at a time, for packed and prefix-shared rows.

A packed row holds several independent segments. One masked attention pass over the whole row computes every
(query, key) block, including all the ones the mask then throws away (other segments, the future), and on CPU the
masked kernel's backward is slow. Here each segment runs on its own: the prompt and its first response through the
causal kernel (which skips the future), a prefix-shared second response against the prompt and itself with a small
explicit mask. The result equals the masked pass over the row, as `tests/test_logprobs.py` checks.

The function is registered with transformers' `AttentionInterface` under `NAME`; without `segments` it is plain
SDPA, so the same model still runs ordinary padded batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from dpokit.errors import UserError

NAME = "dpokit_segments"


@dataclass(frozen=True)
class Segment:
    """One attention island of a row: `head` tokens attending causally, then `tail` tokens that see the first
    `prefix` tokens of the segment and, causally, each other (a rejected response after prompt + chosen)."""

    row: int
    start: int  # offset of the segment's first token in its row
    head: int
    tail: int = 0
    prefix: int = 0

    @property
    def end(self) -> int:
        return self.start + self.head + self.tail


@lru_cache(maxsize=256)
def _tail_mask(prefix: int, tail: int, device: torch.device) -> torch.Tensor:
    """(tail, prefix + tail) bool: every prefix key, then causal over the tail's own keys."""
    return torch.ones(tail, prefix + tail, dtype=torch.bool, device=device).tril(prefix)


def _check(kwargs: dict[str, Any], segments: tuple[Segment, ...]) -> None:
    window = kwargs.get("sliding_window")
    if kwargs.get("softcap") is not None or (window and max(s.head + s.tail for s in segments) > window):
        raise UserError(
            "this model's attention (logit soft-capping or a sliding window) is not supported by "
            "segment_attention; set segment_attention=false"
        )


def _segment(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, seg: Segment, **sdpa: Any) -> torch.Tensor:
    """(H, n, D) attention output of one segment; inputs are (heads, row length, D) of its row."""
    head, end = seg.start + seg.head, seg.end
    out = F.scaled_dot_product_attention(
        query[None, :, seg.start : head], key[None, :, seg.start : head], value[None, :, seg.start : head],
        is_causal=True, **sdpa,
    )  # fmt: skip
    if not seg.tail:
        return out[0]
    prefix = slice(seg.start, seg.start + seg.prefix)
    tail_out = F.scaled_dot_product_attention(
        query[None, :, head:end],
        torch.cat([key[:, prefix], key[:, head:end]], dim=1)[None],
        torch.cat([value[:, prefix], value[:, head:end]], dim=1)[None],
        attn_mask=_tail_mask(seg.prefix, seg.tail, query.device),
        **sdpa,
    )
    return torch.cat([out[0], tail_out[0]], dim=1)


@torch.compiler.disable  # a Python loop over this batch's segments: compiled, it would recompile for every batch
def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (R, H, T, D)
    key: torch.Tensor,  # (R, KV, T, D)
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    segments: tuple[Segment, ...] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; returns (R, T, H, D) like its SDPA function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    _check(kwargs, segments)
    rows, heads, width, dim = query.shape
    # On CPU the fp32 kernels beat the bf16 ones at these sizes (bench/README.md); elsewhere keep the input dtype.
    dtype = torch.float32 if query.device.type == "cpu" else query.dtype
    sdpa = {"dropout_p": dropout, "scale": scaling, "enable_gqa": key.shape[1] != heads}
    pieces: list[list[torch.Tensor]] = [[] for _ in range(rows)]
    filled = [0] * rows
    with torch.autocast(query.device.type, enabled=False):
        q, k, v = (t.to(dtype) for t in (query, key, value))
        for seg in segments:
            r = seg.row
            if seg.start > filled[r]:
                pieces[r].append(query.new_zeros(seg.start - filled[r], heads, dim, dtype=dtype))
            out = _segment(q[r], k[r], v[r], seg, **sdpa)
            pieces[r].append(out.transpose(0, 1))  # (n, H, D)
            filled[r] = seg.end
        for r in range(rows):
            if filled[r] < width:
                pieces[r].append(query.new_zeros(width - filled[r], heads, dim, dtype=dtype))
    return torch.stack([torch.cat(p) for p in pieces]).to(query.dtype), None


def _mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """No mask for segment batches (the segments say it all); SDPA's mask for padded ones."""
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def enable(model: Any) -> bool:
    """Switch a model that runs transformers' SDPA to segment attention; False if it cannot switch."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, segment_attention)
    AttentionMaskInterface.register(NAME, _mask)
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(NAME)
    return enabled(model)


def enabled(model: Any) -> bool:
    return getattr(model.config, "_attn_implementation", None) == NAME
