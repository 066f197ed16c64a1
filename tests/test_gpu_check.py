"""bench/gpu_check.py, the GPU machine's one prepared script, run on CPU with a tiny model so that it cannot rot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def run_script(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1] / "src")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.slow
def test_dry_run_trains_trl_and_dpokit_and_checks_flex_attention(tmp_path: Path) -> None:
    proc = run_script("--dry-run", "--only", "TRL 1.16,dpokit defaults", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    runs = record["runs"]
    assert set(runs) == {"TRL 1.16", "dpokit defaults"}
    for run in runs.values():
        # LoRA's B starts at zero: the policy is the reference at step 0, so the loss is log 2 in both trainers
        assert run["step0_loss"] == pytest.approx(math.log(2), abs=1e-4)
        assert run["step0_agrees"] and run["pairs_per_s"] > 0 and run["tokens_per_s"] > 0 and 0 < run["mfu"] < 1
    checks = [v for v in record["flex_check"].values() if isinstance(v, dict)]
    assert len(checks) == 3 and all(c["ok"] for c in checks)
    assert record["flex_check"]["gradients_checked"] is False  # no FlexAttention backward on CPU
    assert record["data"]["pairs"] == record["plan"]["batch_size"] * record["plan"]["steps"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| TRL 1.16 | 0.69315 |" in table and "| dpokit defaults | 0.69315 |" in table


def test_wheels_list_what_a_pytorch_image_lacks() -> None:
    proc = run_script("--wheels", timeout=120)
    assert proc.returncode == 0, proc.stderr
    wheels = dict(line.split("==") for line in proc.stdout.split())
    from importlib.metadata import version

    for name in ("transformers", "trl", "peft", "accelerate", "datasets", "safetensors", "tokenizers"):
        assert wheels[name] == version(name)
    assert "torch" not in wheels and "numpy" not in wheels and "dpokit" not in wheels
