"""FlexAttention block masks for packed and prefix-shared rows: the GPU path.

A packed row holds several segments (`data.segments.Segment`). On a GPU, one kernel per segment per layer wastes the
device on launches; FlexAttention runs the whole row in one kernel and skips every 128 x 128 block the mask leaves
empty. The mask is the one `Batch.dense_mask` spells out, as a `mask_mod` over per-position tables:

- a query sees keys of its own segment only (the document mask), and none after itself (causal);
- a query in a segment's tail (a rejected response after prompt + chosen) sees the segment's first `prefix` keys
  and the tail itself, never the head's response (the chosen tokens);
- a padding position sees itself, so no softmax row is empty.

FlexAttention is compiled per input shape, so rows are padded to a few bucketed widths (`bucket_width`) and the
compiles stay bounded; each new shape is logged with the running count. torch 2.13 runs FlexAttention on CPU
forward only (its backward raises NotImplementedError there), so on CPU it serves tests and no-grad passes.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import cache
from typing import Any

import torch

from dpokit.attention_registry import switch_attention
from dpokit.data.segments import Segment
from dpokit.errors import UserError

log = logging.getLogger(__name__)

NAME = "dpokit_flex"
BLOCK = 128  # FlexAttention's block size: the unit of skipped work and of row padding
RECOMPILE_LIMIT = 64  # dynamo's default of 8 compiled shapes per function is below the number of width buckets

_compiled_shapes: set[tuple[Any, ...]] = set()


def available() -> bool:
    """Whether this torch has FlexAttention (2.5 and later)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def bucket_width(tokens: int) -> int:
    """The padded row width for `tokens` tokens: whole blocks, rounded up on a ladder of four widths per doubling
    (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, ... blocks), so padding stays under a quarter of the row and a
    run meets only a few shapes."""
    blocks = max(1, -(-tokens // BLOCK))
    step = max(1, 2 ** (blocks.bit_length() - 3))
    return -(-blocks // step) * step * BLOCK


def row_segments(batch: Any) -> tuple[Segment, ...]:
    """The batch's segments; a padded batch (no segments) has one causal segment per row."""
    if batch.segments is not None:
        return batch.segments
    lengths = batch.attention_mask.sum(dim=1).tolist()
    return tuple(Segment(r, 0, int(n)) for r, n in enumerate(lengths))


def widen(batch: Any, width: int) -> Any:
    """`batch` with its rows right-padded to `width` tokens (padding attends only to itself)."""
    rows, old = batch.input_ids.shape
    if width == old:
        return batch
    if width < old:
        raise ValueError(f"cannot narrow rows of {old} tokens to {width}")

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - old), value=value)

    row, col = batch.target_index // old, batch.target_index % old
    return replace(
        batch,
        input_ids=pad(batch.input_ids, 0),  # any valid id: padding outputs are never read
        position_ids=pad(batch.position_ids, 0),
        attention_mask=pad(batch.attention_mask, 0),
        target_index=row * width + col,
        segments=row_segments(batch),
    )


def bucketed(batch: Any) -> Any:
    """`batch` padded to its bucket width, with explicit segments."""
    return widen(batch, bucket_width(batch.input_ids.shape[1]))


def mask_tables(segments: tuple[Segment, ...], rows: int, width: int, device: torch.device) -> dict[str, torch.Tensor]:
    """(R, T) long tables the mask reads at each query and key: segment id (-1 on padding), the column where the
    segment's head ends, and the column where its shared prefix ends."""
    seg = torch.full((rows, width), -1, dtype=torch.long)
    head_end = torch.zeros((rows, width), dtype=torch.long)
    prefix_end = torch.zeros((rows, width), dtype=torch.long)
    for i, s in enumerate(segments):
        seg[s.row, s.start : s.end] = i
        head_end[s.row, s.start : s.end] = s.start + s.head
        prefix_end[s.row, s.start : s.end] = s.start + s.prefix
    return {"seg": seg.to(device), "head_end": head_end.to(device), "prefix_end": prefix_end.to(device)}


def make_mask_mod(tables: dict[str, torch.Tensor]) -> Any:
    """FlexAttention's `mask_mod(b, h, q, kv) -> bool` for the tables of `mask_tables`."""
    seg, head_end, prefix_end = tables["seg"], tables["head_end"], tables["prefix_end"]

    def mask_mod(b: Any, h: Any, q: Any, kv: Any) -> Any:
        same = (seg[b, q] == seg[b, kv]) & (seg[b, q] >= 0) & (kv <= q)
        # a tail query skips the head's own response: keys in [prefix_end, head_end) of its segment
        visible = (q < head_end[b, q]) | (kv < prefix_end[b, q]) | (kv >= head_end[b, q])
        return (same & visible) | (q == kv)

    return mask_mod


def block_mask(batch: Any) -> Any:
    """The FlexAttention `BlockMask` of `batch` (rows already at a multiple of `BLOCK`), on the batch's device."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, width = batch.input_ids.shape
    device = batch.input_ids.device
    mask_mod = make_mask_mod(mask_tables(row_segments(batch), rows, width, device))
    return create_block_mask(mask_mod, rows, None, width, width, device=device, BLOCK_SIZE=BLOCK)


def dense_mask(batch: Any) -> torch.Tensor:
    """(R, 1, T, T) bool: the same `mask_mod` evaluated at every (query, key) pair, to check it against."""
    from torch.nn.attention.flex_attention import create_mask

    rows, width = batch.input_ids.shape
    device = batch.input_ids.device
    mask_mod = make_mask_mod(mask_tables(row_segments(batch), rows, width, device))
    return create_mask(mask_mod, rows, 1, width, width, device=device)


@cache
def _compiled_flex() -> Any:
    """FlexAttention compiled once; dynamo then keeps one graph per input shape (the width buckets)."""
    from torch.nn.attention.flex_attention import flex_attention

    limit = getattr(torch._dynamo.config, "recompile_limit", 8)
    torch._dynamo.config.recompile_limit = max(limit, RECOMPILE_LIMIT)
    return torch.compile(flex_attention, dynamic=False)


def _note_shape(query: torch.Tensor, key: torch.Tensor) -> None:
    shape = (*query.shape, key.shape[1], query.dtype, query.device.type, torch.is_grad_enabled())
    if shape not in _compiled_shapes:
        _compiled_shapes.add(shape)
        rows, heads, width, dim = query.shape
        log.info(
            "flex_attention: compiling for %d row(s) x %d tokens%s (%d shapes so far)",
            rows,
            width,
            " with gradients" if torch.is_grad_enabled() else "",
            len(_compiled_shapes),
        )


def compiled_shapes() -> int:
    """How many input shapes FlexAttention has been compiled for in this process."""
    return len(_compiled_shapes)


def flex_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # (R, H, T, D)
    key: torch.Tensor,  # (R, KV, T, D)
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: FlexAttention under a `BlockMask`, plain SDPA for any other mask
    (the padded batches of generation or scoring); returns (R, T, H, D)."""
    from torch.nn.attention.flex_attention import BlockMask
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window"):
        raise UserError(
            "this model's attention (logit soft-capping or a sliding window) is not supported by the flex_attention "
            "path; set attn_implementation=sdpa"
        )
    if dropout > 0:
        raise UserError("flex_attention has no attention dropout; set disable_dropout=true or attn_implementation=sdpa")
    _note_shape(query, key)
    with torch.autocast(query.device.type, enabled=False):  # q, k and v must share one dtype inside the kernel
        key, value = key.to(query.dtype), value.to(query.dtype)
        out = _compiled_flex()(
            query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]
        )  # (R, H, T, D)
    return out.transpose(1, 2).contiguous(), None


def _mask(*args: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
    """The model's own mask for batches without a `BlockMask` (those arrive 4-D and pass through untouched)."""
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def enable(model: Any) -> bool:
    """Switch a model that runs transformers' SDPA to FlexAttention block masks; False if it cannot switch."""
    return switch_attention(model, NAME, flex_attention_forward, _mask)


def enabled(model: Any) -> bool:
    return getattr(model.config, "_attn_implementation", None) == NAME
