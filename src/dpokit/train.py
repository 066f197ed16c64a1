"""The DPO training recipe: config in, aligned adapter (or model) out.

Reads top to bottom: set up the output folder and accelerate, load and check the data (before any model, so a
bad row fails in seconds), load the policy and wrap it with LoRA, get the reference log-probs, then run the
optimizer steps with logging, evaluation and checkpoints, and save the result.

The data order is a pure function of (seed, step): step s of an epoch takes the s-th slice of a seeded
permutation. A resumed run therefore continues exactly where it stopped, and a run on a different number of
processes sees the same global batches. Every process takes an equal share of each global batch; the loss is
the mean over the global batch whatever the split into processes and accumulation steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from dpokit import checkpoint as ckpt
from dpokit.config import DPOConfig, load_config
from dpokit.data.collate import Batch, collate
from dpokit.data.encode import EncodedDataset, apply_length_policy, encode_pairs
from dpokit.data.formats import Options
from dpokit.data.load import load_pairs
from dpokit.errors import RunStopped, UserError
from dpokit.logprobs import SequenceLogps
from dpokit.losses import REFERENCE_FREE, preference_loss, rpo_nll
from dpokit.models import (
    add_lora,
    bf16_is_fast,
    cache_dir,
    count_parameters,
    disable_dropout,
    is_builtin,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from dpokit.reference import (
    LiveReference,
    NoReference,
    PrecomputedReference,
    Reference,
    adapter_off_reference,
    cache_path,
    compute_reference_table,
    frozen_copy_reference,
    load_table,
    model_fingerprint,
    save_table,
)

log = logging.getLogger("dpokit")

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "data_stats.json", "checkpoints", "adapter", "model")
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
    from dpokit.cli import split_settings

    path, overrides = split_settings(args.settings)
    train(load_config(path, overrides))
    return 0


# --- data order -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """Which pairs each optimizer step trains on."""

    num_pairs: int
    global_batch: int
    seed: int
    total_steps: int

    @classmethod
    def from_config(cls, cfg: DPOConfig, num_pairs: int, world_size: int) -> Schedule:
        global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size
        per_epoch = math.ceil(num_pairs / global_batch)
        total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * per_epoch))
        return cls(num_pairs, global_batch, cfg.seed, total)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_pairs / self.global_batch)

    def epoch(self, step: int) -> float:
        """Epochs completed after `step` optimizer steps."""
        return step / self.steps_per_epoch

    def indices(self, step: int) -> list[int]:
        """Pair indices of optimizer step `step` (0-based); the last step of an epoch may be smaller."""
        epoch, within = divmod(step, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_pairs, generator=generator)
        return order[within * self.global_batch : (within + 1) * self.global_batch].tolist()


def shard(indices: list[int], rank: int, world_size: int) -> tuple[list[int], list[float]]:
    """This process's equal share of a global batch, padded with zero-weight repeats when it does not divide."""
    per_process = math.ceil(len(indices) / world_size)
    mine = indices[rank * per_process : (rank + 1) * per_process]
    weights = [1.0] * len(mine)
    while len(mine) < per_process:  # every process must run the same number of forward/backward passes
        mine.append(indices[0])
        weights.append(0.0)
    return mine, weights


def micro_batches(
    indices: list[int], weights: list[float], size: int, data: EncodedDataset, group_by_length: bool
) -> list[tuple[list[int], list[float]]]:
    """Split a process's share into forward passes; grouping by length changes padding, not the step's gradient."""
    order = list(range(len(indices)))
    if group_by_length:
        order.sort(key=lambda i: -data.pairs[indices[i]].num_tokens)
    return [
        ([indices[i] for i in order[s : s + size]], [weights[i] for i in order[s : s + size]])
        for s in range(0, len(order), size)
    ]


# --- metrics ----------------------------------------------------------------------------------------------------


@dataclass
class MetricWindow:
    """Pair-weighted sums of the metrics since the last log line; summed over processes when read."""

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(METRICS, 0.0))
    pairs: float = 0.0

    def add(self, values: dict[str, torch.Tensor], weights: torch.Tensor) -> None:
        for key, value in values.items():
            self.sums[key] += float((value.detach().float() * weights).sum())
        self.pairs += float(weights.sum())

    def means(self, reduce: Any) -> dict[str, float]:
        totals = reduce(torch.tensor([self.pairs, *self.sums.values()], dtype=torch.float64))
        pairs = max(float(totals[0]), 1.0)
        return {key: float(total) / pairs for key, total in zip(self.sums, totals[1:], strict=True)}


def pair_metrics(
    losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, logps: Any
) -> dict[str, torch.Tensor]:
    """Per-pair values of TRL's metrics, averaged later; `.item()` happens only when logging."""
    return {
        "loss": losses,
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": logps.chosen,
        "logps/rejected": logps.rejected,
    }


# --- the run ----------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything the step loop needs, built once by `train`."""

    cfg: DPOConfig
    accelerator: Any
    policy: Any  # SequenceLogps, possibly wrapped by DDP/FSDP
    peft: bool
    optimizer: torch.optim.Optimizer
    scheduler: Any
    reference: Reference
    eval_reference: Reference | None
    train_set: EncodedDataset
    eval_set: EncodedDataset | None
    schedule: Schedule
    pad_token_id: int
    output_dir: Path
    tokenizer: Any
    config_yaml: str

    def batch(self, data: EncodedDataset, indices: Sequence[int]) -> Batch:
        pairs = [data.pairs[i] for i in indices]
        layout = dict(padding_free=self.cfg.padding_free, prefix_sharing=self.cfg.prefix_sharing)
        return collate(pairs, self.pad_token_id, **layout).to(self.accelerator.device)

    def unwrapped(self) -> SequenceLogps:
        return self.accelerator.unwrap_model(self.policy)


def loss_and_metrics(
    run: Run, logps: Any, ref: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    cfg = run.cfg
    losses, chosen_rewards, rejected_rewards = preference_loss(
        cfg.loss_type,
        logps.chosen,
        logps.rejected,
        ref[0],
        ref[1],
        beta=cfg.beta,
        chosen_lengths=logps.chosen_lengths,
        rejected_lengths=logps.rejected_lengths,
        label_smoothing=cfg.label_smoothing,
        simpo_gamma=cfg.simpo_gamma,
    )
    if cfg.rpo_alpha is not None:
        losses = losses + cfg.rpo_alpha * rpo_nll(logps.chosen, logps.chosen_lengths)
    return losses, pair_metrics(losses, chosen_rewards, rejected_rewards, logps)


def train_step(run: Run, step: int, window: MetricWindow) -> dict[str, float]:
    """One optimizer step over global batch `step`; returns its grad norm, loss, pairs and tokens."""
    acc = run.accelerator
    indices = run.schedule.indices(step)
    mine, weights = shard(indices, acc.process_index, acc.num_processes)
    passes = micro_batches(mine, weights, run.cfg.per_device_train_batch_size, run.train_set, run.cfg.group_by_length)
    # mean over the global batch: DDP averages over processes, hence the factor num_processes
    scale = acc.num_processes / len(indices)
    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens = 0
    for k, (idx, w) in enumerate(passes):
        batch = run.batch(run.train_set, idx)
        w_t = torch.tensor(w, device=acc.device)
        sync = k == len(passes) - 1  # gradients are all-reduced once per step, on the last pass
        with nullcontext() if sync else acc.no_sync(run.policy):
            logps = run.policy(batch)
            losses, values = loss_and_metrics(run, logps, run.reference.logps(batch, idx))
            acc.backward((losses * w_t).sum() * scale)
        window.add(values, w_t)
        loss_sum += float((losses.detach() * w_t).sum())
        tokens += batch.num_tokens
    params = [p for p in run.policy.parameters() if p.requires_grad]
    grad_norm = acc.clip_grad_norm_(params, run.cfg.max_grad_norm if run.cfg.max_grad_norm > 0 else math.inf)
    totals = acc.reduce(torch.tensor([float(loss_sum), float(sum(weights)), float(tokens)], device=acc.device), "sum")
    return {
        "grad_norm": float(grad_norm),
        "loss": float(totals[0] / max(float(totals[1]), 1.0)),
        "pairs": float(totals[1]),
        "tokens": float(totals[2]),
    }


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """Loss and reward metrics on every eval pair, sharded over processes."""
    assert run.eval_set is not None and run.eval_reference is not None
    acc = run.accelerator
    policy = run.unwrapped()
    policy.eval()
    window = MetricWindow()
    everything = list(range(len(run.eval_set)))
    mine, weights = shard(everything, acc.process_index, acc.num_processes)
    for idx, w in micro_batches(mine, weights, run.cfg.per_device_eval_batch_size, run.eval_set, True):
        batch = run.batch(run.eval_set, idx)
        with acc.autocast():
            logps = policy(batch)
        _, values = loss_and_metrics(run, logps, run.eval_reference.logps(batch, idx))
        window.add(values, torch.tensor(w, device=acc.device))
    policy.train()
    return {f"eval/{k}": v for k, v in window.means(lambda t: acc.reduce(t.to(acc.device), "sum").cpu()).items()}


def train(cfg: DPOConfig) -> dict[str, Any]:
    """Run DPO as configured; returns the summary also written to `summary.json`."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    # a second train() in the same process (a notebook, the tests) may ask for another precision
    AcceleratorState._reset_state()
    acc = Accelerator(mixed_precision=_precision(cfg), log_with="tensorboard", project_dir=cfg.output_dir)
    out = Path(cfg.output_dir)
    resume_from = prepare_output_dir(cfg, acc)
    set_seed(cfg.seed)
    console = _console(acc)

    # Data first: a bad row must fail in seconds, before a model is loaded.
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.chat_template, cfg.trust_remote_code)
    train_set, train_stats = load_split(cfg, tokenizer, "train", out, console)
    eval_set, eval_stats = load_split(cfg, tokenizer, "eval", out, console) if cfg.eval_data else (None, None)

    model = load_model(
        cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation
    )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if cfg.use_peft:
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules, cfg.seed)
    if cfg.disable_dropout:
        disable_dropout(model)
    model.to(acc.device)
    model.train()
    policy = SequenceLogps(model, cfg.logits_chunk_size)

    schedule = Schedule.from_config(cfg, len(train_set), acc.num_processes)
    pad_id = tokenizer.pad_token_id
    live = live_reference(cfg, policy, acc)
    reference = build_reference(cfg, acc, policy, live, train_set, pad_id, console)
    eval_reference = build_reference(cfg, acc, policy, live, eval_set, pad_id, console) if eval_set else None
    del live  # a frozen copy stays alive only inside the references that run it

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )
    scheduler = _scheduler(cfg, optimizer, schedule.total_steps)
    policy, optimizer, scheduler = acc.prepare(policy, optimizer, scheduler)
    config_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    run_ = Run(
        cfg,
        acc,
        policy,
        cfg.use_peft,
        optimizer,
        scheduler,
        reference,
        eval_reference,
        train_set,
        eval_set,
        schedule,
        pad_id,
        out,
        tokenizer,
        config_yaml,
    )

    state = {
        "step": 0,
        "skipped_steps": 0,
        "nonfinite_in_a_row": 0,
        "runtime": 0.0,
        "pairs": 0.0,
        "tokens": 0.0,
        "window": None,
    }
    if resume_from is not None:
        state = resume(run_, resume_from, console)
    if acc.is_main_process:
        (out / "config.yaml").write_text(config_yaml, encoding="utf-8")
        _write_json(out / "data_stats.json", {"train": train_stats, "eval": eval_stats})
        _print_header(console, cfg, acc, model, train_set, eval_set, schedule)
    acc.init_trackers("tensorboard")
    summary = loop(run_, state, console)
    acc.end_training()
    return summary


def loop(run: Run, state: dict[str, Any], console: Any) -> dict[str, Any]:
    """Optimizer steps from `state["step"]` to the end, with logging, evaluation, checkpoints and stops."""
    cfg, acc, schedule = run.cfg, run.accelerator, run.schedule
    window = MetricWindow(**state["window"]) if state.get("window") else MetricWindow()
    last_train: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    with _stop_signals() as stop, _progress(console, acc, schedule.total_steps, state["step"]) as progress:
        while state["step"] < schedule.total_steps:
            started = time.perf_counter()
            stats = train_step(run, state["step"], window)
            finite = math.isfinite(stats["grad_norm"]) and math.isfinite(stats["loss"])
            if finite:
                run.optimizer.step()
                state["nonfinite_in_a_row"] = 0
            else:  # a NaN or inf never reaches the weights
                state["skipped_steps"] += 1
                state["nonfinite_in_a_row"] += 1
            run.optimizer.zero_grad(set_to_none=True)
            lr = run.scheduler.get_last_lr()[0]
            run.scheduler.step()
            state["step"] += 1
            step = state["step"]
            state["runtime"] += time.perf_counter() - started
            state["pairs"] += stats["pairs"]
            state["tokens"] += stats["tokens"]
            progress(step, state["pairs"] / max(state["runtime"], 1e-9))
            if not finite:
                console.print(
                    f"step {step}: loss or gradient is not finite; step skipped "
                    f"({state['nonfinite_in_a_row']} in a row)"
                )
            if step % cfg.logging_steps == 0 or step == schedule.total_steps:
                last_train = window.means(lambda t: acc.reduce(t.to(acc.device), "sum").cpu())
                row = {
                    "step": step,
                    "epoch": round(schedule.epoch(step), 4),
                    **last_train,
                    "learning_rate": lr,
                    "grad_norm": stats["grad_norm"],
                }
                log_row(run, row, console)
                window = MetricWindow()
            if run.eval_set is not None and (
                (cfg.eval_steps and step % cfg.eval_steps == 0) or step == schedule.total_steps
            ):
                last_eval = evaluate(run)
                log_row(run, {"step": step, "epoch": round(schedule.epoch(step), 4), **last_eval}, console)
            state["window"] = {"sums": window.sums, "pairs": window.pairs}
            if state["nonfinite_in_a_row"] > cfg.max_nonfinite_steps:
                path = save(run, state)
                raise RunStopped(
                    f"training stopped: the loss or gradient was NaN/inf for {state['nonfinite_in_a_row']} steps in a "
                    f"row (up to step {step}); the weights are the last good ones, saved in {path}; lower "
                    "learning_rate or check the data, then resume with resume=true"
                )
            if cfg.save_steps and step % cfg.save_steps == 0 and step < schedule.total_steps:
                save(run, state)
            if _stop_requested(acc, stop):
                path = save(run, state)
                raise RunStopped(
                    f"stopped by {stop['signal']} after step {step}; checkpoint saved in {path}; continue with "
                    f"`dpokit train ... resume=true`",
                    exit_code=128 + int(stop["signum"]),
                )
    return finish(run, state, last_train, last_eval, console)


def log_row(run: Run, row: dict[str, Any], console: Any) -> None:
    """One JSON line in metrics.jsonl, TensorBoard scalars, and one compact console line (main process only)."""
    acc = run.accelerator
    acc.log({k: v for k, v in row.items() if k not in ("step",)}, step=row["step"])
    if not acc.is_main_process:
        return
    with (run.output_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    prefix = "eval/" if any(k.startswith("eval/") for k in row) else ""
    parts = [f"step {row['step']}/{run.schedule.total_steps}", "eval" if prefix else ""]
    for key, label, fmt in (
        ("loss", "loss", ".4f"),
        ("rewards/accuracies", "acc", ".2f"),
        ("rewards/margins", "margin", ".3f"),
        ("rewards/chosen", "chosen", ".3f"),
        ("rewards/rejected", "rejected", ".3f"),
    ):
        if prefix + key in row:
            parts.append(f"{label} {row[prefix + key]:{fmt}}")
    if "learning_rate" in row:
        parts += [f"lr {row['learning_rate']:.2e}", f"|g| {row['grad_norm']:.3f}"]
    console.print("  ".join(p for p in parts if p))


def save(run: Run, state: dict[str, Any]) -> Path:
    """A checkpoint of the current state (main process writes; every process waits for it)."""
    acc = run.accelerator
    path = run.output_dir / ckpt.CHECKPOINTS / f"step-{state['step']}"
    acc.wait_for_everyone()
    if acc.is_main_process:
        unwrapped = run.unwrapped().model
        trainer_state = {**state, "global_batch": run.schedule.global_batch, "data": run.train_set.fingerprint()}
        path = ckpt.save_checkpoint(
            run.output_dir,
            state["step"],
            model=unwrapped,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            trainer_state=trainer_state,
            config_yaml=run.config_yaml,
            peft_model=unwrapped if run.peft else None,
        )
        ckpt.rotate_checkpoints(run.output_dir, run.cfg.save_total_limit)
    acc.wait_for_everyone()
    return path


def resume(run: Run, path: Path, console: Any) -> dict[str, Any]:
    state = ckpt.load_checkpoint(path, model=run.unwrapped().model, optimizer=run.optimizer, scheduler=run.scheduler)
    if state.get("global_batch") != run.schedule.global_batch:
        raise UserError(
            f"checkpoint {path} was trained with a global batch of {state.get('global_batch')} pairs, this run has "
            f"{run.schedule.global_batch} (per_device_train_batch_size x gradient_accumulation_steps x processes); "
            "set them so the product matches"
        )
    if state.get("data") != run.train_set.fingerprint():
        raise UserError(
            f"checkpoint {path} was trained on other data than train_data={run.cfg.train_data}; "
            "resume with the same data"
        )
    console.print(f"resuming from {path} at step {state['step']}")
    return state


def finish(
    run: Run, state: dict[str, Any], last_train: dict[str, float], last_eval: dict[str, float], console: Any
) -> dict[str, Any]:
    """Save the adapter (or full model) with the tokenizer, and summary.json."""
    acc = run.accelerator
    acc.wait_for_everyone()
    summary = {
        "steps": state["step"],
        "epochs": round(run.schedule.epoch(state["step"]), 4),
        "runtime_seconds": round(state["runtime"], 2),
        "train_pairs_per_second": round(state["pairs"] / max(state["runtime"], 1e-9), 3),
        "train_tokens_per_second": round(state["tokens"] / max(state["runtime"], 1e-9), 1),
        "peak_memory_mb": round(_peak_memory_mb(acc.device), 1),
        "skipped_steps": state["skipped_steps"],
        "processes": acc.num_processes,
        "global_batch_size": run.schedule.global_batch,
        "train_pairs": len(run.train_set),
        "final": last_train,
        "final_eval": last_eval,
    }
    if acc.is_main_process:
        model = run.unwrapped().model
        target = run.output_dir / ("adapter" if run.peft else "model")
        model.save_pretrained(str(target), safe_serialization=True)
        run.tokenizer.save_pretrained(str(target))
        _write_json(
            target / "dpokit.json",
            {"base_model": run.cfg.model_name_or_path, "loss_type": run.cfg.loss_type, "beta": run.cfg.beta},
        )
        summary["output"] = str(target)
        _write_json(run.output_dir / "summary.json", summary)
        console.print(
            f"done: {summary['steps']} steps in {summary['runtime_seconds']:.0f}s "
            f"({summary['train_pairs_per_second']:.2f} pairs/s); saved {target}"
        )
    acc.wait_for_everyone()
    return summary


# --- set-up pieces ------------------------------------------------------------------------------------------------


def prepare_output_dir(cfg: DPOConfig, acc: Any) -> Path | None:
    """Check the output folder before anything expensive; returns the checkpoint to resume from, if any."""
    out = Path(cfg.output_dir)
    existing = [name for name in RUN_FILES if (out / name).exists()]
    resume_from: Path | None = None
    if cfg.resume_from:
        resume_from = Path(cfg.resume_from)
        if not ckpt.is_complete(resume_from):
            raise UserError(f"resume_from={cfg.resume_from} is not a complete checkpoint folder (checkpoints/step-N)")
    elif cfg.resume:
        resume_from = ckpt.latest_checkpoint(out)
        if resume_from is None:
            raise UserError(f"resume=true but {out}/checkpoints holds no complete checkpoint; start without resume")
    elif existing and not cfg.overwrite_output_dir:
        raise UserError(
            f"output_dir {out} holds another run ({', '.join(existing)}); continue it with resume=true, replace it "
            "with overwrite_output_dir=true, or choose another output_dir"
        )
    if acc.is_main_process:
        _write_probe(out)
        if cfg.overwrite_output_dir:
            for name in existing:
                target = out / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        ckpt.clean_incomplete(out)
    acc.wait_for_everyone()
    return resume_from


def _write_probe(out: Path) -> None:
    """Fail now, not after an hour, if nothing can be written to the output folder."""
    probe = out / ".write-probe"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output_dir {out} is not writable ({e.strerror}); choose another folder") from None


def load_split(
    cfg: DPOConfig, tokenizer: Any, which: str, out: Path, console: Any
) -> tuple[EncodedDataset, dict[str, Any]]:
    """Pairs of `train_data` or `eval_data`, tokenized and cut to the length limits, with what happened to them."""
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
        rejected_dir=out,
    )
    encoded = encode_pairs(tokenizer, loaded.pairs)
    data = apply_length_policy(
        encoded,
        [p.origin for p in loaded.pairs],
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        truncation_mode=cfg.truncation_mode,
        length_policy=cfg.length_policy,
    )
    if not data.pairs:
        raise UserError(f"{source}: every pair is over the length limits ({data.counts}); raise max_length")
    counts = {**loaded.counts, **data.counts, "bad rows": len(loaded.bad_rows)}
    notes = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    console.print(
        f"{which} data: {source} ({loaded.format} format), {len(data)} pairs" + (f"; {notes}" if notes else "")
    )
    stats = {
        "source": source,
        "format": loaded.format,
        "pairs": len(data),
        "counts": counts,
        "tokens": _length_stats(data),
    }
    return data, stats


def _length_stats(data: EncodedDataset) -> dict[str, dict[str, float]]:
    result = {}
    for part in ("prompt", "chosen", "rejected"):
        lengths = torch.tensor([len(getattr(p, f"{part}_ids")) for p in data.pairs], dtype=torch.float32)
        q = torch.quantile(lengths, torch.tensor([0.5, 0.9, 0.95, 0.99]))
        result[part] = {
            "p50": float(q[0]),
            "p90": float(q[1]),
            "p95": float(q[2]),
            "p99": float(q[3]),
            "max": float(lengths.max()),
        }
    return result


def live_reference(cfg: DPOConfig, policy: SequenceLogps, acc: Any) -> LiveReference | None:
    """The reference model run during training, if the config needs one at all."""
    if cfg.loss_type in REFERENCE_FREE:
        return None
    if cfg.use_peft:
        return adapter_off_reference(policy, acc.autocast)
    if cfg.precompute_ref_log_probs:
        # before the first step the policy is the reference: no copy needed for the one pass
        return LiveReference(policy, nullcontext, acc.autocast)
    return frozen_copy_reference(policy, acc.autocast)


def build_reference(
    cfg: DPOConfig,
    acc: Any,
    policy: SequenceLogps,
    live: LiveReference | None,
    data: EncodedDataset,
    pad_id: int,
    console: Any,
) -> Reference:
    """The reference log-probs source the config asks for (see reference.py)."""
    if live is None:
        return NoReference()
    if not cfg.precompute_ref_log_probs:
        return live
    settings = {"precision": _precision(cfg), "attn": cfg.attn_implementation}
    model_key = model_fingerprint(resolve_model_path(cfg.model_name_or_path))
    path = cache_path(cache_dir(), model_key, data, settings)
    table = load_table(path, len(data))
    if table is not None:
        console.print(f"reference log-probs: cached ({path})")
        return PrecomputedReference(table)

    def make_batch(indices: list[int]) -> Batch:
        pairs = [data.pairs[i] for i in indices]
        return collate(pairs, pad_id, padding_free=cfg.padding_free, prefix_sharing=cfg.prefix_sharing).to(acc.device)

    batch_size = cfg.precompute_ref_batch_size or 4 * cfg.per_device_eval_batch_size
    with _progress(console, acc, len(data), 0, "reference log-probs", "pairs") as progress:
        done = [0]

        def tick(n: int) -> None:
            done[0] += n * acc.num_processes
            progress(min(done[0], len(data)), None)

        gather = lambda t: acc.gather(t.to(acc.device)).cpu()  # noqa: E731
        table = compute_reference_table(
            live.forward, data, make_batch, batch_size, acc.process_index, acc.num_processes, gather, tick
        )
    if acc.is_main_process:
        save_table(table, path)
    acc.wait_for_everyone()
    return PrecomputedReference(table)


def _precision(cfg: DPOConfig) -> str:
    if cfg.bf16 is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return "bf16" if bf16_is_fast(device) else "no"
    return "bf16" if cfg.bf16 else "no"


def _scheduler(cfg: DPOConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    from transformers import get_scheduler

    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)
    return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


# --- console, progress and signals ---------------------------------------------------------------------------------


class _Quiet:
    """The console of non-main processes: says nothing."""

    def print(self, *args: Any, **kwargs: Any) -> None:
        pass


def _console(acc: Any) -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True) if acc.is_main_process else _Quiet()


@contextmanager
def _progress(
    console: Any, acc: Any, total: int, start: int, label: str = "training", unit: str = "steps"
) -> Iterator[Any]:
    """A progress bar with rate and ETA on the main process; yields `update(done, pairs_per_second)`."""
    if not acc.is_main_process:
        yield lambda done, rate: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(label, total=total, completed=start, rate="")

        def update(done: int, rate: float | None) -> None:
            bar.update(task, completed=done, rate=f"{rate:.2f} pairs/s" if rate else "")

        yield update


@contextmanager
def _stop_signals() -> Iterator[dict[str, Any]]:
    """SIGINT/SIGTERM ask for a clean stop after the current step; a second SIGINT interrupts at once."""
    stop: dict[str, Any] = {"requested": False}
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        stop.update(requested=True, signal=signal.Signals(signum).name, signum=signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    try:
        for s in previous:
            signal.signal(s, handler)
    except ValueError:  # not the main thread (e.g. a notebook worker): no signal handling
        pass
    try:
        yield stop
    finally:
        for s, h in previous.items():
            try:
                signal.signal(s, h)
            except ValueError:
                pass


def _stop_requested(acc: Any, stop: dict[str, Any]) -> bool:
    if acc.num_processes == 1:
        return bool(stop["requested"])
    # every process must stop at the same step, or the others wait forever in the next all-reduce
    flag = acc.reduce(torch.tensor([1.0 if stop["requested"] else 0.0], device=acc.device), "sum")
    if float(flag) > 0 and not stop["requested"]:
        stop.update(requested=True, signal="SIGTERM", signum=signal.SIGTERM)
    return float(flag) > 0


def _print_header(
    console: Any, cfg: DPOConfig, acc: Any, model: Any, train_set: EncodedDataset, eval_set: Any, schedule: Schedule
) -> None:
    trainable, total = count_parameters(model)
    model_name = cfg.model_name_or_path + (" (built-in)" if is_builtin(cfg.model_name_or_path) else "")
    console.print(
        f"model {model_name}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%), "
        f"{'LoRA r=' + str(cfg.lora_r) if cfg.use_peft else 'full fine-tuning'}, precision {_precision(cfg)}, "
        f"device {acc.device}, {acc.num_processes} process(es)"
    )
    console.print(
        f"{len(train_set)} train pairs"
        + (f", {len(eval_set)} eval pairs" if eval_set else "")
        + f"; {schedule.total_steps} steps "
        f"of {schedule.global_batch} pairs ({cfg.per_device_train_batch_size} per device x "
        f"{cfg.gradient_accumulation_steps} "
        f"accumulation x {acc.num_processes} processes); loss {cfg.loss_type}, beta {cfg.beta}, lr {cfg.learning_rate}"
    )
    console.print(f"resolved config: {Path(cfg.output_dir) / 'config.yaml'}")
