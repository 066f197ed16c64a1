"""Peak memory and speed of LoRA training on fp32, bf16, 8-bit and 4-bit bases: the README's QLoRA table.

Each configuration is one `python -m dpokit train` process from a cold start, a few optimizer steps of LoRA (r=16,
all linear layers) on synthetic pairs (`synthetic.py`, cut to `--max-length`). Two models: the built-in
SmolLM2-135M-Instruct, and a random Llama of about 1B parameters built here (TinyLlama's shape with SmolLM2's
vocabulary, tied embeddings; nothing is downloaded), where the weights dominate memory and the saving shows.

- peak memory: the process's peak resident set (ru_maxrss, loading included), as summary.json reports it;
- pairs/s: pairs of the steps after the first divided by their time (from metrics.jsonl's `train_seconds`).

    python bench/qlora.py --output bench/results/qlora.json            # both models
    python bench/qlora.py --only builtin --output /tmp/qlora.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import measure  # noqa: E402
import synthetic  # noqa: E402

BASES = {
    "fp32": ["bf16=false"],
    "bf16": ["bf16=true"],
    "8-bit": ["load_in_8bit=true", "bf16=false"],
    "4-bit nf4": ["load_in_4bit=true", "bf16=false"],
    "4-bit nf4 + bf16 compute": ["load_in_4bit=true", "bf16=true"],
}
# model -> (steps, pairs per step); the first step is left out of pairs/s
MODELS = {"builtin": (3, 2), "llama-1b": (2, 1)}
ONE_B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=20,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


def build_one_b(target: Path) -> Path:
    """A random ~1B Llama in fp32 safetensors with the built-in model's tokenizer, built once."""
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dpokit.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin:smollm2-135m-instruct"))
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **ONE_B)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


def run_one(model: str, base: str, data: Path, work: Path, max_length: int) -> dict[str, Any]:
    steps, batch = MODELS[model]
    out = work / f"{model}-{base.replace(' ', '_').replace(',', '')}"
    settings = [
        f"model_name_or_path={model_path(model, work)}",
        f"train_data={data}",
        f"output_dir={out}",
        "overwrite_output_dir=true",
        f"max_steps={steps}",
        f"per_device_train_batch_size={batch}",
        f"max_length={max_length}",
        f"max_prompt_length={max_length // 2}",
        "logging_steps=1",
        "save_steps=0",
        "learning_rate=5e-6",
        *BASES[base],
    ]
    env = run_env(work)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "dpokit", "train", *settings], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return {"model": model, "base": base, "error": proc.stderr.strip().splitlines()[-1:]}
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train_seconds" in r]
    timed = rows[-1]["train_seconds"] - rows[0]["train_seconds"]
    quant = summary.get("quantization") or {}
    return {
        "model": model,
        "base": base,
        "peak_memory_mb": summary["peak_memory_mb"],
        "pairs_per_second": round((len(rows) - 1) * batch / timed, 4) if timed > 0 else None,
        "step0_loss": rows[0]["loss"],
        "weights_stored_mb": quant.get("weights_stored_mb"),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "other_cores_busy_after": round(measure.other_cores_now(1.0), 2),  # the machine is shared
    }


def run_env(work: Path) -> dict[str, str]:
    """A cache of its own, so no reference log-probs of an earlier run are reused."""
    return {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), "DPOKIT_CACHE": str(work / "cache")}


def convert_builtin(work: Path) -> None:
    """The built-in model's one-time conversion, done before the runs so that no run's peak memory includes it."""
    code = "from dpokit.models import resolve_model_path; resolve_model_path('builtin:smollm2-135m-instruct')"
    subprocess.run([sys.executable, "-c", code], env=run_env(work), check=True)


def model_path(model: str, work: Path) -> str:
    return "builtin:smollm2-135m-instruct" if model == "builtin" else str(work / "llama-1b")


def table(records: list[dict[str, Any]]) -> str:
    lines = ["| model | base | peak memory (MiB) | pairs/s |", "| --- | --- | ---: | ---: |"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['base']} | failed: {r['error']} | |")
        else:
            lines.append(f"| {r['model']} | {r['base']} | {r['peak_memory_mb']:,.0f} | {r['pairs_per_second']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/dpokit-bench-qlora", help="folder for models, data and runs")
    parser.add_argument("--only", default=",".join(MODELS), help="models to run: builtin, llama-1b")
    parser.add_argument("--bases", default=",".join(BASES), help="bases to run, comma-separated")
    parser.add_argument("--max-length", type=int, default=256, help="longest prompt+response (default 256)")
    parser.add_argument("--output", default=None, help="write the records as JSON here")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    records = []
    for model in args.only.split(","):
        if model == "llama-1b":
            build_one_b(work / "llama-1b")
        else:
            convert_builtin(work)
        steps, batch = MODELS[model]
        data = work / f"pairs-{model}.jsonl"
        synthetic.write_jsonl(synthetic.generate(steps * batch, seed=0, max_length=1024), data)
        for base in args.bases.split(","):
            record = run_one(model, base, data, work, args.max_length)
            print(json.dumps(record), flush=True)
            records.append(record)
    print(table(records))
    if args.output:
        measure.write_record({"hardware": measure.hardware(), "runs": records}, args.output)


if __name__ == "__main__":
    main()
