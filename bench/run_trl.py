"""One TRL DPOTrainer run, in this process from a cold start, measured; prints one JSON record.

The run is what a TRL user writes: load the JSONL with `datasets`, the model and tokenizer with transformers from
the built-in model's folder, LoRA through `peft_config`, `DPOTrainer(...).train()`, `save_model`. The process
notes its phases without changing what TRL does:

- whole-process wall time, from the process's start (before the imports) to the adapter on disk;
- phase times: imports, model load, tokenization (`_prepare_dataset`), the model hash TRL takes for its reference
  cache, the reference pass (`_precompute_ref_logps`), the rest of the trainer's set-up, training, saving;
- training-loop throughput over steps `warmup+1 .. steps` (timestamps from a `TrainerCallback`), in pairs/s and
  real (unpadded) tokens/s; the rows are read in file order (`train_sampling_strategy="sequential"` on a file
  written in random order), so the pairs of every step are known and counted exactly;
- peak RSS: the kernel's `ru_maxrss` for the process, and a sampler's peak per phase;
- the step-0 loss (the first batch's loss, before any update) unrounded, and TRL's own logged step-1 metrics;
- whether bf16 autocast was really on in the reference pass and in training (a forward hook on one Linear);
- how busy the machine was with other work meanwhile.

    python bench/run_trl.py --data pairs.jsonl --steps 12 --warmup-steps 2 --batch-size 4 --bf16
"""

from __future__ import annotations

import time

PROCESS_START_WALL = time.time()

import argparse  # noqa: E402 - the start time is taken before anything else
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import measure  # noqa: E402
import psutil  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="trl", help="name of this configuration in the results")
    p.add_argument("--data", required=True, help="TRL conversational JSONL (bench/synthetic.py)")
    p.add_argument("--model", default=measure.BUILTIN_MODEL)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4, help="per_device_train_batch_size")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient_accumulation_steps")
    p.add_argument("--steps", type=int, required=True, help="max_steps; the file must hold steps x batch pairs")
    p.add_argument("--warmup-steps", type=int, default=2, help="steps left out of the throughput window")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--precompute-ref", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--precompute-ref-batch-size", type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=5e-6)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output", default=None, help="also write the JSON record here")
    p.add_argument("--keep-dir", default=None, help="keep TRL's output folder here (default: a deleted temp dir)")
    return p.parse_args()


class Phases:
    """Wall time and RSS peak of each named phase, in order."""

    def __init__(self, sampler: measure.RssSampler) -> None:
        self.sampler = sampler
        self.seconds: dict[str, float] = {}

    def wrap(self, owner: Any, attribute: str, phase: str) -> None:
        """Time every call of `owner.attribute` as `phase`, leaving what it does unchanged."""
        original = getattr(owner, attribute)
        phases = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            previous = phases.sampler.phase
            phases.sampler.mark(phase)
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                phases.seconds[phase] = phases.seconds.get(phase, 0.0) + time.perf_counter() - t0
                phases.sampler.mark(previous)

        setattr(owner, attribute, timed)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Time the block as `phase`."""
        self.sampler.mark(phase)
        t0 = time.perf_counter()
        yield
        self.seconds[phase] = time.perf_counter() - t0


def make_callbacks(trainer_callback: type, warmup_steps: int) -> Any:
    class StepClock(trainer_callback):
        """Timestamps of every optimizer step and TRL's logs; the probe hook goes after the first step."""

        def __init__(self) -> None:
            self.step_end: dict[int, float] = {}
            self.logs: dict[int, dict[str, float]] = {}
            self.train_begin = 0.0
            self.on_first_step_end: Any = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.train_begin = time.perf_counter()
            self.step_end[0] = self.train_begin

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.step_end[state.global_step] = time.perf_counter()
            if state.global_step == 1 and self.on_first_step_end is not None:
                self.on_first_step_end()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and state.global_step <= max(warmup_steps, 1):
                self.logs[state.global_step] = {k: v for k, v in logs.items() if isinstance(v, int | float)}

    return StepClock()


class AutocastProbe:
    """Records, per phase, whether CPU autocast was on and the dtype a base Linear layer produced."""

    def __init__(self, module: Any, sampler: measure.RssSampler) -> None:
        import torch

        self.torch = torch
        self.sampler = sampler
        self.seen: dict[str, dict[str, Any]] = {}
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module: Any, inputs: Any, output: Any) -> None:
        phase = self.sampler.phase
        if phase not in self.seen:
            self.seen[phase] = {
                "autocast_enabled": self.torch.is_autocast_enabled("cpu"),
                "autocast_dtype": str(self.torch.get_autocast_dtype("cpu")).removeprefix("torch."),
                "linear_output_dtype": str(output.dtype).removeprefix("torch."),
            }

    def remove(self) -> None:
        self.handle.remove()


def pair_lengths(dataset: Any, max_length: int | None) -> list[measure.PairLengths]:
    """Token counts of every row TRL tokenized, as its collator truncates them (keep_start)."""
    columns = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    return [
        measure.PairLengths(len(row["prompt_ids"]), len(row["chosen_ids"]), len(row["rejected_ids"])).truncated(
            max_length
        )
        for row in columns
    ]


def throughput(
    clock: Any, lengths: list[measure.PairLengths], args: argparse.Namespace, shape: measure.ModelShape
) -> dict[str, Any]:
    """Pairs/s, tokens/s and achieved model GFLOP/s over the steps after the warm-up."""
    pairs_per_step = args.batch_size * args.grad_accum
    last = max(clock.step_end)
    first = min(args.warmup_steps, last - 1)
    seconds = clock.step_end[last] - clock.step_end[first]
    window = lengths[first * pairs_per_step : last * pairs_per_step]
    stats = measure.token_stats(window, args.batch_size)
    flops = measure.training_flops(window, shape, args.lora_r)
    step_times = [clock.step_end[s] - clock.step_end[s - 1] for s in range(1, last + 1)]
    return {
        "steps": last,
        "window_steps": last - first,
        "window_s": round(seconds, 3),
        "pairs_per_s": round(len(window) / seconds, 4),
        "tokens_per_s": round(stats["tokens"] / seconds, 1),
        "window_tokens": stats,
        "step_s": [round(t, 3) for t in step_times],
        "model_flops": flops,
        "achieved_gflops": round(flops / seconds / 1e9, 2),
    }


def trl_settings(args: argparse.Namespace, work: Path, dpo_config: type, lora_config: type) -> tuple[Any, Any]:
    """The `DPOConfig` and `LoraConfig` a TRL user writes for this configuration."""
    config = dpo_config(
        output_dir=str(work / "trl-output"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        beta=args.beta,
        max_length=args.max_length,
        bf16=args.bf16,
        use_cpu=True,  # transformers refuses bf16 on a machine without a GPU unless told it is a CPU run
        gradient_checkpointing=args.gradient_checkpointing,
        precompute_ref_log_probs=args.precompute_ref,
        precompute_ref_batch_size=args.precompute_ref_batch_size,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
        train_sampling_strategy="sequential",
    )
    peft_config = lora_config(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )
    return config, peft_config


def record_step0_losses(trainer: Any) -> list[float]:
    """The list that every training-mode `compute_loss` of step 0 (before any update) appends its loss to."""
    step0_losses: list[float] = []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(*a: Any, **kw: Any) -> Any:
        out = compute_loss(*a, **kw)
        if trainer.model.training and trainer.state.global_step == 0:
            step0_losses.append((out[0] if isinstance(out, tuple) else out).item())
        return out

    trainer.compute_loss = recording_compute_loss
    return step0_losses


def reference_pass(
    args: argparse.Namespace, lengths: list[measure.PairLengths], shape: measure.ModelShape, seconds: float
) -> dict[str, Any]:
    """Throughput of TRL's precomputed reference pass over the whole data set."""
    batch_size = args.precompute_ref_batch_size or args.batch_size
    return {
        "batch_size": batch_size,
        "pairs_per_s": round(len(lengths) / seconds, 3),
        "tokens_per_s": round(measure.token_stats(lengths, args.batch_size)["tokens"] / seconds, 1),
        "padded_tokens": measure.token_stats(lengths, batch_size)["padded_tokens"],
        "achieved_gflops": round(
            measure.training_flops(lengths, shape, args.lora_r, backward=False) / seconds / 1e9, 2
        ),
    }


def run(args: argparse.Namespace, sampler: measure.RssSampler, phases: Phases, work: Path) -> dict[str, Any]:
    with phases.timed("imports"):
        import datasets
        import torch
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import DPOConfig, DPOTrainer
        from trl.trainer import dpo_trainer

        from dpokit.models import resolve_model_path

        datasets.disable_progress_bars()

    with phases.timed("load"):
        model_dir = resolve_model_path(args.model)
        train_dataset = datasets.load_dataset("json", data_files=args.data, split="train")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    probe = AutocastProbe(model.model.layers[0].mlp.down_proj, sampler)

    phases.wrap(DPOTrainer, "_prepare_dataset", "tokenize")
    phases.wrap(dpo_trainer, "hash_module", "model_hash")
    phases.wrap(DPOTrainer, "_precompute_ref_logps", "reference_pass")
    config, peft_config = trl_settings(args, work, DPOConfig, LoraConfig)
    clock = make_callbacks(TrainerCallback, args.warmup_steps)
    clock.on_first_step_end = probe.remove
    sampler.mark("trainer_init")
    t0 = time.perf_counter()
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[clock],
    )
    init_seconds = time.perf_counter() - t0
    wrapped = ("tokenize", "model_hash", "reference_pass")
    phases.seconds["trainer_init_other"] = init_seconds - sum(phases.seconds.get(k, 0.0) for k in wrapped)
    step0_losses = record_step0_losses(trainer)

    with phases.timed("train"):
        trainer.train()
    adapter_dir = work / "adapter"
    with phases.timed("save"):
        trainer.save_model(str(adapter_dir))
    saved_at = time.time()
    sampler.mark("after")

    # Everything below reads what the run produced; none of it is timed.
    record: dict[str, Any] = {
        "wall_time_s": round(saved_at - psutil.Process().create_time(), 3),
        "wall_time_from_script_s": round(saved_at - PROCESS_START_WALL, 3),
        "phases_s": {k: round(v, 3) for k, v in phases.seconds.items()},
        "adapter_files": sorted(p.name for p in adapter_dir.iterdir()),
    }
    lengths = pair_lengths(trainer.train_dataset, args.max_length)
    shape = measure.ModelShape.from_config(measure.read_model_config(model_dir))
    record["data_tokens"] = measure.token_stats(lengths, args.batch_size)
    if args.precompute_ref:
        record["reference_pass"] = reference_pass(args, lengths, shape, phases.seconds["reference_pass"])
    record["train_loop"] = throughput(clock, lengths, args, shape)
    logged = clock.logs.get(1, {})
    record["step0"] = {
        "loss": sum(step0_losses) / len(step0_losses) if step0_losses else None,
        "logged_step1": {k: logged[k] for k in sorted(logged) if k.split("/")[0] in {"loss", "logps", "rewards"}},
        "tokens_step1": logged.get("num_tokens"),
    }
    record["autocast"] = probe.seen
    return record


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    work = Path(args.keep_dir) if args.keep_dir else Path(tempfile.mkdtemp(prefix="bench-trl-"))
    work.mkdir(parents=True, exist_ok=True)
    # A fresh datasets cache: TRL caches tokenization and reference log-probs by fingerprint, which would make a
    # second run warm.
    os.environ["HF_DATASETS_CACHE"] = str(work / "datasets-cache")
    watch = measure.LoadWatch().start()
    try:
        with measure.RssSampler() as sampler:
            phases = Phases(sampler)
            record = {"name": args.name, "trainer": "trl", "config": vars(args) | {"keep_dir": None}}
            record |= run(args, sampler, phases, work)
        record["memory"] = {
            "peak_rss_mib": round(measure.max_rss_bytes() / 2**20, 1),
            "phase_peak_rss_mib": {k: round(v / 2**20, 1) for k, v in sampler.peaks.items()},
        }
        record["load"] = watch.stop()
        record["hardware"] = measure.hardware()
        measure.write_record(record, args.output)
    finally:
        if not args.keep_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
