"""The DPO training recipe: config in, aligned adapter (or model) out.

Reads top to bottom: check the output folder, load and check the data (before any model, so a bad row fails in
seconds), load the policy with LoRA, set up the reference (`reference.py` decides which), then run the optimizer
steps (`loop.py`, shared with sft) with logging, evaluation and checkpoints, and save the result.

Which pairs each step trains on is `schedule.py`'s: a pure function of (seed, step), so a resumed run continues
exactly where it stopped and a run on another number of processes sees the same global batches. Each process takes
an equal share of a global batch, and the loss is the mean over the global batch however it is split into
processes and accumulation passes.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpokit import devices, engines, quantization, reference, startup, trackers
from dpokit.config import DPOConfig, load_config
from dpokit.console import make_console
from dpokit.data.collate import Batch
from dpokit.data.encode import EncodedDataset, apply_length_policy, encode_loaded
from dpokit.data.inspection import dataset_stats
from dpokit.data.load import load_pairs, options_of
from dpokit.data.markers import template_markers
from dpokit.errors import UserError
from dpokit.layout import make_batch
from dpokit.logprobs import PairLogps, SequenceLogps
from dpokit.loop import MetricWindow, RecipeRun, Steps, TrainState, metric_rows, peak_memory_mb, run_recipe, write_json
from dpokit.losses import loss_settings, preference_loss
from dpokit.models import count_parameters, load_tokenizer
from dpokit.reference import Reference
from dpokit.runs import PROVENANCE_FILE
from dpokit.schedule import Schedule, eval_passes, train_passes

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


# --- the loss and its metrics -------------------------------------------------------------------------------------


def new_window() -> MetricWindow:
    return MetricWindow(sums=dict.fromkeys(METRICS, 0.0))


def loss_and_metrics(
    cfg: DPOConfig, policy_logps: PairLogps, reference_logps: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses and the per-pair values of TRL's metrics (averaged when logged)."""
    reference_chosen_logps, reference_rejected_logps = reference_logps
    losses, chosen_rewards, rejected_rewards = preference_loss(
        cfg.loss_type,
        policy_logps.chosen,
        policy_logps.rejected,
        reference_chosen_logps,
        reference_rejected_logps,
        chosen_lengths=policy_logps.chosen_lengths,
        rejected_lengths=policy_logps.rejected_lengths,
        **loss_settings(cfg, policy_logps),
    )
    return losses, {
        "loss": losses,
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": policy_logps.chosen,
        "logps/rejected": policy_logps.rejected,
    }


# --- the run ------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Run(RecipeRun):
    """Everything the step loop needs, built once by `set_up`: the shared run, and the references."""

    cfg: DPOConfig
    train_set: EncodedDataset
    eval_set: EncodedDataset | None
    reference: Reference
    eval_reference: Reference | None

    def batch(self, data: EncodedDataset, indices: Sequence[int]) -> Batch:
        return make_batch(self.cfg, self.tokenizer.pad_token_id, data, indices, self.acc.device)


def train(cfg: DPOConfig) -> dict[str, Any]:
    """Run DPO as configured; returns the summary also written to `summary.json`."""
    run, resume_from, data_stats = set_up(cfg)
    steps = Steps(
        label="training",
        step=lambda step, window: train_step(run, step, window),
        new_window=new_window,
        evaluate=(lambda: evaluate(run)) if run.eval_set is not None else None,
        console_line=lambda row: console_line(run, row),
        speed=lambda state: f"{state.pairs / state.runtime:.2f} pairs/s",
    )
    return finish(run, run_recipe(run, resume_from, data_stats, steps, header=lambda: print_header(run)))


def set_up(cfg: DPOConfig) -> tuple[Run, Path | None, dict[str, Any]]:
    """The run: engine, output folder, data, policy, optimizer and reference; the checkpoint to resume from."""
    # the engine the launcher asked for (DDP, DeepSpeed ZeRO, FSDP2), checked before any data or model is touched
    acc, engine, autocast = startup.start(
        cfg,
        # `Schedule` counts global steps: one scheduler step per optimizer step with any number of processes
        # (stepped with the optimizer, accelerate would step it once per process, for per-process data loaders)
        step_scheduler_with_optimizer=False,
        project_dir=cfg.output_dir,
    )
    reference_line = reference.ReferencePlan.from_config(cfg).where(engine)
    devices.prepare(acc.device)
    trackers.check_installed(cfg)
    if not acc.is_main_process:
        logging.getLogger("dpokit").setLevel(logging.WARNING)  # the main process reports for all
    resume_from = startup.prepare_output(cfg, acc)
    console = make_console(acc.is_main_process)
    for line in filter(None, (engine.describe(acc), reference_line)):  # what runs, before anything is loaded
        console.print(line)
    quant = quantization.start(cfg, acc.device)  # a broken bitsandbytes install fails here, in a second

    # Data first: a bad row must fail in seconds, before a model is loaded.
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.chat_template, cfg.trust_remote_code)
    train_set, train_stats = load_split(cfg, tokenizer, "train", console)
    eval_set, eval_stats = load_split(cfg, tokenizer, "eval", console) if cfg.eval_data else (None, None)

    model = startup.load_policy(cfg, acc.device, quant)
    policy = SequenceLogps(model, cfg.logits_chunk_size, cfg.ld_alpha, cfg.use_weighting)
    schedule = Schedule.from_config(cfg, len(train_set), acc.num_processes)
    precision = startup.precision(cfg)
    ref_setup = reference.setup(cfg, policy, acc, autocast, precision, console, tokenizer.pad_token_id)
    optimizer = startup.make_optimizer(cfg, model)
    scheduler = startup.make_scheduler(cfg, optimizer, schedule.total_steps)
    # prepared before the reference pass: under ZeRO-3 and FSDP2 only the prepared model has whole weights to run
    policy_run, optimizer, scheduler = engines.prepare(acc, engine, cfg, policy, optimizer, scheduler)
    engines.shard_reference(acc, engine, ref_setup.module, policy)
    train_reference, eval_reference = ref_setup.build(schedule, train_set, eval_set)
    run = Run(
        cfg=cfg,
        acc=acc,
        engine=engine,
        autocast=autocast,
        precision=precision,
        policy=policy_run,
        optimizer=optimizer,
        scheduler=scheduler,
        reference=train_reference,
        eval_reference=eval_reference,
        train_set=train_set,
        eval_set=eval_set,
        schedule=schedule,
        tokenizer=tokenizer,
        console=console,
    )
    return run, resume_from, {"train": train_stats, "eval": eval_stats}


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
            with run.autocast():
                policy_logps = run.policy(batch)
            losses, values = loss_and_metrics(cfg, policy_logps, run.reference.logps(batch, idx))
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
    window = new_window()
    for idx, w in eval_passes(run.cfg, run.eval_set, acc.process_index, acc.num_processes):
        batch = run.batch(run.eval_set, idx)
        with run.autocast():
            policy_logps = policy(batch)
        _, values = loss_and_metrics(run.cfg, policy_logps, run.eval_reference.logps(batch, idx))
        window.add(values, torch.tensor(w, device=acc.device))
    policy.train()
    return {f"eval/{key}": value for key, value in window.means(acc).items()}


def console_line(run: Run, row: dict[str, Any]) -> str:
    """One compact line of a metrics row: the step, the loss and reward metrics, the learning rate."""
    prefix = "eval/" if "eval/loss" in row else ""
    parts = [f"step {row['step']}/{run.schedule.total_steps}"] + (["eval"] if prefix else [])
    shown = {"loss": "loss", "rewards/accuracies": "acc", "rewards/margins": "margin", "rewards/chosen": "chosen"}
    parts += [f"{label} {float(row[prefix + key]):.4f}" for key, label in shown.items()]
    if "learning_rate" in row:
        parts += [f"lr {row['learning_rate']:.2e}", f"grad {row['grad_norm']:.3f}"]
    return "  ".join(parts)


def finish(run: Run, state: TrainState) -> dict[str, Any]:
    """Save the adapter (or full model) with its tokenizer, and summary.json."""
    acc = run.acc
    rows = metric_rows(run.output_dir / "metrics.jsonl")
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
        options=options_of(cfg),
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


def print_header(run: Run) -> None:
    """The resolved hyperparameters that matter most and the trainable-parameter count, before the first step."""
    cfg, acc, schedule = run.cfg, run.acc, run.schedule
    model = run.unwrapped_model()
    trainable, total = count_parameters(model)
    method = f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha}" if cfg.use_peft else "full fine-tuning"
    run.console.print(
        f"model {cfg.model_name_or_path}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%), {method}; precision {run.precision}, device {acc.device}"
    )
    run.console.print(quantization.weight_memory(model).line(quantization.for_run(cfg, acc.device)))
    run.console.print(
        f"{schedule.total_steps} steps x {schedule.global_batch} pairs ({cfg.per_device_train_batch_size} per device "
        f"x {cfg.gradient_accumulation_steps} accumulation x {acc.num_processes} processes); "
        f"loss {'+'.join(cfg.loss_type)}, beta {cfg.beta}, learning rate {cfg.learning_rate} "
        f"({cfg.lr_scheduler_type}); config: {run.output_dir / 'config.yaml'}"
    )
