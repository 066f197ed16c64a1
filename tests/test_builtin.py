"""The built-in SmolLM2-135M-Instruct: it loads offline and trains."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import conversational_rows, write_jsonl
from dpokit.config import BUILTIN_MODEL, load_config
from dpokit.models import load_model, load_tokenizer, resolve_model_path
from dpokit.train import train

pytestmark = pytest.mark.builtin


def test_builtin_resolves_to_a_cached_safetensors_folder() -> None:
    folder = Path(resolve_model_path(BUILTIN_MODEL))
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    tokenizer = load_tokenizer(BUILTIN_MODEL)
    model = load_model(BUILTIN_MODEL)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")


def test_lora_training_on_the_builtin_model(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", conversational_rows(8))
    out = tmp_path / "run"
    cfg = load_config(
        None,
        [
            f"train_data={data}",
            f"output_dir={out}",
            "max_steps=2",
            "per_device_train_batch_size=4",
            "logging_steps=1",
            "learning_rate=1e-4",
            "max_length=128",
        ],
    )
    assert cfg.model_name_or_path == BUILTIN_MODEL  # the default
    summary = train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Step 1 is measured before any update, and the reference pass ran training's own batches in the same
    # precision (bf16 autocast where the CPU runs it fast): the policy equals its reference, so the loss is log 2
    # to the tiny model's tolerance and the rewards are zero (test_train.py)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert rows[0]["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
    assert summary["steps"] == 2 and (out / "adapter" / "adapter_model.safetensors").is_file()
