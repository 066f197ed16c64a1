"""The DPO training recipe: config in, aligned adapter (or model) out.

Reads top to bottom: check the output folder, load and check the data (before any model, so a bad row fails in
seconds), load the policy with LoRA, get the reference log-probs, then run the optimizer steps with logging,
evaluation and checkpoints, and save the result.

The data order is a pure function of (seed, step): step s of an epoch takes the s-th slice of a seeded
permutation. A resumed run therefore continues exactly where it stopped, and a run on another number of
processes sees the same global batches. Each process takes an equal share of a global batch, and the loss is
the mean over the global batch however it is split into processes and accumulation passes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from dpokit import attention, devices, engines, quantization, trackers
from dpokit import checkpoint as ckpt
from dpokit.config import DPOConfig, load_config
from dpokit.console import StopRequest, make_console, progress, stop_signals
from dpokit.data.collate import Batch, collate
from dpokit.data.encode import EncodedDataset, apply_length_policy, encode_loaded
from dpokit.data.inspection import dataset_stats
from dpokit.data.load import load_pairs
from dpokit.data.markers import template_markers
from dpokit.data.rows import Options
from dpokit.errors import RunStopped, UserError
from dpokit.logprobs import SeqLogps, SequenceLogps
from dpokit.losses import loss_settings, preference_loss
from dpokit.models import (
    add_lora,
    cast_frozen_linears,
    compile_layers,
    count_parameters,
    disable_dropout,
    load_model,
    load_tokenizer,
)
from dpokit.reference import Reference, build_reference, live_reference
from dpokit.runs import PROVENANCE_FILE

METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def run(args: argparse.Namespace) -> int:
    """`dpokit train [CONFIG.yaml] [key=value ...]`."""
    from dpokit.config import split_settings

    path, overrides = split_settings(args.settings)
    train(load_config(path, overrides))  # the command closes the group of processes; `train` leaves it open
    return 0


# --- data order ---------------------------------------------------------------------------------------------------


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
) -> list[tuple[list[int], list[float]]]:
    """A process's share split into forward passes. Grouping by length cuts padding, not the step's gradient."""
    order = list(range(len(indices)))
    if group_by_length:
        order.sort(key=lambda i: -data.pairs[indices[i]].num_tokens)
    return [
        ([indices[i] for i in order[s : s + size]], [weights[i] for i in order[s : s + size]])
        for s in range(0, len(order), size)
    ]


def reference_plan(
    cfg: DPOConfig, schedule: Schedule | None, data: EncodedDataset, acc: Any
) -> Callable[[int], list[list[int]]]:
    """Each process's forward passes of the reference pass: the first training epoch's (or, without a schedule,
    evaluation's) micro-batches, or length-sorted batches of `precompute_ref_batch_size` dealt round-robin."""
    n = acc.num_processes
    if cfg.precompute_ref_batch_size:
        order = sorted(range(len(data)), key=lambda i: -data.pairs[i].num_tokens)
        size = cfg.precompute_ref_batch_size
        batches = [order[s : s + size] for s in range(0, len(order), size)]
        return lambda rank: batches[rank::n]

    def passes(rank: int) -> list[list[int]]:
        if schedule is None:
            return [idx for idx, _ in eval_passes(cfg, data, rank, n)]
        return [idx for batch in schedule.epoch_indices(0) for idx, _ in train_passes(cfg, data, batch, rank, n)]

    return passes


def train_passes(
    cfg: DPOConfig, data: EncodedDataset, indices: list[int], rank: int, num_processes: int
) -> list[tuple[list[int], list[float]]]:
    """The forward passes (pair indices, weights) process `rank` runs for the global batch `indices`."""
    mine, weights = shard(indices, rank, num_processes)
    return micro_batches(mine, weights, cfg.per_device_train_batch_size, data, cfg.group_by_length)


def eval_passes(
    cfg: DPOConfig, data: EncodedDataset, rank: int, num_processes: int
) -> list[tuple[list[int], list[float]]]:
    """The forward passes (pair indices, weights) process `rank` runs to evaluate every pair of `data`."""
    mine, weights = shard(list(range(len(data))), rank, num_processes)
    return micro_batches(mine, weights, cfg.per_device_eval_batch_size, data, True)


# --- metrics ------------------------------------------------------------------------------------------------------


@dataclass
class MetricWindow:
    """Pair-weighted sums of the metrics since the last log line, summed over processes when read."""

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(METRICS, 0.0))
    pairs: float = 0.0
    steps: int = 0  # the same on every process, unlike `pairs`

    def add(self, values: dict[str, torch.Tensor], weights: torch.Tensor) -> None:
        for key, value in values.items():
            self.sums[key] += float((value.detach().float() * weights).sum())  # note: a sync point, once per pass
        self.pairs += float(weights.sum())

    def means(self, acc: Any) -> dict[str, float]:
        local = torch.tensor([self.pairs, *self.sums.values()], dtype=torch.float64, device=acc.device)
        totals = acc.reduce(local, "sum").cpu()
        pairs = max(float(totals[0]), 1.0)
        return {key: float(total) / pairs for key, total in zip(self.sums, totals[1:], strict=True)}


def loss_and_metrics(
    cfg: DPOConfig, logps: SeqLogps, ref: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses and the per-pair values of TRL's metrics (averaged when logged)."""
    losses, chosen_rewards, rejected_rewards = preference_loss(
        cfg.loss_type,
        logps.chosen,
        logps.rejected,
        ref[0],
        ref[1],
        chosen_lengths=logps.chosen_lengths,
        rejected_lengths=logps.rejected_lengths,
        **loss_settings(cfg, logps),
    )
    return losses, {
        "loss": losses,
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": logps.chosen,
        "logps/rejected": logps.rejected,
    }


# --- the run ------------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """What a checkpoint must carry besides weights and optimizer to continue exactly."""

    step: int = 0
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    runtime: float = 0.0
    pairs: float = 0.0
    tokens: float = 0.0  # prompt + response tokens trained on, the prompt counted once per response (TRL's count)
    window: dict[str, Any] | None = None  # the open logging window


@dataclass
class Run:
    """Everything the step loop needs, built once by `train`."""

    cfg: DPOConfig
    acc: Any
    policy: Any  # SequenceLogps, wrapped by DDP/FSDP when distributed
    optimizer: torch.optim.Optimizer
    scheduler: Any
    reference: Reference
    eval_reference: Reference | None
    train_set: EncodedDataset
    eval_set: EncodedDataset | None
    schedule: Schedule
    tokenizer: Any
    console: Any
    engine: engines.Engine

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    def batch(self, data: EncodedDataset, indices: Sequence[int]) -> Batch:
        return make_batch(self.cfg, self.tokenizer.pad_token_id, data, indices, self.acc.device)

    def unwrapped_model(self) -> Any:
        return self.acc.unwrap_model(self.policy).model


def train(cfg: DPOConfig) -> dict[str, Any]:
    """Run DPO as configured; returns the summary also written to `summary.json`."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    AcceleratorState._reset_state()  # a second train() in one process (a notebook, the tests) may change precision
    # the engine the launcher asked for (DDP, DeepSpeed ZeRO, FSDP2), checked before any data or model is touched
    acc, engine = engines.start(
        mixed_precision=precision(cfg),
        # `Schedule` counts global steps: one scheduler step per optimizer step with any number of processes
        # (stepped with the optimizer, accelerate would step it once per process, for per-process data loaders)
        step_scheduler_with_optimizer=False,
        project_dir=cfg.output_dir,
    )
    reference_line = engines.check_reference(cfg, engine)
    devices.prepare(acc.device)
    trackers.check_installed(cfg)
    if not acc.is_main_process:
        logging.getLogger("dpokit").setLevel(logging.WARNING)  # the main process reports for all
    out = Path(cfg.output_dir)
    resume_from = ckpt.prepare_output_dir(
        out,
        resume=cfg.resume,
        resume_from=cfg.resume_from,
        overwrite=cfg.overwrite_output_dir,
        is_main=acc.is_main_process,
    )
    acc.wait_for_everyone()
    set_seed(cfg.seed)
    console = make_console(acc.is_main_process)
    for line in filter(None, (engine.describe(acc), reference_line)):  # what runs, before anything is loaded
        console.print(line)
    quant = quantization.start(cfg, acc.device)  # a broken bitsandbytes install fails here, in a second

    # Data first: a bad row must fail in seconds, before a model is loaded.
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.chat_template, cfg.trust_remote_code)
    train_set, train_stats = load_split(cfg, tokenizer, "train", console)
    eval_set, eval_stats = load_split(cfg, tokenizer, "eval", console) if cfg.eval_data else (None, None)

    model = load_policy(cfg, acc.device, quant)
    policy = SequenceLogps(model, cfg.logits_chunk_size, cfg.ld_alpha, cfg.use_weighting)

    def batches_of(data: EncodedDataset) -> Any:
        return lambda indices: make_batch(cfg, tokenizer.pad_token_id, data, indices, acc.device)

    schedule = Schedule.from_config(cfg, len(train_set), acc.num_processes)
    live = live_reference(cfg, policy, acc.autocast)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, schedule.total_steps)
    # prepared before the reference pass: under ZeRO-3 and FSDP2 only the prepared model has whole weights to run
    policy_run, optimizer, scheduler = engines.prepare(acc, engine, cfg, policy, optimizer, scheduler)
    engines.shard_reference(acc, engine, live, policy)
    reference = build_reference(
        cfg, acc, live, train_set, batches_of(train_set), reference_plan(cfg, schedule, train_set, acc), console
    )
    eval_reference = None
    if eval_set is not None:
        eval_plan = reference_plan(cfg, None, eval_set, acc)
        eval_reference = build_reference(cfg, acc, live, eval_set, batches_of(eval_set), eval_plan, console)
    del live  # a frozen copy now lives only where a reference still runs it

    run = Run(
        cfg,
        acc,
        policy_run,
        optimizer,
        scheduler,
        reference,
        eval_reference,
        train_set,
        eval_set,
        schedule,
        tokenizer,
        console,
        engine,
    )

    state = resume(run, resume_from) if resume_from is not None else TrainState()
    if acc.is_main_process:
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
        write_json(out / "data_stats.json", {"train": train_stats, "eval": eval_stats})
        print_header(run, model)
    trackers.start(acc, cfg)
    try:
        with stop_signals() as stop:
            loop(run, state, stop)
    finally:
        trackers.finish(acc)
    return finish(run, state)


def make_batch(
    cfg: DPOConfig, pad_id: int, data: EncodedDataset, indices: Sequence[int], device: torch.device
) -> Batch:
    """Pairs `indices` of `data` in the layout the speed keys select, on `device`."""
    pairs = [data.pairs[i] for i in indices]
    # one row without padding is the layout segment attention runs best; a dense-mask kernel wants short rows
    one_row = cfg.segment_attention or cfg.attn_implementation == "flash_attention_2"  # varlen finds one row's segments
    layout = {"padding_free": cfg.padding_free, "prefix_sharing": cfg.prefix_sharing, "one_row": one_row}
    return collate(pairs, pad_id, **layout).to(device)


def load_policy(cfg: DPOConfig, device: torch.device, quant: quantization.Quantization | None = None) -> Any:
    """The model to train: LoRA on a frozen base (stored in bf16 under bf16 autocast, or quantized with `quant`),
    or every weight; dropout off as TRL does by default."""
    choice = attention.for_config(cfg, device)
    model = load_model(
        cfg.model_name_or_path,
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=choice.load_as,
        quantization=quant,
        device=device,
    )
    model.config.use_cache = False
    attention.apply(choice, model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if quant is not None:
        model = quantization.prepare_for_training(model, cfg.gradient_checkpointing)
    if cfg.use_peft:
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules, cfg.seed)
        if precision(cfg) == "bf16":
            cast_frozen_linears(model, torch.bfloat16)
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.torch_compile:
        compile_layers(model)
    return model.to(device).train()


def loop(run: Run, state: TrainState, stop: StopRequest) -> None:
    """Optimizer steps from `state.step` to the end, with logging, evaluation, checkpoints and clean stops."""
    cfg, acc, schedule = run.cfg, run.acc, run.schedule
    window = MetricWindow(**state.window) if state.window else MetricWindow()
    with progress(run.console, schedule.total_steps, state.step, "training", "steps") as update:
        while state.step < schedule.total_steps:
            started = time.perf_counter()
            before = MetricWindow(dict(window.sums), window.pairs, window.steps)
            stats = train_step(run, state.step, window)
            finite = math.isfinite(stats["grad_norm"]) and math.isfinite(stats["loss"])
            if finite:
                run.optimizer.step()
                window.steps += 1
                state.nonfinite_in_a_row = 0
            else:  # a NaN or inf reaches neither the weights nor the logged averages
                window = before
                state.skipped_steps += 1
                state.nonfinite_in_a_row += 1
                run.console.print(f"step {state.step + 1}: loss or gradient is not finite; step skipped")
            run.optimizer.zero_grad(set_to_none=True)
            learning_rate = run.scheduler.get_last_lr()[0]
            run.scheduler.step()
            state.step += 1
            state.runtime += time.perf_counter() - started
            state.pairs += stats["pairs"]
            state.tokens += stats["tokens"]
            update(state.step, f"{state.pairs / state.runtime:.2f} pairs/s")

            step, last = state.step, state.step == schedule.total_steps
            if (step % cfg.logging_steps == 0 or last) and window.steps:
                means = window.means(acc)
                row = {"step": step, "epoch": schedule.epoch(step), **means, "learning_rate": learning_rate}
                timing = {"num_tokens": state.tokens, "train_seconds": round(state.runtime, 3)}
                log_row(run, {**row, "grad_norm": stats["grad_norm"], **timing})
                window = MetricWindow()
            if run.eval_set is not None and ((cfg.eval_steps and step % cfg.eval_steps == 0) or last):
                log_row(run, {"step": step, "epoch": schedule.epoch(step), **evaluate(run)})
            state.window = asdict(window)
            if state.nonfinite_in_a_row > cfg.max_nonfinite_steps:
                path = save(run, state)
                raise RunStopped(
                    f"training stopped: the loss or gradient was NaN/inf for {state.nonfinite_in_a_row} steps in a "
                    f"row (up to step {step}); the last good weights are saved in {path}; lower learning_rate or "
                    "check the data, then continue with resume=true"
                )
            if cfg.save_steps and step % cfg.save_steps == 0 and not last:
                save(run, state)
            if stop_everywhere(acc, stop):
                path = save(run, state)
                raise RunStopped(
                    f"stopped by {stop.signal_name} after step {step}; checkpoint saved in {path}; continue with "
                    "the same command and resume=true",
                    exit_code=128 + stop.signum,
                )


def train_step(run: Run, step: int, window: MetricWindow) -> dict[str, float]:
    """Forward and backward over global batch `step`; returns its loss, gradient norm, pairs and tokens."""
    acc, cfg = run.acc, run.cfg
    indices = run.schedule.indices(step)
    passes = train_passes(cfg, run.train_set, indices, acc.process_index, acc.num_processes)
    scale = acc.num_processes / len(indices)  # DDP averages gradients over processes; the loss is a global mean
    loss_sum, tokens = 0.0, 0
    for k, (idx, w) in enumerate(passes):
        batch = run.batch(run.train_set, idx)
        w_t = torch.tensor(w, device=acc.device)
        last = k == len(passes) - 1  # gradients are all-reduced once per step, after the last pass
        with nullcontext() if last else acc.no_sync(run.policy):
            logps = run.policy(batch)
            losses, values = loss_and_metrics(cfg, logps, run.reference.logps(batch, idx))
            engines.backward(acc, run.engine, run.policy, (losses * w_t).sum() * scale, last)
        window.add(values, w_t)
        loss_sum += float((losses.detach() * w_t).sum())
        # counted as TRL counts them: each response with its own copy of the prompt, whatever the layout ran
        tokens += sum(run.train_set.pairs[i].num_tokens for i, weight in zip(idx, w, strict=True) if weight)
    params = [p for p in run.policy.parameters() if p.requires_grad]
    grad_norm = engines.clip_and_norm(acc, run.engine, run.policy, params, cfg.max_grad_norm)  # DeepSpeed steps here
    pairs = sum(sum(w) for _, w in passes)
    local = torch.tensor([loss_sum, pairs, tokens], dtype=torch.float64, device=acc.device)
    loss_total, pairs, tokens_total = acc.reduce(local, "sum").tolist()
    return {"grad_norm": float(grad_norm), "loss": loss_total / max(pairs, 1.0), "pairs": pairs, "tokens": tokens_total}


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """Loss and reward metrics over every eval pair, sharded across processes."""
    assert run.eval_set is not None and run.eval_reference is not None
    acc = run.acc
    policy = acc.unwrap_model(run.policy).eval()
    window = MetricWindow()
    for idx, w in eval_passes(run.cfg, run.eval_set, acc.process_index, acc.num_processes):
        batch = run.batch(run.eval_set, idx)
        with acc.autocast():
            logps = policy(batch)
        _, values = loss_and_metrics(run.cfg, logps, run.eval_reference.logps(batch, idx))
        window.add(values, torch.tensor(w, device=acc.device))
    policy.train()
    return {f"eval/{key}": value for key, value in window.means(acc).items()}


def stop_everywhere(acc: Any, stop: StopRequest) -> bool:
    """Whether any process was asked to stop: all must stop at the same step, or the others wait forever."""
    if acc.num_processes == 1:
        return stop.requested
    flag = acc.reduce(torch.tensor([float(stop.signum)], device=acc.device), "max")
    if float(flag) > 0 and not stop.requested:
        stop.signum, stop.signal_name = int(flag), "a signal to another process"
    return float(flag) > 0


def log_row(run: Run, row: dict[str, Any]) -> None:
    """A line in metrics.jsonl, the trackers' scalars, and one compact console line; main process only."""
    run.acc.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
    if not run.acc.is_main_process:
        return
    with (run.output_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    prefix = "eval/" if "eval/loss" in row else ""
    parts = [f"step {row['step']}/{run.schedule.total_steps}"] + (["eval"] if prefix else [])
    shown = {"loss": "loss", "rewards/accuracies": "acc", "rewards/margins": "margin", "rewards/chosen": "chosen"}
    parts += [f"{label} {float(row[prefix + key]):.4f}" for key, label in shown.items()]
    if "learning_rate" in row:
        parts += [f"lr {row['learning_rate']:.2e}", f"grad {row['grad_norm']:.3f}"]
    run.console.print("  ".join(parts))


def save(run: Run, state: TrainState) -> Path:
    """A checkpoint of the current state: the main process writes it, every process waits for it."""
    acc = run.acc
    path = run.output_dir / ckpt.CHECKPOINTS / f"step-{state.step}"
    acc.wait_for_everyone()
    # whole tensors, gathered by every process when the engine shards them
    weights = engines.whole_weights(acc, run.engine, run.policy)
    optimizer_state = engines.optimizer_state(acc, run.engine, run.policy, run.optimizer)
    if acc.is_main_process:
        model = run.unwrapped_model()
        extra = {"global_batch": run.schedule.global_batch, "data": run.train_set.fingerprint()}
        ckpt.save_checkpoint(
            run.output_dir,
            state.step,
            weights=weights,
            optimizer_state=optimizer_state,
            scheduler=run.scheduler,
            trainer_state={**asdict(state), **extra},
            config_yaml=yaml.safe_dump(run.cfg.to_dict(), sort_keys=False),
            peft_model=model if run.cfg.use_peft else None,
        )
        ckpt.rotate_checkpoints(run.output_dir, run.cfg.save_total_limit)
    acc.wait_for_everyone()
    return path


def resume(run: Run, path: Path) -> TrainState:
    acc, engine = run.acc, run.engine
    names = [name for name, _ in engines.trainable_named(acc, run.policy)]
    loaded = ckpt.load_checkpoint(path, trainable=names, scheduler=run.scheduler)
    engines.load_weights(acc, engine, run.policy, loaded.weights)
    engines.load_optimizer_state(acc, engine, run.policy, run.optimizer, loaded.optimizer_state)
    saved = loaded.trainer_state
    if saved.get("global_batch") != run.schedule.global_batch:
        raise UserError(
            f"checkpoint {path} was trained with a global batch of {saved.get('global_batch')} pairs, this run has "
            f"{run.schedule.global_batch} (per_device_train_batch_size x gradient_accumulation_steps x processes); "
            "set them so the product matches"
        )
    if saved.get("data") != run.train_set.fingerprint():
        raise UserError(f"checkpoint {path} was trained on other data than {run.cfg.train_data}; resume with that data")
    if run.acc.is_main_process:
        # steps logged after the checkpoint are run again; their first rows would be duplicates
        metrics = run.output_dir / "metrics.jsonl"
        kept = [line for line in _read_lines(metrics) if json.loads(line)["step"] <= saved["step"]]
        metrics.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    run.console.print(f"resuming from {path} at step {saved['step']}")
    return TrainState(**{k: saved[k] for k in TrainState.__dataclass_fields__ if k in saved})


def finish(run: Run, state: TrainState) -> dict[str, Any]:
    """Save the adapter (or full model) with its tokenizer, and summary.json."""
    acc = run.acc
    rows = [json.loads(line) for line in _read_lines(run.output_dir / "metrics.jsonl")]
    summary = {
        "steps": state.step,
        "epochs": run.schedule.epoch(state.step),
        "runtime_seconds": round(state.runtime, 2),
        "train_pairs_per_second": round(state.pairs / max(state.runtime, 1e-9), 3),
        "train_tokens_per_second": round(state.tokens / max(state.runtime, 1e-9), 1),
        "peak_memory_mb": round(peak_memory_mb(acc.device), 1),
        "skipped_steps": state.skipped_steps,
        "processes": acc.num_processes,
        "global_batch_size": run.schedule.global_batch,
        "train_pairs": len(run.train_set),
        "quantization": quantization.summary(run.cfg, acc.device, run.unwrapped_model()),
        "final": next((r for r in reversed(rows) if "loss" in r), {}),
        "final_eval": next((r for r in reversed(rows) if "eval/loss" in r), {}),
    }
    acc.wait_for_everyone()
    # a sharded model's parameters hold only shards (and DeepSpeed's fp32 masters are in its optimizer): its whole
    # weights are gathered first, by every process
    whole = engines.whole_weights(acc, run.engine, run.policy, run.cfg.use_peft) if run.engine.gathers else None
    if acc.is_main_process:
        target = run.output_dir / ("adapter" if run.cfg.use_peft else "model")
        run.unwrapped_model().save_pretrained(str(target), state_dict=whole, safe_serialization=True)
        run.tokenizer.save_pretrained(str(target))
        # the adapter carries its base and every setting it was trained with, so eval, compare, vibe, generate and
        # merge read them even after it is moved out of the run folder
        provenance = {"base_model": run.cfg.model_name_or_path, "stage": "dpo", "quantization": summary["quantization"]}
        write_json(target / PROVENANCE_FILE, {**provenance, "settings": run.cfg.to_dict()})
        summary["output"] = str(target)
        write_json(run.output_dir / "summary.json", summary)
        run.console.print(
            f"done: {state.step} steps in {state.runtime:.0f}s ({summary['train_pairs_per_second']} pairs/s), "
            f"saved {target}"
        )
    acc.wait_for_everyone()
    return summary


# --- set-up pieces ------------------------------------------------------------------------------------------------


def load_split(cfg: DPOConfig, tokenizer: Any, which: str, console: Any) -> tuple[EncodedDataset, dict[str, Any]]:
    """Pairs of `train_data` or `eval_data`, tokenized and fitted to the length limits, with what happened to them."""
    source = cfg.train_data if which == "train" else cfg.eval_data
    if source is None:
        raise UserError(
            "config key `train_data` is not set: name a file of preference pairs, e.g. train_data=pairs.jsonl"
        )
    loaded = load_pairs(
        source,
        split=cfg.train_split if which == "train" else cfg.eval_split,
        data_config=cfg.train_data_config if which == "train" else cfg.eval_data_config,
        data_format=cfg.data_format,
        options=Options(multi_turn=cfg.multi_turn, min_score_margin=cfg.min_score_margin, columns=cfg.columns),
        max_bad_rows=cfg.max_bad_rows,
        rejected_dir=cfg.output_dir,
    )
    loaded, encoding = encode_loaded(
        tokenizer,
        loaded,
        system_message=cfg.system_message,
        max_bad_rows=cfg.max_bad_rows,
        rejected_dir=cfg.output_dir,
    )
    encoded = encoding.encoded
    limits = dict(
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        truncation_mode=cfg.truncation_mode,
        length_policy=cfg.length_policy,
    )
    data = apply_length_policy(encoded, [p.origin for p in loaded.pairs], **limits)
    if not data.pairs:
        raise UserError(f"{source}: every pair is over the length limits ({data.counts}); raise max_length")
    effects = "".join(f"; {n} {what}" for what, n in data.counts.items() if n)
    console.print(f"{which} data: {len(data)} pairs to train on{effects}")
    markers = template_markers(tokenizer)  # prompts rendered with a template already get a warning
    stats = dataset_stats(loaded, encoded, tokenizer_name=cfg.model_name_or_path, markers=markers, **limits)
    for warning in stats["warnings"] + encoding.warnings():
        console.print(f"{which} data warning: {warning}")
    return data, stats


def precision(cfg: DPOConfig) -> str:
    """accelerate's mixed precision: bf16 autocast when asked, or by default where the hardware runs it fast."""
    if cfg.bf16 is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return "bf16" if devices.bf16_is_fast(device) else "no"
    return "bf16" if cfg.bf16 else "no"


def make_optimizer(cfg: DPOConfig, model: Any) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    return torch.optim.AdamW(trainable, cfg.learning_rate, betas, cfg.adam_epsilon, cfg.weight_decay)


def make_scheduler(cfg: DPOConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    from transformers import get_scheduler

    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)
    return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def _read_lines(path: Path) -> list[str]:
    """The rows of metrics.jsonl as text. A row cut short by a kill is dropped: its step is logged again on resume."""
    from dpokit.jsonl import read_jsonl

    found = read_jsonl(path, tail="drop")
    found.require_clean(path, "a metrics row", "remove that line, or start the run again in a new output_dir")
    return found.lines


def print_header(run: Run, model: Any) -> None:
    """The resolved hyperparameters that matter most and the trainable-parameter count, before the first step."""
    cfg, acc, schedule = run.cfg, run.acc, run.schedule
    trainable, total = count_parameters(model)
    method = f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha}" if cfg.use_peft else "full fine-tuning"
    run.console.print(
        f"model {cfg.model_name_or_path}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%), {method}; precision {acc.mixed_precision}, device {acc.device}"
    )
    run.console.print(quantization.weight_memory(model).line(quantization.for_run(cfg, acc.device)))
    run.console.print(
        f"{schedule.total_steps} steps x {schedule.global_batch} pairs ({cfg.per_device_train_batch_size} per device "
        f"x {cfg.gradient_accumulation_steps} accumulation x {acc.num_processes} processes); "
        f"loss {'+'.join(cfg.loss_type)}, beta {cfg.beta}, learning rate {cfg.learning_rate} "
        f"({cfg.lr_scheduler_type}); config: {run.output_dir / 'config.yaml'}"
    )
