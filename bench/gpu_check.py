"""The GPU check: dpokit against TRL 1.16 on one NVIDIA GPU with no network, in one run of at most 8 minutes.

Builds a random Llama of about 1B parameters (Llama-3.2-1B's shape; nothing is downloaded), long-tailed synthetic
pairs as in the CPU benchmark (`synthetic.py`, 1024 profile), and trains LoRA (r=16, all linear layers) on them:

1. correctness (`flex_check.py`): FlexAttention block masks against the plain path on a small model,
   per-sequence log-probs and LoRA gradients (fp32, TF32 off), for packed, prefix-shared and mixed rows;
2. the GPU's bf16 matmul peak (the MFU denominator), measured on 8192-square products;
3. TRL's `DPOTrainer` at its fastest GPU settings (bf16, precomputed reference, no gradient checkpointing);
4. dpokit with its defaults, then with each technique off, then QLoRA (a 4-bit base) where this dpokit has it.

Each training run reports the step-0 loss (and its relative gap to TRL's, to hold within 1e-2 in bf16), pairs/s
and tokens/s over the steps after the warm-up, peak GPU memory (`torch.cuda.max_memory_allocated`) and MFU:
model FLOPs (`measure.training_flops`, at the data set's mean FLOPs per token) over time, divided by the matmul
peak. Runs share one process, so FlexAttention compiles once per shape for all of them; a run that would start
after the time budget is recorded as skipped. Results: `gpu_check.json` and `gpu_check.md` in `--out`.

    python bench/gpu_check.py --out bench/results/gpu        # on the GPU machine
    python bench/gpu_check.py --dry-run --out /tmp/gpu-dry   # CPU, tiny model, about a minute: keeps it working
    python bench/gpu_check.py --wheels                       # the wheels to carry beyond a CUDA PyTorch image

Offline machine: `--wheels > wheels.txt` lists every distribution needed, recursively (`wheels.py`); on a machine
with network and the same Python, `pip download --no-deps -d wheels -r wheels.txt`; on the GPU machine, `pip install
--no-index --no-deps --find-links wheels -r wheels.txt`. dpokit itself comes as this repository (its `src` is put on
the path).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO / "src"), str(BENCH)]

import flex_check  # noqa: E402
import measure  # noqa: E402
import synthetic  # noqa: E402
import wheels  # noqa: E402

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, max_position_embeddings=4096, rope_theta=500000.0)  # fmt: skip
LLAMA_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048)  # fmt: skip
TECHNIQUES_OFF = {  # dpokit runs after the defaults: one technique off each
    "padding_free off": {"padding_free": "false"},
    "prefix_sharing off": {"prefix_sharing": "false"},
    "flex off (sdpa, one segment at a time)": {"attn_implementation": "sdpa"},
    "flex off (sdpa, dense mask)": {"attn_implementation": "sdpa", "segment_attention": "false"},
    "group_by_length off": {"group_by_length": "false"},
    "one LM-head chunk": {"logits_chunk_size": "1000000"},
    "precompute off": {"precompute_ref_log_probs": "false"},
}


@dataclass(frozen=True)
class Plan:
    """One run's sizes: the real check, or the dry run's tiny version of it."""

    device: str
    model: dict[str, Any]
    tokenizer: str  # "builtin" (SmolLM2's, vocabulary 49152) or "tiny" (the tests' byte-level BPE)
    batch_size: int
    steps: int
    warmup_steps: int
    max_length: int
    bf16: bool
    budget_s: float
    words: int | None = None  # the dry run cuts every message to this many words

    @property
    def pairs(self) -> int:
        return self.batch_size * self.steps  # each pair trained on once


def make_plan(args: argparse.Namespace) -> Plan:
    if args.dry_run:
        return Plan("cpu", LLAMA_TINY, "tiny", 2, 3, 1, 1024, False, args.budget_s, words=12)
    return Plan("cuda", LLAMA_1B, args.tokenizer, args.batch_size, args.steps, 2, 1024, True, args.budget_s)


@dataclass
class Clock:
    """The time budget: runs that would start after it are skipped, not cut short."""

    budget_s: float
    start: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)


# --- set-up ---------------------------------------------------------------------------------------------------------


def load_tokenizer(kind: str) -> Any:
    if kind == "tiny":
        sys.path.insert(0, str(REPO / "tests"))
        import tiny

        return tiny.build_tokenizer()
    from dpokit.config import BUILTIN_MODEL
    from dpokit.models import load_tokenizer as dpokit_tokenizer

    return dpokit_tokenizer(BUILTIN_MODEL)


def build_model_dir(plan: Plan, tokenizer: Any, folder: Path) -> Path:
    """A random Llama of the plan's shape, saved in fp32 safetensors with the tokenizer: dpokit and TRL load it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("pad", "eos", "bos")}
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, **ids, **plan.model)
    torch.manual_seed(0)
    with torch.device(plan.device):
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model
    return folder


def write_data(plan: Plan, path: Path) -> Path:
    rows = synthetic.generate(plan.pairs, seed=0, max_length=plan.max_length)
    for row in rows if plan.words else ():
        for message in row["prompt"] + row["chosen"] + row["rejected"]:
            message["content"] = " ".join(message["content"].split()[: plan.words])
    synthetic.write_jsonl(rows, path)
    return path


def data_flops(plan: Plan, model_dir: Path, data: Path, tokenizer: Any) -> dict[str, float]:
    """Real tokens and model FLOPs per token of the data set as dpokit (and TRL) tokenize and truncate it."""
    from dpokit.data.encode import encode_pairs
    from dpokit.data.load import load_pairs

    pairs = encode_pairs(tokenizer, load_pairs(str(data)).pairs)
    lengths = [
        measure.PairLengths(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)).truncated(plan.max_length)
        for p in pairs
    ]
    shape = measure.ModelShape.from_config(measure.read_model_config(model_dir))
    tokens = sum(p.tokens for p in lengths)
    return {
        "pairs": len(lengths),
        "tokens": tokens,
        "flops_per_token": measure.training_flops(lengths, shape, 16) / tokens,
        "parameters": shape.body_params + shape.hidden * shape.vocab,
    }


def matmul_peak_tflops(device: str) -> float:
    """The best bf16 matmul rate of this device over a few repeats, in TFLOP/s."""
    import torch

    n = 8192 if device == "cuda" else 512
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    best = math.inf
    for _ in range(8):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / 10)
    return 2 * n**3 / best / 1e12


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# --- 3. TRL -----------------------------------------------------------------------------------------------------------


def trl_run(plan: Plan, model_dir: Path, data: Path, work: Path) -> dict[str, Any]:
    """TRL's DPOTrainer with LoRA at its fastest settings; timed by a TrainerCallback as in `run_trl.py`."""
    import datasets
    import run_trl
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    free_memory(plan.device)
    config = DPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=plan.batch_size, gradient_accumulation_steps=1,
        max_steps=plan.steps, learning_rate=5e-6, beta=0.1, max_length=plan.max_length, bf16=plan.bf16,
        use_cpu=plan.device == "cpu", gradient_checkpointing=False, precompute_ref_log_probs=True, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=42, train_sampling_strategy="sequential",
    )  # fmt: skip
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    clock = run_trl.make_callbacks(TrainerCallback, plan.warmup_steps)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    trainer = DPOTrainer(
        model=model.to(plan.device), args=config, processing_class=AutoTokenizer.from_pretrained(model_dir),
        train_dataset=datasets.load_dataset("json", data_files=str(data), split="train"), peft_config=lora,
        callbacks=[clock],
    )  # fmt: skip
    step0 = run_trl.record_step0_losses(trainer)
    trainer.train()
    last = max(clock.step_end)
    first = min(plan.warmup_steps, last - 1)
    seconds = clock.step_end[last] - clock.step_end[first]
    lengths = run_trl.pair_lengths(trainer.train_dataset, plan.max_length)
    window = lengths[first * plan.batch_size : last * plan.batch_size]
    record = {
        "step0_loss": sum(step0) / len(step0) if step0 else None,
        "window_s": seconds,
        "pairs_per_s": len(window) / seconds,
        "tokens_per_s": sum(p.tokens for p in window) / seconds,
        "peak_memory_mb": peak_memory_mb(plan.device),
    }
    del trainer.compute_loss  # the recording closure holds the trainer; let it and its model go
    free_memory(plan.device)
    return record


def peak_memory_mb(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


# --- 4. dpokit --------------------------------------------------------------------------------------------------------


def dpokit_settings(plan: Plan, model_dir: Path, data: Path, output_dir: Path) -> list[str]:
    settings = {
        "model_name_or_path": model_dir, "train_data": data, "output_dir": output_dir, "overwrite_output_dir": "true",
        "per_device_train_batch_size": plan.batch_size, "gradient_accumulation_steps": 1, "max_steps": plan.steps,
        "learning_rate": 5e-6, "warmup_ratio": 0, "lr_scheduler_type": "linear", "beta": 0.1,
        "max_length": plan.max_length, "bf16": str(plan.bf16).lower(), "precompute_ref_log_probs": "true",
        "gradient_checkpointing": "false", "use_peft": "true", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
        "logging_steps": 1, "save_steps": 0, "seed": 42,
    }  # fmt: skip
    return [f"{key}={value}" for key, value in settings.items()]


def dpokit_run(plan: Plan, model_dir: Path, data: Path, work: Path, extra: dict[str, str]) -> dict[str, Any]:
    """`dpokit train` in this process; throughput from the per-step clock and token counts in metrics.jsonl."""
    from dpokit.config import load_config
    from dpokit.train import train

    free_memory(plan.device)
    output_dir = work / f"dpokit-{len(list(work.glob('dpokit-*')))}"
    overrides = dpokit_settings(plan, model_dir, data, output_dir) + [f"{k}={v}" for k, v in extra.items()]
    summary = train(load_config(None, overrides))
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    rows = sorted((r for r in rows if "loss" in r), key=lambda r: r["step"])
    first = rows[min(plan.warmup_steps, len(rows) - 1) - 1] if len(rows) > 1 else {"train_seconds": 0, "num_tokens": 0}
    last = rows[-1]
    seconds = last["train_seconds"] - first["train_seconds"]
    pairs = (last["step"] - first.get("step", 0)) * plan.batch_size
    record = {
        "step0_loss": rows[0]["loss"],
        "window_s": seconds,
        "pairs_per_s": pairs / seconds,
        "tokens_per_s": (last["num_tokens"] - first["num_tokens"]) / seconds,
        "peak_memory_mb": summary["peak_memory_mb"] if plan.device == "cuda" else None,
    }
    free_memory(plan.device)
    return record


def dpokit_runs(plan: Plan) -> dict[str, dict[str, str]]:
    from dpokit.config import DPOConfig

    runs = {"dpokit defaults": {}, **TECHNIQUES_OFF}
    if "load_in_4bit" in DPOConfig.__dataclass_fields__:
        runs["dpokit QLoRA (4-bit base)"] = {"load_in_4bit": "true"}
    return runs


# --- the whole check ----------------------------------------------------------------------------------------------


def run_all(plan: Plan, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    from dpokit import devices, flex

    clock = Clock(plan.budget_s)
    if plan.device == "cuda":
        devices.prepare(torch.device("cuda"))
    tokenizer = load_tokenizer(plan.tokenizer)
    record: dict[str, Any] = {"plan": asdict(plan), "hardware": hardware(plan.device), "versions": versions()}
    record["flex_check"] = flex_check.check(plan.device, tokenizer, LLAMA_TINY)
    record["matmul_peak_tflops_bf16"] = matmul_peak_tflops(plan.device)
    model_dir = build_model_dir(plan, tokenizer, work / "model")
    data = write_data(plan, work / "pairs.jsonl")
    record["data"] = data_flops(plan, model_dir, data, tokenizer)
    runs: dict[str, Any] = {}
    todo = {"TRL 1.16": None, **dpokit_runs(plan)}
    for name, extra in todo.items():
        if args.only and not any(part in name for part in args.only.split(",")):
            continue
        if clock.left() < 0:
            runs[name] = {"skipped": "time budget spent"}
            continue
        t0 = time.perf_counter()
        try:
            runs[name] = (
                trl_run(plan, model_dir, data, work)
                if extra is None
                else dpokit_run(plan, model_dir, data, work, extra)
            )
        except Exception as e:  # one broken configuration must not lose the others' numbers
            runs[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        runs[name]["wall_s"] = time.perf_counter() - t0
        print(f"{name}: {json.dumps(runs[name])}", file=sys.stderr, flush=True)
    record["runs"] = derive(runs, record)
    record["flex_compiled_shapes"] = flex.compiled_shapes()
    record["total_s"] = time.perf_counter() - clock.start
    return record


def derive(runs: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """MFU of each run and its step-0 loss against TRL's."""
    peak = record["matmul_peak_tflops_bf16"] * 1e12
    per_token = record["data"]["flops_per_token"]
    trl_loss = runs.get("TRL 1.16", {}).get("step0_loss")
    for run in runs.values():
        if "tokens_per_s" in run:
            run["mfu"] = run["tokens_per_s"] * per_token / peak
        if trl_loss and run.get("step0_loss") is not None:
            run["step0_rel_to_trl"] = abs(run["step0_loss"] - trl_loss) / abs(trl_loss)
            run["step0_agrees"] = run["step0_rel_to_trl"] <= 1e-2
    return runs


def hardware(device: str) -> dict[str, Any]:
    import torch

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return {"gpu": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": list(torch.cuda.get_device_capability(0)), "cuda": torch.version.cuda}  # fmt: skip
    return {"cpu": measure.cpu_model()}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "flash-attn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def markdown(record: dict[str, Any]) -> str:
    where = record["hardware"].get("gpu") or record["hardware"].get("cpu")
    lines = [
        f"GPU check on {where}; bf16 matmul peak {record['matmul_peak_tflops_bf16']:.1f} TFLOP/s; model "
        f"{record['data']['parameters'] / 1e9:.2f}B parameters, {record['data']['pairs']} pairs, "
        f"{record['plan']['steps']} steps of {record['plan']['batch_size']} "
        f"({record['plan']['warmup_steps']} warm-up).",
        "",
        "| run | step-0 loss | vs TRL | pairs/s | tokens/s | peak GPU MiB | MFU |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, run in record["runs"].items():
        if "pairs_per_s" not in run:
            lines.append(f"| {name} | {run.get('error') or run.get('skipped')} | | | | | |")
            continue
        memory = f"{run['peak_memory_mb']:,.0f}" if run.get("peak_memory_mb") else "n/a"
        gap = f"{run['step0_rel_to_trl']:.1e}" if "step0_rel_to_trl" in run else ""
        lines.append(
            f"| {name} | {run['step0_loss']:.5f} | {gap} | {run['pairs_per_s']:.2f} | {run['tokens_per_s']:,.0f} "
            f"| {memory} | {100 * run['mfu']:.1f}% |"
        )
    checks = {k: v for k, v in record["flex_check"].items() if isinstance(v, dict)}
    lines += ["", "FlexAttention against the plain path (fp32): " + "; ".join(
        f"{k} {'ok' if v['ok'] else 'FAILED'} (log-probs {v['logps_max_abs_diff']:.1e}"
        + (f", gradients {v['grad_max_abs_diff']:.1e})" if "grad_max_abs_diff" in v else ", no gradients on CPU)")
        for k, v in checks.items()
    ) + f"; {record['flex_compiled_shapes']} compiled shapes."]  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(BENCH / "results" / "gpu"), help="folder for gpu_check.json and .md")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, a few steps: checks the script runs")
    p.add_argument("--wheels", action="store_true", help="print the wheels to carry, one `name==version` a line")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--tokenizer", choices=("builtin", "tiny"), default="builtin")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no run after this many seconds")
    p.add_argument("--only", default="", help="comma-separated parts of run names to run (default: all)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.wheels:
        print("\n".join(wheels.wheels_to_carry()))
        return
    plan = make_plan(args)
    if plan.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on the GPU machine, or use --dry-run")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        record = run_all(plan, args, Path(work))
    (out / "gpu_check.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    table = markdown(record)
    (out / "gpu_check.md").write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
