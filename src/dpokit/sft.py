"""The SFT recipe: config in, fine-tuned adapter (or model) out; the usual first stage before `dpokit train`.

It runs on DPO's engine and reads top to bottom like `train.py`, sharing its pieces: the accelerate set-up and
policy loading (`startup.py`: LoRA, and whatever `load_policy` adds), the data order (`schedule.py`, a pure
function of seed and step, so resume is exact), per-sequence log-probs through the same layouts (an example is a
pair's chosen side with no rejected one), and the step loop with its logging, checkpoints, clean stops and
trackers (`loop.py`). Only the loss differs: TRL's, the negative log-likelihood of the
trained tokens averaged over every trained token of the optimizer step, however the step is split into processes
and accumulation passes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpokit import quantization, startup, trackers
from dpokit.console import make_console
from dpokit.data.collate import Batch
from dpokit.data.sft import SFTData, collate_examples, load_sft_data, pack_examples
from dpokit.errors import UserError
from dpokit.logprobs import SequenceLogps
from dpokit.loop import MetricWindow, RecipeRun, Steps, TrainState, metric_rows, peak_memory_mb, run_recipe, write_json
from dpokit.models import count_parameters, load_tokenizer
from dpokit.runs import PROVENANCE_FILE
from dpokit.schedule import Schedule, shard
from dpokit.sft_config import SFTConfig, load_sft_config


def run(args: argparse.Namespace) -> int:
    """`dpokit sft [CONFIG.yaml] [key=value ...]`."""
    from dpokit.sft_config import split_settings

    path, overrides = split_settings(args.settings)
    try:
        sft(load_sft_config(path, overrides))
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


# --- data -----------------------------------------------------------------------------------------------------------


@dataclass
class TrainingSet:
    """Examples and the training samples made of them: one example each, or packed rows of several."""

    data: SFTData
    samples: list[list[int]]

    def __len__(self) -> int:
        return len(self.samples)

    def tokens(self, sample: int) -> int:
        return sum(self.data.examples[i].num_tokens for i in self.samples[sample])

    def trained_tokens(self, sample: int) -> int:
        return sum(self.data.examples[i].trained_tokens for i in self.samples[sample])

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.data.fingerprint().encode())
        digest.update(json.dumps(self.samples).encode())
        return digest.hexdigest()


def load_split(cfg: SFTConfig, tokenizer: Any, which: str, console: Any) -> tuple[TrainingSet, dict[str, Any]]:
    """`train_data` or `eval_data` as training samples, with its length statistics (printed as warnings too)."""
    source = cfg.train_data if which == "train" else cfg.eval_data
    if source is None:
        raise UserError("config key `train_data` is not set: name a file of SFT examples, e.g. train_data=chat.jsonl")
    split, data_config = (
        (cfg.train_split, cfg.train_data_config) if which == "train" else (cfg.eval_split, cfg.eval_data_config)
    )
    data, stats = load_sft_data(cfg, tokenizer, source, split, data_config)
    if not data.examples:
        raise UserError(f"{source}: no example has a trained token within max_length ({data.counts}); raise max_length")
    samples = pack_examples(data, cfg.max_length) if cfg.packing else [[i] for i in range(len(data))]
    effects = "".join(f"; {n} {what}" for what, n in data.counts.items() if n)
    tokens = stats["tokens"]["total"]
    console.print(
        f"{which} data: {len(data)} examples ({data.layout}) in {len(samples)} samples; tokens p50 {tokens['p50']}, "
        f"p95 {tokens['p95']}, max {tokens['max']}{effects}"
    )
    for warning in stats["warnings"]:
        console.print(f"{which} data warning: {warning}")
    return TrainingSet(data, samples), stats


def passes(
    cfg: SFTConfig, data: TrainingSet, indices: list[int], size: int, rank: int, num_processes: int
) -> list[tuple[list[int], list[float]]]:
    """This process's forward passes (sample indices, weights) over `indices`, similar lengths together."""
    mine, weights = shard(indices, rank, num_processes)
    order = sorted(range(len(mine)), key=lambda i: -data.tokens(mine[i])) if cfg.group_by_length else range(len(mine))
    order = list(order)
    return [
        ([mine[i] for i in order[s : s + size]], [weights[i] for i in order[s : s + size]])
        for s in range(0, len(order), size)
    ]


def make_batch(cfg: SFTConfig, pad_id: int, data: TrainingSet, samples: Sequence[int], device: torch.device) -> Batch:
    examples = [i for s in samples for i in data.samples[s]]
    owner = [k for k, s in enumerate(samples) for _ in data.samples[s]]
    layout = {"padding_free": cfg.padding_free, "one_row": cfg.segment_attention}
    return collate_examples([data.data.examples[i] for i in examples], owner, pad_id, **layout).to(device)


def example_weights(data: TrainingSet, samples: Sequence[int], weights: Sequence[float]) -> list[float]:
    """The weight of each example of `make_batch`'s batch: its sample's."""
    return [w for s, w in zip(samples, weights, strict=True) for _ in data.samples[s]]


# --- the run --------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Run(RecipeRun):
    """Everything the step loop needs, built once by `set_up`: the shared run, over SFT examples."""

    cfg: SFTConfig
    train_set: TrainingSet
    eval_set: TrainingSet | None

    def batch(self, data: TrainingSet, samples: Sequence[int]) -> Batch:
        return make_batch(self.cfg, self.tokenizer.pad_token_id, data, samples, self.acc.device)


def sft(cfg: SFTConfig) -> dict[str, Any]:
    """Run SFT as configured; returns the summary also written to `summary.json`."""
    run, resume_from, data_stats = set_up(cfg)
    steps = Steps(
        label="fine-tuning",
        step=lambda step, window: sft_step(run, step, window),
        new_window=new_window,
        evaluate=(lambda: evaluate(run)) if run.eval_set is not None else None,
        console_line=lambda row: console_line(run, row),
        speed=lambda state: f"{state.tokens / state.runtime:.0f} tokens/s",
    )
    return finish(run, run_recipe(run, resume_from, data_stats, steps, header=lambda: print_header(run)))


def set_up(cfg: SFTConfig) -> tuple[Run, Path | None, dict[str, Any]]:
    """The run: engine, output folder, data, policy and optimizer; the checkpoint to resume from."""
    acc, engine, autocast = startup.start(
        cfg,
        step_scheduler_with_optimizer=False,  # one scheduler step per optimizer step, as in train.py
        project_dir=cfg.output_dir,
    )
    if engine.kind not in ("single", "ddp"):
        raise UserError(
            f"dpokit sft runs on one process or under DDP, and this launch asks for {engine.describe(acc)}; "
            "launch it with configs/accelerate/multi-gpu.yaml (DeepSpeed and FSDP2 are for dpokit train)"
        )
    trackers.check_installed(cfg)
    resume_from = startup.prepare_output(cfg, acc)
    console = make_console(acc.is_main_process)
    quant = quantization.start(cfg, acc.device)  # QLoRA as in train: a broken bitsandbytes install fails here

    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.chat_template, cfg.trust_remote_code)
    train_set, train_stats = load_split(cfg, tokenizer, "train", console)
    eval_set, eval_stats = load_split(cfg, tokenizer, "eval", console) if cfg.eval_data else (None, None)

    model = startup.load_policy(cfg, acc.device, quant)
    policy = SequenceLogps(model, cfg.logits_chunk_size)
    schedule = Schedule.from_config(cfg, len(train_set), acc.num_processes)
    optimizer = startup.make_optimizer(cfg, model)
    scheduler = startup.make_scheduler(cfg, optimizer, schedule.total_steps)
    policy, optimizer, scheduler = acc.prepare(policy, optimizer, scheduler)
    run = Run(
        cfg=cfg,
        acc=acc,
        engine=engine,
        autocast=autocast,
        precision=startup.precision(cfg),
        policy=policy,
        optimizer=optimizer,
        scheduler=scheduler,
        train_set=train_set,
        eval_set=eval_set,
        schedule=schedule,
        tokenizer=tokenizer,
        console=console,
    )
    return run, resume_from, {"train": train_stats, "eval": eval_stats}


def new_window() -> MetricWindow:
    return MetricWindow(sums={"loss": 0.0})  # `pairs` counts trained tokens here: the loss is a token mean


def sft_step(run: Run, step: int, window: MetricWindow) -> dict[str, float]:
    """Forward and backward over global batch `step`: the summed NLL of its trained tokens over their number."""
    acc, cfg, data = run.acc, run.cfg, run.train_set
    indices = run.schedule.indices(step)
    trained = sum(data.trained_tokens(i) for i in indices)  # of the whole global batch, known without a sync
    scale = acc.num_processes / trained  # DDP averages gradients over processes; the loss is a global token mean
    my_passes = passes(cfg, data, indices, cfg.per_device_train_batch_size, acc.process_index, acc.num_processes)
    nll_sum, samples, tokens = 0.0, 0.0, 0
    for k, (idx, w) in enumerate(my_passes):
        batch = run.batch(data, idx)
        w_t = torch.tensor(example_weights(data, idx, w), device=acc.device)
        with nullcontext() if k == len(my_passes) - 1 else acc.no_sync(run.policy):
            with run.autocast():
                logps = run.policy(batch)
            nll = -logps.chosen  # (E,) summed over each example's trained tokens
            acc.backward((nll * w_t).sum() * scale)
        counts = logps.chosen_lengths.to(w_t.dtype)
        window.add({"loss": nll / counts}, counts * w_t)  # token-weighted: the window's mean is a token mean
        nll_sum += float((nll.detach() * w_t).sum())
        samples += sum(w)
        tokens += sum(data.tokens(i) for i, weight in zip(idx, w, strict=True) if weight)
    params = [p for p in run.policy.parameters() if p.requires_grad]
    grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
    local = torch.tensor([nll_sum, samples, tokens], dtype=torch.float64, device=acc.device)
    nll_total, samples, tokens_total = acc.reduce(local, "sum").tolist()
    # `pairs` are samples here, as in `TrainState`
    return {"grad_norm": float(grad_norm), "loss": nll_total / trained, "pairs": samples, "tokens": tokens_total}


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """The token-mean NLL over every eval example, sharded across processes."""
    assert run.eval_set is not None
    acc, data = run.acc, run.eval_set
    policy = acc.unwrap_model(run.policy).eval()
    window = new_window()
    everything = list(range(len(data)))
    for idx, w in passes(
        run.cfg, data, everything, run.cfg.per_device_eval_batch_size, acc.process_index, acc.num_processes
    ):
        with run.autocast():
            logps = policy(run.batch(data, idx))
        counts = logps.chosen_lengths.to(torch.float32)
        window.add(
            {"loss": -logps.chosen / counts}, counts * torch.tensor(example_weights(data, idx, w), device=acc.device)
        )
    policy.train()
    return {f"eval/{key}": value for key, value in window.means(acc).items()}


def console_line(run: Run, row: dict[str, Any]) -> str:
    """One compact line of a metrics row: the step, the (eval) loss, the learning rate."""
    parts = [f"step {row['step']}/{run.schedule.total_steps}"]
    parts += [f"eval loss {row['eval/loss']:.4f}"] if "eval/loss" in row else [f"loss {row['loss']:.4f}"]
    if "learning_rate" in row:
        parts += [f"lr {row['learning_rate']:.2e}", f"grad {row['grad_norm']:.3f}"]
    return "  ".join(parts)


def finish(run: Run, state: TrainState) -> dict[str, Any]:
    """Save the adapter (or full model) with its tokenizer, and summary.json."""
    acc = run.acc
    rows = metric_rows(run.output_dir / "metrics.jsonl")
    summary = {
        "stage": "sft",
        "steps": state.step,
        "epochs": run.schedule.epoch(state.step),
        "runtime_seconds": round(state.runtime, 2),
        "train_samples_per_second": round(state.pairs / max(state.runtime, 1e-9), 3),
        "train_tokens_per_second": round(state.tokens / max(state.runtime, 1e-9), 1),
        "peak_memory_mb": round(peak_memory_mb(acc.device), 1),
        "skipped_steps": state.skipped_steps,
        "processes": acc.num_processes,
        "global_batch_size": run.schedule.global_batch,
        "train_examples": len(run.train_set.data),
        "train_samples": len(run.train_set),
        "final": next((r for r in reversed(rows) if "loss" in r), {}),
        "final_eval": next((r for r in reversed(rows) if "eval/loss" in r), {}),
    }
    acc.wait_for_everyone()
    if acc.is_main_process:
        target = run.output_dir / ("adapter" if run.cfg.use_peft else "model")
        run.unwrapped_model().save_pretrained(str(target), safe_serialization=True)
        run.tokenizer.save_pretrained(str(target))
        write_json(
            target / PROVENANCE_FILE,
            {"base_model": run.cfg.model_name_or_path, "stage": "sft", "settings": run.cfg.to_dict()},
        )
        summary["output"] = str(target)
        write_json(run.output_dir / "summary.json", summary)
        run.console.print(f"done: {state.step} steps in {state.runtime:.0f}s, saved {target}")
    acc.wait_for_everyone()
    return summary


def print_header(run: Run) -> None:
    """The resolved settings that matter most and the trainable-parameter count, before the first step."""
    cfg, acc, schedule = run.cfg, run.acc, run.schedule
    trainable, total = count_parameters(run.unwrapped_model())
    method = f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha}" if cfg.use_peft else "full fine-tuning"
    run.console.print(
        f"model {cfg.model_name_or_path}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%), {method}; precision {run.precision}, device {acc.device}"
    )
    examples = run.train_set.data.examples
    share = sum(ex.trained_tokens for ex in examples) / max(sum(ex.num_tokens for ex in examples), 1)
    run.console.print(
        f"{schedule.total_steps} steps x {schedule.global_batch} samples ({cfg.per_device_train_batch_size} per "
        f"device x {cfg.gradient_accumulation_steps} accumulation x {acc.num_processes} processes); loss on "
        f"{share:.0%} of the tokens, packing {cfg.packing}, learning rate {cfg.learning_rate} "
        f"({cfg.lr_scheduler_type}); config: {run.output_dir / 'config.yaml'}"
    )
