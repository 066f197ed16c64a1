"""The loss options through a real `dpokit train` run on the tiny model: the rpo_alpha alias trains as TRL's list
form, and LD-DPO's weighting reaches the precomputed reference (its cache is keyed by it)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dpokit.config import load_config
from dpokit.train import train


def run(model_dir: Path, data: Path, out: Path, *extra: str) -> list[dict]:
    train(
        load_config(
            None,
            [
                f"model_name_or_path={model_dir}",
                f"train_data={data}",
                f"output_dir={out}",
                "learning_rate=1e-3",
                "bf16=false",
                "logging_steps=1",
                "max_steps=1",
                "per_device_train_batch_size=4",
                "use_weighting=true",
                *extra,
            ],
        )
    )
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_rpo_alpha_trains_as_the_list_form_and_ld_alpha_keys_the_reference(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    alias = run(tiny_model_dir, pairs_file, tmp_path / "alias", "rpo_alpha=0.5", "ld_alpha=0.5")
    listed = run(
        tiny_model_dir, pairs_file, tmp_path / "list", "loss_type=sigmoid,sft", "loss_weights=1,0.5", "ld_alpha=0.5"
    )
    assert len(alias) == len(listed) == 1
    for a, b in zip(alias, listed, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
    assert load_config(tmp_path / "alias" / "config.yaml").loss_type == ["sigmoid", "sft"]
    # another ld_alpha needs another reference table: at step 1 the policy is its reference, so the rewards are 0
    other = run(tiny_model_dir, pairs_file, tmp_path / "ld", "loss_type=sigmoid,sft", "ld_alpha=0.2")
    assert other[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert other[0]["rewards/rejected"] == pytest.approx(0.0, abs=1e-5)
    assert other[0]["logps/chosen"] != pytest.approx(listed[0]["logps/chosen"], rel=1e-3)  # the weights differ
    assert all(math.isfinite(row["loss"]) for row in alias + listed + other)
    assert alias[0]["grad_norm"] > 0
