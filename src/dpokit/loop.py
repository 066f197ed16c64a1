"""The optimizer-step loop `train` and `sft` share, and what it leans on: the logging window, checkpoints and
resume, the NaN stop and clean stops on a signal.

A recipe hands the loop its `Steps`: the forward and backward of one global batch, its evaluation and its console
line. Everything after the step (skipping a non-finite one, stepping optimizer and scheduler, logging, evaluation,
the NaN stop, checkpoints, the signal stop) is the same for both, and lives here once.
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from dpokit import checkpoint as ckpt
from dpokit import engines, trackers
from dpokit.console import StopRequest, progress, stop_signals
from dpokit.errors import RunStopped, UserError
from dpokit.schedule import Schedule


@dataclass
class MetricWindow:
    """Weighted sums of the metrics since the last log line (weights: pairs, or tokens for SFT), summed over
    processes when read."""

    sums: dict[str, float] = field(default_factory=dict)
    pairs: float = 0.0
    steps: int = 0  # the same on every process, unlike `pairs`

    def add(self, values: dict[str, torch.Tensor], weights: torch.Tensor) -> None:
        for key, value in values.items():
            value_sum = float((value.detach().float() * weights).sum())  # note: a sync point, once per pass
            self.sums[key] = self.sums.get(key, 0.0) + value_sum
        self.pairs += float(weights.sum())

    def means(self, acc: Any) -> dict[str, float]:
        local = torch.tensor([self.pairs, *self.sums.values()], dtype=torch.float64, device=acc.device)
        totals = acc.reduce(local, "sum").cpu()
        pairs = max(float(totals[0]), 1.0)
        return {key: float(total) / pairs for key, total in zip(self.sums, totals[1:], strict=True)}


@dataclass
class TrainState:
    """What a checkpoint must carry besides weights and optimizer to continue exactly."""

    step: int = 0
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    runtime: float = 0.0
    pairs: float = 0.0  # pairs trained on (samples for SFT)
    tokens: float = 0.0  # prompt + response tokens trained on, the prompt counted once per response (TRL's count)
    window: dict[str, Any] | None = None  # the open logging window


@dataclass(kw_only=True)
class RecipeRun:
    """What a recipe builds once and the loop, `save` and `resume` read: the same for train and sft, whose runs
    add their own (the reference, how a batch is laid out)."""

    cfg: Any  # the recipe's config: DPOConfig or SFTConfig
    acc: Any
    engine: engines.Engine
    autocast: Any  # startup.Autocast: every forward pass runs inside it
    precision: str  # "bf16" or "no"
    policy: Any  # SequenceLogps, wrapped by DDP/FSDP when distributed
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_set: Any  # with a `fingerprint()` of its token ids
    eval_set: Any
    schedule: Schedule
    tokenizer: Any
    console: Any

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    def unwrapped_model(self) -> Any:
        return self.acc.unwrap_model(self.policy).model

    def data_fingerprint(self) -> str:
        return self.train_set.fingerprint()


@dataclass(frozen=True, kw_only=True)
class Steps:
    """A recipe's part of the loop."""

    label: str  # "training", "fine-tuning": the progress bar and the NaN stop say it
    step: Callable[[int, MetricWindow], dict[str, float]]  # global batch `step`: grad_norm, loss, pairs, tokens
    new_window: Callable[[], MetricWindow]
    evaluate: Callable[[], dict[str, float]] | None  # eval/... metrics, or None without eval data
    console_line: Callable[[dict[str, Any]], str]  # one compact line of a metrics row
    speed: Callable[[TrainState], str]  # the progress bar's rate


def run_recipe(
    run: RecipeRun, resume_from: Path | None, data_stats: dict[str, Any], steps: Steps, header: Callable[[], None]
) -> TrainState:
    """Resume or start, save the resolved config and data statistics, print the header, and run every step with
    the trackers open and SIGINT/SIGTERM turned into a clean stop; returns the final state."""
    state = resume(run, resume_from) if resume_from is not None else TrainState()
    if run.acc.is_main_process:
        (run.output_dir / "config.yaml").write_text(yaml.safe_dump(run.cfg.to_dict(), sort_keys=False), "utf-8")
        write_json(run.output_dir / "data_stats.json", data_stats)
        header()
    trackers.start(run.acc, run.cfg)
    try:
        with stop_signals() as stop:
            run_steps(run, state, stop, steps)
    finally:
        trackers.finish(run.acc)
    return state


def run_steps(run: RecipeRun, state: TrainState, stop: StopRequest, steps: Steps) -> None:
    """Optimizer steps from `state.step` to the end, with logging, evaluation, checkpoints and clean stops."""
    window = MetricWindow(**state.window) if state.window else steps.new_window()
    with progress(run.console, run.schedule.total_steps, state.step, steps.label, "steps") as update:
        while state.step < run.schedule.total_steps:
            started = time.perf_counter()
            before = MetricWindow(dict(window.sums), window.pairs, window.steps)
            stats = steps.step(state.step, window)
            if math.isfinite(stats["grad_norm"]) and math.isfinite(stats["loss"]):
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
            update(state.step, steps.speed(state))
            window = after_step(run, state, stop, steps, window, {**stats, "learning_rate": learning_rate})


def after_step(
    run: RecipeRun, state: TrainState, stop: StopRequest, steps: Steps, window: MetricWindow, stats: dict[str, float]
) -> MetricWindow:
    """Logging, evaluation, the NaN stop, checkpoints and the signal stop after optimizer step `state.step`;
    returns the logging window to go on with."""
    cfg, acc, schedule = run.cfg, run.acc, run.schedule
    step, last = state.step, state.step == schedule.total_steps
    if (step % cfg.logging_steps == 0 or last) and window.steps:
        row = {"step": step, "epoch": schedule.epoch(step), **window.means(acc)}
        timing = {"num_tokens": state.tokens, "train_seconds": round(state.runtime, 3)}
        rates = {"learning_rate": stats["learning_rate"], "grad_norm": stats["grad_norm"]}
        log_row(run, {**row, **rates, **timing}, steps.console_line)
        window = steps.new_window()
    if steps.evaluate is not None and ((cfg.eval_steps and step % cfg.eval_steps == 0) or last):
        log_row(run, {"step": step, "epoch": schedule.epoch(step), **steps.evaluate()}, steps.console_line)
    state.window = asdict(window)
    if state.nonfinite_in_a_row > cfg.max_nonfinite_steps:
        path = save(run, state)
        raise RunStopped(
            f"{steps.label} stopped: the loss or gradient was NaN/inf for {state.nonfinite_in_a_row} steps in a "
            f"row (up to step {step}); the last good weights are saved in {path}; lower learning_rate or check the "
            "data, then continue with resume=true"
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
    return window


def stop_everywhere(acc: Any, stop: StopRequest) -> bool:
    """Whether any process was asked to stop: all must stop at the same step, or the others wait forever."""
    if acc.num_processes == 1:
        return stop.requested
    flag = acc.reduce(torch.tensor([float(stop.signum)], device=acc.device), "max")
    if float(flag) > 0 and not stop.requested:
        stop.signum, stop.signal_name = int(flag), "a signal to another process"
    return float(flag) > 0


def log_row(run: RecipeRun, row: dict[str, Any], console_line: Callable[[dict[str, Any]], str]) -> None:
    """A line in metrics.jsonl, the trackers' scalars, and one compact console line; main process only."""
    run.acc.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
    if not run.acc.is_main_process:
        return
    with (run.output_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    run.console.print(console_line(row))


def save(run: RecipeRun, state: TrainState) -> Path:
    """A checkpoint of the current state: the main process writes it, every process waits for it."""
    acc = run.acc
    path = run.output_dir / ckpt.CHECKPOINTS / f"step-{state.step}"
    acc.wait_for_everyone()
    # whole tensors, gathered by every process when the engine shards them
    weights = engines.whole_weights(acc, run.engine, run.policy)
    optimizer_state = engines.optimizer_state(acc, run.engine, run.policy, run.optimizer)
    if acc.is_main_process:
        model = run.unwrapped_model()
        extra = {"global_batch": run.schedule.global_batch, "data": run.data_fingerprint()}
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


def resume(run: RecipeRun, path: Path) -> TrainState:
    """The state saved in checkpoint `path`, with weights, optimizer and scheduler loaded into `run`."""
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
    if saved.get("data") != run.data_fingerprint():
        raise UserError(f"checkpoint {path} was trained on other data than {run.cfg.train_data}; resume with that data")
    if run.acc.is_main_process:
        # steps logged after the checkpoint are run again; their first rows would be duplicates
        metrics = run.output_dir / "metrics.jsonl"
        kept = [line for line in read_lines(metrics) if json.loads(line)["step"] <= saved["step"]]
        metrics.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    run.console.print(f"resuming from {path} at step {saved['step']}")
    return TrainState(**{k: saved[k] for k in TrainState.__dataclass_fields__ if k in saved})


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def read_lines(path: Path) -> list[str]:
    """The rows of metrics.jsonl as text (none before the first). A row cut short by a kill is dropped: its step is
    logged again on resume; a broken row elsewhere is one line naming it."""
    from dpokit.jsonl import read_jsonl

    found = read_jsonl(path, tail="drop")
    found.require_clean(path, "a metrics row", "remove that line, or start the run again in a new output_dir")
    return found.lines


def metric_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl (none when there is no file yet)."""
    return [json.loads(line) for line in read_lines(path)]
