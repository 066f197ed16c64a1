"""A run left alone overnight: NaNs, kills mid-step and mid-checkpoint, rotation, and what files may do."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpokit.train
from dpokit.checkpoint import list_checkpoints
from dpokit.cli import main
from test_train import SRC, adapter_weights, metrics, run_train, settings

COMMON = ["max_steps=24", "per_device_train_batch_size=2", "logging_steps=1"]


@pytest.fixture(scope="module")
def straight(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every interrupted one must end equal to."""
    from conftest import conversational_rows, write_jsonl

    root = tmp_path_factory.mktemp("straight")
    data = write_jsonl(root / "pairs.jsonl", conversational_rows(24))
    run_train(*settings(tiny_model_dir, data, root / "run", *COMMON))
    return root


def launch(tiny_model_dir: Path, data: Path, out: Path, driver: str = "") -> subprocess.Popen:
    """`dpokit train` in its own process; `driver` is Python run first (fault injection for the test)."""
    code = f"{driver}\nimport sys\nfrom dpokit.cli import main\nsys.exit(main(sys.argv[1:]))"
    args = ["train", *settings(tiny_model_dir, data, out, *COMMON, "save_steps=3")]
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], env={**os.environ, "PYTHONPATH": SRC}, stderr=subprocess.PIPE, text=True
    )


def wait_for(condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def assert_same_as(straight: Path, out: Path) -> None:
    expected = adapter_weights(straight / "run")
    got = adapter_weights(out)
    for key, value in expected.items():
        assert torch.allclose(value, got[key], atol=1e-7), key
    assert [r["step"] for r in metrics(out)] == list(range(1, 25))


def test_sigkill_mid_step_then_resume(tiny_model_dir: Path, straight: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = launch(tiny_model_dir, straight / "pairs.jsonl", out)
    wait_for(lambda: (out / "metrics.jsonl").exists() and len(metrics(out)) >= 8)
    proc.kill()
    proc.wait()
    last = list_checkpoints(out)[-1]
    assert int(last.name.split("-")[1]) % 3 == 0
    # the metrics written after the checkpoint are not trusted: resume rewrites from the checkpoint's step
    run_train(*settings(tiny_model_dir, straight / "pairs.jsonl", out, *COMMON, "save_steps=3", "resume=true"))
    assert_same_as(straight, out)


def test_sigkill_while_writing_a_checkpoint_leaves_no_complete_looking_one(
    tiny_model_dir: Path, straight: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    marker = tmp_path / "writing"
    # fault injection: the second checkpoint write announces itself and hangs before its final rename
    driver = f"""
import pathlib, time, dpokit.checkpoint as c
original, calls = c._fsync_tree, []
def slow(path):
    calls.append(path)
    if len(calls) == 2:
        pathlib.Path({str(marker)!r}).write_text(str(path))
        time.sleep(600)
    original(path)
c._fsync_tree = slow
"""
    proc = launch(tiny_model_dir, straight / "pairs.jsonl", out, driver)
    wait_for(marker.exists)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name for p in list_checkpoints(out)] == ["step-3"]
    assert any(p.name.startswith(".step-6.tmp") for p in (out / "checkpoints").iterdir())
    run_train(*settings(tiny_model_dir, straight / "pairs.jsonl", out, *COMMON, "save_steps=3", "resume=true"))
    assert_same_as(straight, out)
    assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())


def test_nan_steps_are_skipped_and_never_reach_the_weights(
    tiny_model_dir: Path, straight: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, calls = dpokit.train.preference_loss, []

    def nan_on_steps_2_and_3(*args, **kwargs):
        losses, chosen, rejected = real(*args, **kwargs)
        calls.append(1)
        return (losses * float("nan") if len(calls) in (2, 3) else losses), chosen, rejected

    monkeypatch.setattr(dpokit.train, "preference_loss", nan_on_steps_2_and_3)
    out = tmp_path / "run"
    summary = run_train(
        *settings(
            tiny_model_dir,
            straight / "pairs.jsonl",
            out,
            "max_steps=5",
            "per_device_train_batch_size=4",
            "save_steps=1",
        )
    )
    assert summary["skipped_steps"] == 2
    weights = [load_file(str(out / "checkpoints" / f"step-{s}" / "trainable.safetensors")) for s in (1, 2, 3, 4)]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]) and torch.equal(weights[1][key], weights[2][key])
    assert any(not torch.equal(weights[2][k], weights[3][k]) for k in weights[0])
    assert [r["step"] for r in metrics(out)] == [1, 4, 5]  # skipped steps log nothing
    text = (out / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text


def test_nan_in_a_row_stops_with_a_checkpoint(
    tiny_model_dir: Path,
    straight: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real = dpokit.train.preference_loss
    monkeypatch.setattr(
        dpokit.train, "preference_loss", lambda *a, **k: (real(*a, **k)[0] * float("inf"), *real(*a, **k)[1:])
    )
    out = tmp_path / "run"
    code = main(
        ["train", *settings(tiny_model_dir, straight / "pairs.jsonl", out, "max_steps=20", "max_nonfinite_steps=3")]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "NaN/inf for 4 steps in a row" in err and "Traceback" not in err
    assert [p.name for p in list_checkpoints(out)] == ["step-4"]


def test_rotation_keeps_the_newest(tiny_model_dir: Path, straight: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_train(
        *settings(
            tiny_model_dir,
            straight / "pairs.jsonl",
            out,
            "max_steps=6",
            "per_device_train_batch_size=4",
            "save_steps=1",
            "save_total_limit=2",
        )
    )
    assert [p.name for p in list_checkpoints(out)] == ["step-4", "step-5"]


def test_no_pickle_loading_in_the_code() -> None:
    """torch.load only with weights_only=True; no pickle, no trust_remote_code defaulting to True."""
    source = "\n".join(p.read_text() for p in Path(SRC, "dpokit").rglob("*.py"))
    for call in re.findall(r"torch\.load\([^)]*\)", source):
        assert "weights_only=True" in call, call
    assert "import pickle" not in source and "pickle.load" not in source
    assert "trust_remote_code=True" not in source


def test_pickled_weights_are_refused(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # the old pickled format
    for f in tiny_model_dir.iterdir():
        if not f.name.startswith(("model", "config")):
            (folder / f.name).write_bytes(f.read_bytes())
    from conftest import conversational_rows, write_jsonl

    data = write_jsonl(tmp_path / "p.jsonl", conversational_rows(4))
    assert main(["train", *settings(folder, data, tmp_path / "out")]) == 2
    assert "no safetensors weights" in capsys.readouterr().err
