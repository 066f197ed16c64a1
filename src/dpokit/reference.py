"""Where the reference log-probs come from.

- precomputed: one no-grad pass over the data before training, in large length-sorted batches, cached on disk
  under a key of model and data, so training holds and runs no reference weights at all (the default);
- adapter-off: with LoRA the reference is the same model with its adapters disabled (one copy in memory);
- frozen copy: for full fine-tuning without precomputation, a frozen copy of the starting weights;
- none: reference-free losses (SimPO) need no reference.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from dpokit.config import DPOConfig
from dpokit.console import progress
from dpokit.data.collate import Batch
from dpokit.data.encode import EncodedDataset
from dpokit.logprobs import SeqLogps, SequenceLogps
from dpokit.losses import REFERENCE_FREE
from dpokit.models import cache_dir, resolve_model_path

RefLogps = tuple[torch.Tensor, torch.Tensor]  # (chosen, rejected), each (B,)


class Reference(Protocol):
    def logps(self, batch: Batch, indices: Sequence[int]) -> RefLogps:
        """Reference log-probs of the pairs `indices` of the dataset, laid out in `batch`."""
        ...


class PrecomputedReference:
    def __init__(self, table: torch.Tensor) -> None:
        self.table = table  # (N, 2) fp32: chosen, rejected

    def logps(self, batch: Batch, indices: Sequence[int]) -> RefLogps:
        rows = self.table[torch.as_tensor(list(indices), dtype=torch.long)]
        device = batch.input_ids.device
        return rows[:, 0].to(device), rows[:, 1].to(device)


class LiveReference:
    """Runs a reference model during training, under no_grad, inside `context` (e.g. adapters disabled)."""

    def __init__(
        self, module: SequenceLogps, context: Callable[[], AbstractContextManager[Any]], autocast: Any
    ) -> None:
        self.module = module
        self.context = context
        self.autocast = autocast

    @torch.no_grad()
    def forward(self, batch: Batch) -> SeqLogps:
        with self.context(), self.autocast():
            return self.module(batch)

    def logps(self, batch: Batch, indices: Sequence[int]) -> RefLogps:
        out = self.forward(batch)
        return out.chosen.detach(), out.rejected.detach()


class NoReference:
    """For reference-free losses: zeros, never used by the loss."""

    def logps(self, batch: Batch, indices: Sequence[int]) -> RefLogps:
        zeros = torch.zeros(batch.num_pairs, device=batch.input_ids.device)
        return zeros, zeros


def adapter_off_reference(policy: SequenceLogps, autocast: Any) -> LiveReference:
    return LiveReference(policy, policy.model.disable_adapter, autocast)


def frozen_copy_reference(policy: SequenceLogps, autocast: Any) -> LiveReference:
    frozen = copy.deepcopy(policy).eval()
    frozen.requires_grad_(False)
    return LiveReference(frozen, nullcontext, autocast)


def model_fingerprint(name_or_path: str) -> str:
    """Identifies the reference weights: the folder and its weight files' sizes and times, or the hub name."""
    path = Path(name_or_path)
    parts = [str(path.resolve()) if path.exists() else name_or_path]
    if path.is_dir():
        for f in sorted(path.glob("*")):
            if f.suffix in (".safetensors", ".json"):
                stat = f.stat()
                parts.append(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def cache_path(cache_root: Path, model_key: str, data: EncodedDataset, settings: dict[str, Any]) -> Path:
    """The cache file for this model, these token ids, and the settings that change the numbers (precision)."""
    key = json.dumps({"model": model_key, "data": data.fingerprint(), **settings}, sort_keys=True)
    return cache_root / "ref-logps" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"


@torch.no_grad()
def compute_reference_table(
    forward: Callable[[Batch], SeqLogps],
    data: EncodedDataset,
    make_batch: Callable[[list[int]], Batch],
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """(N, 2) reference log-probs of every pair; each process computes a shard and the shards are gathered.

    Pairs are sorted by length so each batch holds similar lengths (little padding), and dealt round-robin to
    processes so their shards cost the same.
    """
    order = sorted(range(len(data)), key=lambda i: -data.pairs[i].num_tokens)
    mine = order[rank::world_size]
    rows = torch.zeros(len(mine), 3)  # index, chosen, rejected
    for start in range(0, len(mine), batch_size):
        idx = mine[start : start + batch_size]
        out = forward(make_batch(idx))
        rows[start : start + len(idx), 0] = torch.tensor(idx, dtype=torch.float32)
        rows[start : start + len(idx), 1] = out.chosen.float().cpu()
        rows[start : start + len(idx), 2] = out.rejected.float().cpu()
        if on_batch is not None:
            on_batch(len(idx))
    if world_size > 1:
        assert gather is not None
        # shards differ in length by at most one row: pad with index -1 so every process sends the same shape
        padded = torch.full((len(order[0::world_size]), 3), -1.0)
        padded[: len(rows)] = rows
        rows = gather(padded)
        rows = rows[rows[:, 0] >= 0]
    table = torch.zeros(len(data), 2)
    table[rows[:, 0].long()] = rows[:, 1:]
    return table


def save_table(table: torch.Tensor, path: Path) -> None:
    """Atomically: a crash mid-write never leaves a cache file that looks complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    save_file({"logps": table.contiguous()}, str(tmp))
    os.replace(tmp, path)


def load_table(path: Path, expected_rows: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        table = load_file(str(path))["logps"]
    except Exception:  # a damaged cache file is recomputed, never trusted
        return None
    return table if table.shape == (expected_rows, 2) else None


def live_reference(cfg: DPOConfig, policy: SequenceLogps, autocast: Any) -> LiveReference | None:
    """The reference model that runs during training (or for the one precomputing pass), if the loss needs one."""
    if cfg.loss_type in REFERENCE_FREE:
        return None
    if cfg.use_peft:
        return adapter_off_reference(policy, autocast)
    if cfg.precompute_ref_log_probs:
        return LiveReference(policy, nullcontext, autocast)  # before the first step the policy is the reference
    return frozen_copy_reference(policy, autocast)


def build_reference(
    cfg: DPOConfig, acc: Any, live: LiveReference | None, data: EncodedDataset, make_batch: Any, console: Any
) -> Reference:
    """The reference the config asks for; a precomputed table comes from the cache when model and data match."""
    if live is None:
        return NoReference()
    if not cfg.precompute_ref_log_probs:
        return live
    settings = {"precision": acc.mixed_precision, "attn": cfg.attn_implementation}
    path = cache_path(cache_dir(), model_fingerprint(resolve_model_path(cfg.model_name_or_path)), data, settings)
    table = load_table(path, len(data))
    if table is not None:
        console.print(f"reference log-probs: from cache {path}")
        return PrecomputedReference(table)
    batch_size = cfg.precompute_ref_batch_size or 4 * cfg.per_device_eval_batch_size
    with progress(console, len(data), label="reference log-probs", unit="pairs") as update:
        done = [0]

        def tick(n: int) -> None:
            done[0] += n * acc.num_processes
            update(min(done[0], len(data)))

        table = compute_reference_table(
            live.forward,
            data,
            make_batch,
            batch_size,
            acc.process_index,
            acc.num_processes,
            gather=lambda t: acc.gather(t.to(acc.device)).cpu(),
            on_batch=tick,
        )
    if acc.is_main_process:
        save_table(table, path)
    acc.wait_for_everyone()
    return PrecomputedReference(table)
