"""One `dpokit train` run in a child process, measured as `run_trl.py` measures TRL; prints one JSON record.

The child is exactly what a user runs, `python -m dpokit train key=value ...`, with the same data, LoRA settings,
pairs and steps as the TRL run it is compared with, and `logging_steps=1`. From outside the child this measures:

- whole-process wall time: from just before the child starts to the adapter on disk (the newest
  `adapter_model.safetensors` under `output_dir`, or the child's exit when there is none);
- peak RSS of the child (the kernel's `ru_maxrss` of our only child), next to what `summary.json` reports;
- how busy the machine was with other work meanwhile.

From the run's own files in `output_dir` (the contract dpokit's trainer writes):

- `metrics.jsonl`, one JSON object per logged step with `step` (1 for the first optimizer step) and `loss`; the
  step-0 loss is the `loss` of step 1. For the steady-state window each row also needs a clock: `time` (seconds
  since the epoch), `elapsed` or `runtime` (seconds since the loop began); with a cumulative `num_tokens` (real,
  unpadded tokens of the unshared layout, TRL's meaning) tokens/s and FLOPs are exact, without it they use the data
  set's mean tokens per pair. Without a clock, pairs/s falls back to summary.json's, warm-up included, and says so;
- `summary.json`: copied whole into the record; the table picks steps, training runtime, train pairs/s and peak
  memory from it under the names listed in `SUMMARY_KEYS`.

    python bench/run_dpokit.py --data pairs.jsonl --steps 12 --warmup-steps 2 --batch-size 4 --bf16 \\
        --set padding_free=false
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import measure

# Names the table looks for in summary.json, first match wins.
SUMMARY_KEYS = {
    "steps": ("steps", "global_step"),
    "train_runtime_s": ("runtime_seconds", "train_runtime", "runtime"),
    "train_pairs_per_s": ("train_pairs_per_second", "pairs_per_second"),
    "train_tokens_per_s": ("train_tokens_per_second", "tokens_per_second"),
    "peak_memory_mb": ("peak_memory_mb", "peak_memory_mib", "peak_rss_mib"),
}
# Per-step clock in metrics.jsonl, first match wins: epoch seconds, or seconds since the loop began.
CLOCK_KEYS = ("time", "elapsed", "runtime", "train_seconds")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="dpokit")
    p.add_argument("--data", required=True)
    p.add_argument("--model", default=measure.BUILTIN_MODEL)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--precompute-ref", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--learning-rate", type=float, default=5e-6)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more dpokit config keys")
    p.add_argument("--output", default=None)
    p.add_argument("--keep-dir", default=None)
    return p.parse_args()


def train_command(args: argparse.Namespace, output_dir: Path) -> list[str]:
    """The `dpokit train` command line; keys mirror the TRL run's DPOConfig one for one."""
    settings = {
        "model_name_or_path": args.model,
        "train_data": args.data,
        "output_dir": str(output_dir),
        "overwrite_output_dir": "true",
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": args.grad_accum,
        "max_steps": args.steps,
        "learning_rate": args.learning_rate,
        "warmup_ratio": 0,  # TRL's default schedule: linear decay, no warm-up
        "lr_scheduler_type": "linear",
        "beta": args.beta,
        "max_length": args.max_length,
        "bf16": str(args.bf16).lower(),
        "precompute_ref_log_probs": str(args.precompute_ref).lower(),
        "gradient_checkpointing": str(args.gradient_checkpointing).lower(),
        "use_peft": "true",
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        "lora_target_modules": "all-linear",
        "logging_steps": 1,
        "save_steps": 0,
        "seed": args.seed,
    }
    overrides = [f"{key}={value}" for key, value in settings.items()]
    return [sys.executable, "-m", "dpokit", "train", *overrides, *args.set]


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted((r for r in rows if isinstance(r.get("step"), int) and "loss" in r), key=lambda r: r["step"])


def first_key(mapping: dict[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        if name in mapping:
            return mapping[name]
    return None


def adapter_saved_at(output_dir: Path) -> float | None:
    files = [p for p in output_dir.rglob("adapter_model.safetensors") if "checkpoints" not in p.parts]
    return max((p.stat().st_mtime for p in files), default=None)


def data_lengths(args: argparse.Namespace) -> list[measure.PairLengths]:
    """Token counts of every pair, with dpokit's own (TRL-identical) encoding; read after the run, not timed."""
    from dpokit.data import Pair
    from dpokit.data.encode import encode_pairs
    from dpokit.models import load_tokenizer

    rows = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = [Pair(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    encoded = encode_pairs(load_tokenizer(args.model), pairs)
    lengths = [measure.PairLengths(len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)) for e in encoded]
    return [p.truncated(args.max_length) for p in lengths if p.prompt < args.max_length]


def step_time(row: dict[str, Any]) -> float | None:
    return first_key(row, CLOCK_KEYS)


def throughput(
    metrics: list[dict[str, Any]], summary: dict[str, Any], args: argparse.Namespace, lengths: list[measure.PairLengths]
) -> dict[str, Any]:
    """Pairs/s, tokens/s and achieved GFLOP/s over the steps after the warm-up, from metrics.jsonl timestamps."""
    shape = measure.ModelShape.from_config(measure.read_model_config(_model_dir(args.model)))
    mean_pair_flops = measure.training_flops(lengths, shape, args.lora_r) / len(lengths)
    mean_tokens = sum(p.tokens for p in lengths) / len(lengths)
    by_step = {r["step"]: r for r in metrics if step_time(r) is not None}
    if len(by_step) < 2:
        pairs_per_s = first_key(summary, SUMMARY_KEYS["train_pairs_per_s"])
        if not pairs_per_s:
            return {"error": "neither a per-step clock in metrics.jsonl nor train pairs/s in summary.json"}
        return {
            "steps": first_key(summary, SUMMARY_KEYS["steps"]),
            "pairs_per_s": pairs_per_s,
            "tokens_per_s": first_key(summary, SUMMARY_KEYS["train_tokens_per_s"]),
            "basis": "summary.json, warm-up steps included (metrics.jsonl has no per-step clock)",
            "achieved_gflops": round(mean_pair_flops * pairs_per_s / 1e9, 2),
        }
    last = max(by_step)
    first = max((s for s in by_step if s <= args.warmup_steps), default=min(by_step))
    seconds = step_time(by_step[last]) - step_time(by_step[first])
    pairs = (last - first) * args.batch_size * args.grad_accum
    if "num_tokens" in by_step[last] and "num_tokens" in by_step[first]:
        tokens = by_step[last]["num_tokens"] - by_step[first]["num_tokens"]
        basis = "steps after warm-up; tokens from metrics num_tokens"
        flops = mean_pair_flops * tokens / mean_tokens
    else:
        tokens = pairs * mean_tokens
        basis = "steps after warm-up; tokens from the data set's mean per pair"
        flops = mean_pair_flops * pairs
    return {
        "steps": last,
        "window_steps": last - first,
        "window_s": round(seconds, 3),
        "pairs_per_s": round(pairs / seconds, 4),
        "tokens_per_s": round(tokens / seconds, 1),
        "basis": basis,
        "model_flops": flops,
        "achieved_gflops": round(flops / seconds / 1e9, 2),
    }


def _model_dir(model: str) -> str:
    from dpokit.models import resolve_model_path

    return resolve_model_path(model)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    output_dir = work / "run"
    command = train_command(args, output_dir)
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(work / "hf"),
        "DPOKIT_CACHE": str(fresh_cache(work)),
    }
    watch = measure.LoadWatch(include_children=True).start()
    started = time.time()
    child = subprocess.run(command, env=env, capture_output=True, text=True)
    exited = time.time()
    load = watch.stop()
    record: dict[str, Any] = {"name": args.name, "trainer": "dpokit", "config": vars(args) | {"keep_dir": None}}
    record["command"] = " ".join(command[1:])
    if child.returncode != 0:
        record["error"] = f"dpokit train exited with {child.returncode}: {child.stderr.strip()[-2000:]}"
        return record
    saved = adapter_saved_at(output_dir)
    record["wall_time_s"] = round((saved or exited) - started, 3)
    record["wall_time_basis"] = "adapter file written" if saved else "process exit (no adapter file found)"
    record["process_wall_s"] = round(exited - started, 3)
    summary_path = output_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    record["summary"] = summary
    record["summary_fields"] = {key: first_key(summary, names) for key, names in SUMMARY_KEYS.items()}
    metrics = read_metrics(output_dir)
    lengths = data_lengths(args)
    record["data_tokens"] = measure.token_stats(lengths, args.batch_size)
    record["train_loop"] = throughput(metrics, summary, args, lengths)
    record["step0"] = {"loss": metrics[0]["loss"] if metrics else None, "first_logged_step": metrics[:1]}
    record["memory"] = {"peak_rss_mib": round(measure.max_rss_bytes(children=True) / 2**20, 1)}
    record["load"] = load
    return record


def fresh_cache(work: Path) -> Path:
    """A dpokit cache with no reference log-probs in it, so every run computes its reference pass (as TRL's runs
    do, with their fresh datasets cache); the converted builtin model is shared, as TRL's runs share it."""
    from dpokit.models import cache_dir

    cache = work / "dpokit-cache"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "models").symlink_to(cache_dir() / "models", target_is_directory=True)
    return cache


def main() -> None:
    args = parse_args()
    work = Path(args.keep_dir) if args.keep_dir else Path(tempfile.mkdtemp(prefix="bench-dpokit-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        record = run(args, work)
        record["hardware"] = measure.hardware()
        measure.write_record(record, args.output)
    finally:
        if not args.keep_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
