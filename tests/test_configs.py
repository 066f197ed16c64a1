"""Every shipped example config is valid; every module imports; the code is lint-clean."""

from __future__ import annotations

import importlib
import pkgutil
import shutil
import subprocess
from pathlib import Path

import pytest

import dpokit
from dpokit.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_training_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.output_dir.startswith("runs/")


def test_every_module_imports() -> None:
    names = [m.name for m in pkgutil.walk_packages(dpokit.__path__, "dpokit.")]
    assert "dpokit.train" in names and "dpokit.losses" in names
    for name in names:
        importlib.import_module(name)


@pytest.mark.skipif(
    shutil.which("ruff") is None and not (ROOT / ".venv/bin/ruff").exists(), reason="ruff not installed"
)
def test_ruff_is_clean() -> None:
    ruff = shutil.which("ruff") or str(ROOT / ".venv/bin/ruff")
    result = subprocess.run([ruff, "check", "src", "tests", "bench"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
