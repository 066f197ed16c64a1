"""Where the reference log-probs come from, decided once by `setup`:

- precomputed: one no-grad pass over the data before training, cached on disk under a key of everything that
  changes the numbers (`cache_settings`), so training holds and runs no reference weights at all (the default).
  The pass runs the very batches of the first epoch: in bf16 a sequence's numbers depend slightly on the batch
  around it, and this way the policy at step 0 equals its reference exactly, as it should;
- adapter-off: with LoRA the reference is the same model with its adapters disabled (one copy in memory);
- frozen copy: for full fine-tuning without precomputation, a frozen copy of the starting weights;
- none: reference-free losses (SimPO) need no reference.

Every reference forward runs in eval mode, whichever strategy: with dropout on (disable_dropout=false, lora
dropout, a model's attention dropout) the reference log-probs would otherwise be noise that differs between the
strategies.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from dpokit.config import DPOConfig
from dpokit.console import progress
from dpokit.data.collate import Batch
from dpokit.data.encode import EncodedDataset
from dpokit.engines import Engine
from dpokit.errors import UserError
from dpokit.fingerprint import model_fingerprint
from dpokit.layout import make_batch
from dpokit.logprobs import PairLogps, SequenceLogps
from dpokit.losses import needs_reference
from dpokit.models import cache_dir
from dpokit.quantization import for_run
from dpokit.schedule import Schedule, reference_passes
from dpokit.startup import Autocast

RefLogps = tuple[torch.Tensor, torch.Tensor]  # (reference_chosen_logps, reference_rejected_logps), each (B,)


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


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """`module` in eval mode inside (no dropout), every submodule back in its own mode after: the policy trains
    between reference passes. Quantized layers keep their mode: bitsandbytes picks its kernel by it (on CPU an
    8-bit layer in train mode dequantizes and runs the float matmul), and the reference must compute what the
    policy computes."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    for m, training in modes.items():
        if type(m).__module__.startswith("bitsandbytes"):
            m.training = training
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


class LiveReference:
    """Runs a reference model under no_grad, in eval mode, inside `context` (e.g. adapters disabled)."""

    def __init__(
        self, module: SequenceLogps, context: Callable[[], AbstractContextManager[Any]], autocast: Autocast
    ) -> None:
        self.module = module
        self.context = context
        self.autocast = autocast

    @torch.no_grad()
    def forward(self, batch: Batch) -> PairLogps:
        with eval_mode(self.module), self.context(), self.autocast():
            return self.module(batch)

    def logps(self, batch: Batch, indices: Sequence[int]) -> RefLogps:
        out = self.forward(batch)
        return out.chosen.detach(), out.rejected.detach()


class NoReference:
    """For reference-free losses: zeros, never used by the loss."""

    def logps(self, batch: Batch, indices: Sequence[int]) -> RefLogps:
        zeros = torch.zeros(batch.num_pairs, device=batch.input_ids.device)
        return zeros, zeros


# --- the one decision -------------------------------------------------------------------------------------------

STRATEGIES = ("none", "precomputed", "adapter-off", "frozen copy")


@dataclass(frozen=True)
class ReferencePlan:
    """How a run gets its reference log-probs: `strategy` (one of STRATEGIES) and, when they are precomputed,
    what runs the precomputing pass (`source`: "adapter-off" or "starting policy")."""

    strategy: str
    source: str | None = None

    @classmethod
    def from_config(cls, cfg: DPOConfig) -> ReferencePlan:
        if not needs_reference(cfg.loss_type):
            return cls("none")
        live = "adapter-off" if cfg.use_peft else "frozen copy"
        if not cfg.precompute_ref_log_probs:
            return cls(live)
        # before the first step the policy is its own reference: no copy is needed for the pass
        return cls("precomputed", "adapter-off" if cfg.use_peft else "starting policy")

    def where(self, engine: Engine) -> str | None:
        """Where the reference of a full fine-tuning run lives when the engine shards the weights, or one line on
        why it cannot live anywhere; None when nothing needs saying."""
        if not engine.shards_weights or "adapter-off" in (self.strategy, self.source) or self.strategy == "none":
            return None
        if self.strategy == "precomputed":
            return "reference: log-probs precomputed before the first step; no reference weights are kept"
        if engine.kind == "fsdp2":
            return "reference: a frozen copy of the starting weights, sharded by FSDP2 like the policy"
        raise UserError(
            "full fine-tuning under ZeRO-3 keeps no frozen copy of the weights; set precompute_ref_log_probs=true "
            "(the default), or train LoRA adapters (use_peft=true)"
        )


@dataclass
class ReferenceSetup:
    """The plan, and the model that runs the reference forward: taken before the engine shards or casts the
    policy, as a frozen copy must hold the starting weights whole. `build` turns it into the references once the
    policy is prepared (under ZeRO-3 and FSDP2 only the prepared model has whole weights to run)."""

    cfg: DPOConfig
    plan: ReferencePlan
    module: SequenceLogps | None  # the policy itself, its frozen copy, or None
    acc: Any
    autocast: Autocast
    precision: str  # "bf16" or "no", part of the cache key
    console: Any
    pad_id: int

    def live(self) -> LiveReference | None:
        if self.module is None:
            return None
        off = "adapter-off" in (self.plan.strategy, self.plan.source)
        return LiveReference(self.module, self.module.model.disable_adapter if off else nullcontext, self.autocast)

    def build(
        self, schedule: Schedule, train_set: EncodedDataset, eval_set: EncodedDataset | None
    ) -> tuple[Reference, Reference | None]:
        """The references of the train set (its table run with `schedule`'s batches) and of the eval set (run with
        evaluation's): a precomputed table, from the cache or one pass, the live model, or zeros."""
        live = self.live()
        train = self._reference(live, train_set, schedule)
        return train, None if eval_set is None else self._reference(live, eval_set, None)

    def _reference(self, live: LiveReference | None, data: EncodedDataset, schedule: Schedule | None) -> Reference:
        if live is None:
            return NoReference()
        if self.plan.strategy != "precomputed":
            return live
        acc = self.acc
        passes = reference_passes(self.cfg, schedule, data, acc.num_processes)
        settings = cache_settings(self.cfg, self.precision, live.module.model, passes, acc.device)

        def batch(indices: list[int]) -> Batch:
            return make_batch(self.cfg, self.pad_id, data, indices, acc.device)

        return PrecomputedReference(precomputed_table(acc, live, data, batch, passes, settings, self.console))


def setup(
    cfg: DPOConfig, policy: SequenceLogps, acc: Any, autocast: Autocast, precision: str, console: Any, pad_id: int
) -> ReferenceSetup:
    """The reference strategy of this run and what runs it; the only place that decides it."""
    plan = ReferencePlan.from_config(cfg)
    module: SequenceLogps | None = policy
    if plan.strategy == "none":
        module = None
    elif plan.strategy == "frozen copy":
        module = copy.deepcopy(policy).eval()
        module.requires_grad_(False)
    return ReferenceSetup(cfg, plan, module, acc, autocast, precision, console, pad_id)


# --- the cache ----------------------------------------------------------------------------------------------------


def dropout_state(model: torch.nn.Module) -> dict[str, Any]:
    """The dropout the model would apply in train mode: its dropout modules' rates (LoRA's among them) and the
    rates its config gives the attention functions, which no module holds."""
    modules = sorted({m.p for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0})
    config = getattr(model, "config", None)
    rates = {} if config is None else config.to_dict()
    named = {k: v for k, v in sorted(rates.items()) if "dropout" in k and isinstance(v, float) and v > 0}
    return {"modules": modules, "config": named}


def cache_settings(
    cfg: DPOConfig, precision: str, model: Any, passes: list[list[list[int]]], device: torch.device
) -> dict[str, Any]:
    """Everything besides the token ids that changes the reference numbers: the weights (by content or snapshot),
    quantization, precision, dropout, the layout and kernels, the length limits and the batches run."""
    quant = for_run(cfg, device)
    return {
        "model": model_fingerprint(cfg.model_name_or_path),
        "quantization": None if quant is None else quant.describe(),
        "precision": precision,
        "dropout": dropout_state(model),
        "layout": {
            "padding_free": cfg.padding_free,
            "prefix_sharing": cfg.prefix_sharing,
            "segment_attention": cfg.segment_attention,
            "attn_implementation": cfg.attn_implementation,
            "logits_chunk_size": cfg.logits_chunk_size,
            "torch_compile": cfg.torch_compile,
        },
        "lengths": [cfg.max_length, cfg.max_prompt_length, cfg.truncation_mode, cfg.length_policy],
        "ld_alpha": cfg.ld_alpha,  # LD-DPO weights the sums
        "plan": hashlib.sha256(json.dumps(passes).encode()).hexdigest(),
    }


def cache_path(cache_root: Path, data: EncodedDataset, settings: dict[str, Any]) -> Path:
    """The cache file for these token ids and the settings that change the numbers."""
    key = json.dumps({"data": data.fingerprint(), **settings}, sort_keys=True)
    return cache_root / "ref-logps" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"


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


# --- the precomputing pass ------------------------------------------------------------------------------------


@torch.no_grad()
def compute_reference_table(
    forward: Callable[[Batch], PairLogps],
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


def precomputed_table(
    acc: Any,
    live: LiveReference,
    data: EncodedDataset,
    make_batch: Callable[[list[int]], Batch],
    passes: list[list[list[int]]],
    settings: dict[str, Any],
    console: Any,
) -> torch.Tensor:
    """The reference table of `data`: from the cache when one matches, else one pass of each process's `passes`
    (pair indices per forward pass, in the order training runs them), then cached."""
    path = cache_path(cache_dir(), data, settings)
    table = load_table(path, len(data))
    # every process must take the same branch, or the ones that compute wait forever in the gather; on several
    # machines with their own cache folders, one may lack the file
    missing_somewhere = acc.reduce(torch.tensor([float(table is None)], device=acc.device), "max")
    if float(missing_somewhere) == 0 and table is not None:
        console.print(f"reference log-probs: from cache {path}")
        return table
    with progress(console, len(data), label="reference log-probs", unit="pairs") as update:
        done = [0]

        def tick(n: int) -> None:
            done[0] += n * acc.num_processes
            update(min(done[0], len(data)))

        table = compute_reference_table(
            live.forward,
            data,
            make_batch,
            passes[acc.process_index],
            max(sum(map(len, p)) for p in passes),
            gather=(lambda t: acc.gather(t.to(acc.device)).cpu()) if acc.num_processes > 1 else None,
            on_batch=tick,
        )
    if acc.is_local_main_process:  # one writer per machine: each may have its own cache folder
        save_table(table, path)
    acc.wait_for_everyone()
    return table
