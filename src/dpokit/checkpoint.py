"""Resumable checkpoints, written so that a crash mid-write never leaves one that looks complete.

A checkpoint is `checkpoints/step-N/` holding the trainable weights (`trainable.safetensors`; with LoRA also a
standard PEFT `adapter/`), the optimizer and scheduler states, the RNG states, `trainer_state.json` (step, data
position, the open logging window) and the resolved `config.yaml`. It is assembled in a hidden temporary folder
and renamed into place in one atomic step; only `step-N` folders count.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dpokit.errors import UserError
from dpokit.outputs import ensure_writable

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with f.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(path)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes (LoRA weights only, with LoRA); shared weights appear once."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler: Any,
    trainer_state: dict[str, Any],
    config_yaml: str,
    peft_model: Any | None = None,
) -> Path:
    """Write `checkpoints/step-<step>` atomically and return its path.

    `weights` are the whole trainable weights by name and `optimizer_state` is in torch's format with whole
    tensors (`trainable_state` and `optimizer.state_dict()` on one process; the engines gather them when sharded).
    """
    root = output_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({name: w.contiguous() for name, w in weights.items()}, str(tmp / "trainable.safetensors"))
    if peft_model is not None:  # from `weights`: a sharded model's own parameters hold only a shard
        peft_model.save_pretrained(str(tmp / "adapter"), state_dict=weights, safe_serialization=True)
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
    # written last: a folder without it was never finished
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2), encoding="utf-8")
    _fsync_tree(tmp)
    if final.exists():  # the same step saved again (e.g. a stop right after a periodic save)
        old = root / f".step-{step}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    return final


def is_complete(path: Path) -> bool:
    return _STEP_DIR.match(path.name) is not None and (path / STATE_FILE).is_file()


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def rotate_checkpoints(output_dir: Path, keep: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `keep`; the newest is never deleted. Returns the deleted."""
    if keep is None:
        return []
    found = list_checkpoints(output_dir)
    doomed = found[: max(0, len(found) - max(keep, 1))]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def clean_incomplete(output_dir: Path) -> None:
    """Remove temporary folders left by a crash during a save."""
    root = output_dir / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".step-"):
                shutil.rmtree(p, ignore_errors=True)


@dataclass
class Saved:
    """A checkpoint read back: whole weights and optimizer state for the engine to place, and the trainer state."""

    weights: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    trainer_state: dict[str, Any]


def load_checkpoint(path: Path, *, trainable: Collection[str], scheduler: Any) -> Saved:
    """Read `path`, checked against the names of the model's `trainable` weights; restores scheduler and RNG."""
    if not is_complete(path):
        raise UserError(
            f"{path} is not a complete dpokit checkpoint (no {STATE_FILE}); pick a checkpoints/step-N folder"
        )
    weights = load_file(str(path / "trainable.safetensors"))
    unknown = [k for k in weights if k not in trainable]
    missing = [k for k in trainable if k not in weights]
    if unknown or missing:
        raise UserError(
            f"checkpoint {path} does not fit this model ({len(unknown)} unknown, {len(missing)} missing weights); "
            "resume with the model_name_or_path and LoRA settings the run started with"
        )
    # weights_only: these files hold tensors and plain values only, and nothing else is unpickled
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return Saved(weights, optimizer_state, json.loads((path / STATE_FILE).read_text(encoding="utf-8")))


RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "data_stats.json", CHECKPOINTS, "adapter", "model")
# what later commands leave in a run folder; replaced with the run, so a report never mixes two runs
RUN_EXTRAS = ("tensorboard", "eval.json", "vibe.jsonl", "compare", "report.html", "dpokit.json", "wandb", "mlflow.db")


def prepare_output_dir(
    output_dir: Path, *, resume: bool, resume_from: str | None, overwrite: bool, is_main: bool
) -> Path | None:
    """Check the run folder before anything expensive; returns the checkpoint to resume from, if any.

    A folder holding another run is never overwritten unless asked; an unwritable one is found by a write
    probe now rather than at the first checkpoint.
    """
    existing = [name for name in RUN_FILES if (output_dir / name).exists()]
    checkpoint: Path | None = None
    if resume_from:
        checkpoint = Path(resume_from)
        if not is_complete(checkpoint):
            raise UserError(f"resume_from={resume_from} is not a complete checkpoint folder (checkpoints/step-N)")
    elif resume:
        checkpoint = latest_checkpoint(output_dir)
        if checkpoint is None:
            raise UserError(f"resume=true but {output_dir}/{CHECKPOINTS} holds no complete checkpoint")
    elif existing and not overwrite:
        raise UserError(
            f"output_dir {output_dir} holds another run ({', '.join(existing)}); continue it with resume=true, "
            "replace it with overwrite_output_dir=true, or choose another output_dir"
        )
    if is_main:
        ensure_writable(output_dir, "output_dir")  # now, not after an hour
        if overwrite:
            for name in existing + [n for n in RUN_EXTRAS if (output_dir / n).exists()]:
                target = output_dir / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        clean_incomplete(output_dir)
    return checkpoint
