"""Which pairs each forward pass runs: the data order, its split over processes, and its forward passes.

The data order is a pure function of (seed, step): step s of an epoch takes the s-th slice of a seeded
permutation. A resumed run therefore continues exactly where it stopped, and a run on another number of
processes sees the same global batches. Each process takes an equal share of a global batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dpokit.config import DPOConfig
from dpokit.data.encode import EncodedDataset

Passes = list[tuple[list[int], list[float]]]  # a process's forward passes: (pair indices, weights) each


@dataclass(frozen=True)
class Schedule:
    """Which pairs each optimizer step trains on."""

    num_pairs: int
    global_batch: int
    seed: int
    total_steps: int

    @classmethod
    def from_config(cls, cfg: DPOConfig, num_pairs: int, num_processes: int) -> Schedule:
        global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * num_processes
        per_epoch = math.ceil(num_pairs / global_batch)
        total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * per_epoch))
        return cls(num_pairs, global_batch, cfg.seed, total)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_pairs / self.global_batch)

    def epoch(self, steps_done: int) -> float:
        return round(steps_done / self.steps_per_epoch, 4)

    def _order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.num_pairs, generator=torch.Generator().manual_seed(self.seed + epoch))

    def indices(self, step: int) -> list[int]:
        """Pair indices of optimizer step `step` (0-based); the last step of an epoch may be smaller."""
        epoch, within = divmod(step, self.steps_per_epoch)
        return self._order(epoch)[within * self.global_batch : (within + 1) * self.global_batch].tolist()

    def epoch_indices(self, epoch: int) -> list[list[int]]:
        """`indices` of every step of `epoch`, from one shuffle."""
        order = self._order(epoch).tolist()
        return [order[s : s + self.global_batch] for s in range(0, self.num_pairs, self.global_batch)]


def shard(indices: list[int], rank: int, num_processes: int) -> tuple[list[int], list[float]]:
    """This process's equal share of a global batch, padded with zero-weight repeats when it does not divide."""
    per_process = math.ceil(len(indices) / num_processes)
    mine = indices[rank * per_process : (rank + 1) * per_process]
    weights = [1.0] * len(mine)
    while len(mine) < per_process:  # every process must run the same number of forward/backward passes
        mine.append(indices[0])
        weights.append(0.0)
    return mine, weights


def micro_batches(
    indices: list[int], weights: list[float], size: int, data: EncodedDataset, group_by_length: bool
) -> Passes:
    """A process's share split into forward passes. Grouping by length cuts padding, not the step's gradient."""
    order = list(range(len(indices)))
    if group_by_length:
        order.sort(key=lambda i: -data.pairs[indices[i]].num_tokens)
    return [
        ([indices[i] for i in order[s : s + size]], [weights[i] for i in order[s : s + size]])
        for s in range(0, len(order), size)
    ]


def train_passes(cfg: DPOConfig, data: EncodedDataset, indices: list[int], rank: int, num_processes: int) -> Passes:
    """The forward passes process `rank` runs for the global batch `indices`."""
    mine, weights = shard(indices, rank, num_processes)
    return micro_batches(mine, weights, cfg.per_device_train_batch_size, data, cfg.group_by_length)


def eval_passes(cfg: DPOConfig, data: EncodedDataset, rank: int, num_processes: int) -> Passes:
    """The forward passes process `rank` runs to evaluate every pair of `data`."""
    mine, weights = shard(list(range(len(data))), rank, num_processes)
    return micro_batches(mine, weights, cfg.per_device_eval_batch_size, data, True)


def reference_passes(
    cfg: DPOConfig, schedule: Schedule | None, data: EncodedDataset, num_processes: int
) -> list[list[list[int]]]:
    """Each process's forward passes (pair indices) of the reference pass: the first training epoch's (or,
    without a schedule, evaluation's) micro-batches, or length-sorted batches of `precompute_ref_batch_size`
    dealt round-robin."""
    ranks = range(num_processes)
    if cfg.precompute_ref_batch_size:
        order = sorted(range(len(data)), key=lambda i: -data.pairs[i].num_tokens)
        size = cfg.precompute_ref_batch_size
        batches = [order[s : s + size] for s in range(0, len(order), size)]
        return [batches[rank::num_processes] for rank in ranks]
    if schedule is None:
        return [[idx for idx, _ in eval_passes(cfg, data, rank, num_processes)] for rank in ranks]
    epoch = schedule.epoch_indices(0)
    return [
        [idx for batch in epoch for idx, _ in train_passes(cfg, data, batch, rank, num_processes)] for rank in ranks
    ]
