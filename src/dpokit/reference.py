"""Where the reference log-probs come from.

- precomputed: one no-grad pass over the data before training, cached on disk under a key of model, data and
  batches, so training holds and runs no reference weights at all (the default). The pass runs the very batches
  of the first epoch: in bf16 a sequence's numbers depend slightly on the batch around it, and this way the
  policy at step 0 equals its reference exactly, as it should;
- adapter-off: with LoRA the reference is the same model with its adapters disabled (one copy in memory);
- frozen copy: for full fine-tuning without precomputation, a frozen copy of the starting weights;
- none: reference-free losses (SimPO) need no reference.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
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
from dpokit.losses import needs_reference
from dpokit.models import cache_dir, resolve_model_path
from dpokit.quantization import for_run

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
    passes: list[list[int]],
    rows_per_process: int,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """(N, 2) reference log-probs of every pair: this process runs `passes` (pair indices per forward pass), and
    with `gather` the processes' rows, padded to `rows_per_process`, are put together."""
    rows = torch.full((rows_per_process, 3), -1.0)  # index, chosen, rejected; index -1 is padding
    done = 0
    for idx in passes:
        out = forward(make_batch(idx))
        rows[done : done + len(idx), 0] = torch.tensor(idx, dtype=torch.float32)
        rows[done : done + len(idx), 1] = out.chosen.float().cpu()
        rows[done : done + len(idx), 2] = out.rejected.float().cpu()
        done += len(idx)
        if on_batch is not None:
            on_batch(len(idx))
    if gather is not None:
        rows = gather(rows)
    rows = rows[rows[:, 0] >= 0]
    table = torch.full((len(data), 2), math.nan)
    table[rows[:, 0].long()] = rows[:, 1:]
    if table.isnan().any():
        raise AssertionError("the reference passes left pairs out")  # a bug in the plan, never the user's data
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
    if not needs_reference(cfg.loss_type):
        return None
    if cfg.use_peft:
        return adapter_off_reference(policy, autocast)
    if cfg.precompute_ref_log_probs:
        return LiveReference(policy, nullcontext, autocast)  # before the first step the policy is the reference
    return frozen_copy_reference(policy, autocast)


def build_reference(
    cfg: DPOConfig,
    acc: Any,
    live: LiveReference | None,
    data: EncodedDataset,
    make_batch: Any,
    plan: Callable[[int], list[list[int]]],
    console: Any,
) -> Reference:
    """The reference the config asks for. A precomputed table runs `plan(rank)`, each process's forward passes
    (pair indices) in the order training runs them, and comes from the cache when model, data and plan match."""
    if live is None:
        return NoReference()
    if not cfg.precompute_ref_log_probs:
        return live
    plans = [plan(rank) for rank in range(acc.num_processes)]
    settings = {
        "precision": acc.mixed_precision,
        "attn": cfg.attn_implementation,
        "layout": [cfg.padding_free, cfg.prefix_sharing, cfg.segment_attention],
        "plan": hashlib.sha256(json.dumps(plans).encode()).hexdigest(),
        **({"ld_alpha": cfg.ld_alpha} if cfg.ld_alpha is not None else {}),  # LD-DPO weights the sums
    }
    quant = for_run(cfg, acc.device)
    if quant is not None:  # the same weights quantized are another reference; unquantized keys stay as they were
        settings["quantization"] = quant.describe()
    path = cache_path(cache_dir(), model_fingerprint(resolve_model_path(cfg.model_name_or_path)), data, settings)
    table = load_table(path, len(data))
    # every process must take the same branch, or the ones that compute wait forever in the gather; on several
    # machines with their own cache folders, one may lack the file
    missing_somewhere = acc.reduce(torch.tensor([float(table is None)], device=acc.device), "max")
    if float(missing_somewhere) == 0:
        console.print(f"reference log-probs: from cache {path}")
        return PrecomputedReference(table)
    with progress(console, len(data), label="reference log-probs", unit="pairs") as update:
        done = [0]

        def tick(n: int) -> None:
            done[0] += n * acc.num_processes
            update(min(done[0], len(data)))

        table = compute_reference_table(
            live.forward,
            data,
            make_batch,
            plans[acc.process_index],
            max(sum(map(len, p)) for p in plans),
            gather=(lambda t: acc.gather(t.to(acc.device)).cpu()) if acc.num_processes > 1 else None,
            on_batch=tick,
        )
    if acc.is_local_main_process:  # one writer per machine: each may have its own cache folder
        save_table(table, path)
    acc.wait_for_everyone()
    return PrecomputedReference(table)
