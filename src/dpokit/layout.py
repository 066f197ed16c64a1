"""The model-input layout that the speed keys select, for training, evaluation and the reference pass alike."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dpokit.config import DPOConfig
from dpokit.data.collate import Batch, collate
from dpokit.data.encode import EncodedDataset


def make_batch(
    cfg: DPOConfig, pad_id: int, data: EncodedDataset, indices: Sequence[int], device: torch.device
) -> Batch:
    """Pairs `indices` of `data` in the layout the speed keys select, on `device`."""
    pairs = [data.pairs[i] for i in indices]
    # one row without padding is the layout segment attention runs best; a dense-mask kernel wants short rows
    one_row = cfg.segment_attention or cfg.attn_implementation == "flash_attention_2"  # varlen finds one row's segments
    layout = {"padding_free": cfg.padding_free, "prefix_sharing": cfg.prefix_sharing, "one_row": one_row}
    return collate(pairs, pad_id, **layout).to(device)
