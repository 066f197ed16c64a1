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

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from dpokit.attention_registry import switch_attention
from dpokit.data.segments import Segment
from dpokit.errors import UserError

log = logging.getLogger(__name__)

NAME = "dpokit_segments"


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
    return switch_attention(model, NAME, segment_attention, _mask)


def enabled(model: Any) -> bool:
    return getattr(model.config, "_attn_implementation", None) == NAME


# --- which attention kernel a run uses --------------------------------------------------------------------------

KERNELS = ("auto", "sdpa", "flex_attention", "flash_attention_2", "eager")


@dataclass(frozen=True)
class Choice:
    """The attention a run uses: what transformers loads (`load_as`), what then runs (`kernel`), and why."""

    load_as: str  # transformers' attn_implementation
    kernel: str  # load_as, NAME (segments one at a time) or flex.NAME (FlexAttention block masks)
    reason: str

    def describe(self) -> str:
        names = {NAME: "sdpa, one segment at a time", "dpokit_flex": "flex_attention block masks"}
        return f"attention: {names.get(self.kernel, self.kernel)} ({self.reason})"


def choose(
    requested: str, device: torch.device, *, packed: bool, prefix_sharing: bool, segment_attention: bool
) -> Choice:
    """The attention for `attn_implementation=requested` on `device`. `auto` takes FlexAttention for packed or
    prefix-shared rows on CUDA, and SDPA elsewhere: on CPU segment attention measures fastest, and torch's
    FlexAttention has no backward there; padded rows gain nothing from a block mask."""
    from dpokit import flex

    cuda = device.type == "cuda"
    if requested == "auto":
        if cuda and packed and flex.available():
            return Choice("sdpa", flex.NAME, "auto: packed rows on CUDA")
        reason = "auto: padded rows" if not packed else f"auto: packed rows on {device.type}"
        if packed and cuda:
            reason += f"; torch {torch.__version__} has no FlexAttention"
        return _sdpa(reason, packed, segment_attention)
    if requested == "flex_attention":
        if not flex.available():
            raise UserError(f"attn_implementation=flex_attention needs torch >= 2.5 (this is {torch.__version__})")
        if not cuda:
            raise UserError(
                f"attn_implementation=flex_attention trains on CUDA only (torch {torch.__version__} has no "
                f"FlexAttention backward on {device.type}); use attn_implementation=auto or sdpa"
            )
        return Choice("sdpa", flex.NAME, "as configured")
    if requested == "flash_attention_2":
        return _flash(device, prefix_sharing)
    if requested == "eager" and packed and segment_attention:
        raise UserError(
            "segment_attention runs only where transformers' sdpa attention does (attn_implementation is 'eager'); "
            "set segment_attention=false"
        )
    return (
        _sdpa("as configured", packed, segment_attention)
        if requested == "sdpa"
        else Choice("eager", "eager", "as configured")
    )


def for_config(cfg: Any, device: torch.device) -> Choice:
    """`choose` for a `DPOConfig`."""
    return choose(
        cfg.attn_implementation,
        device,
        packed=cfg.padding_free or cfg.prefix_sharing,
        prefix_sharing=cfg.prefix_sharing,
        segment_attention=cfg.segment_attention,
    )


def _sdpa(reason: str, packed: bool, segment_attention: bool) -> Choice:
    return Choice("sdpa", NAME if packed and segment_attention else "sdpa", reason)


def _flash(device: torch.device, prefix_sharing: bool) -> Choice:
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        raise UserError(
            "attn_implementation=flash_attention_2 needs the flash-attn package (pip install flash-attn); or use "
            "attn_implementation=auto"
        )
    if device.type != "cuda":
        raise UserError(f"attn_implementation=flash_attention_2 runs on CUDA only, not {device.type}")
    if prefix_sharing:
        raise UserError(
            "attn_implementation=flash_attention_2 cannot keep rejected tokens from seeing chosen ones in a shared "
            "row; set prefix_sharing=false (packed rows still run varlen) or use attn_implementation=flex_attention"
        )
    return Choice("flash_attention_2", "flash_attention_2", "as configured; packed rows by restarting positions")


def apply(choice: Choice, model: Any) -> None:
    """Switch a model loaded with `choice.load_as` to `choice.kernel`, and say which attention runs."""
    from dpokit import flex

    switch = {NAME: enable, flex.NAME: flex.enable}.get(choice.kernel)
    if switch is not None and not switch(model):
        fix = "set segment_attention=false" if choice.kernel == NAME else "set attn_implementation=eager"
        raise UserError(
            f"{choice.describe()} runs only where transformers' sdpa attention does, which model "
            f"{type(model).__name__} does not; {fix}"
        )
    log.info("%s", choice.describe())


def is_varlen(model: Any) -> bool:
    """Whether packed rows run flash-attn's varlen kernels, which find the segments from the position ids."""
    return getattr(model.config, "_attn_implementation", None) == "flash_attention_2"
