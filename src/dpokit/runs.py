"""Run folders: where a `dpokit train` or `dpokit sft` run keeps its config and final adapter, and which base an
adapter belongs to.

A run folder (RUN_DIR) holds config.yaml and its final adapter in RUN_DIR/adapter (or the full model in
RUN_DIR/model); the commands that read a trained model save what they make beside it by default, where
`dpokit report RUN_DIR` finds it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dpokit.errors import UserError

ADAPTER_DIR_NAME = "adapter"  # a run's final adapter: RUN_DIR/adapter
RUN_CONFIG = "config.yaml"  # what marks a folder as a `dpokit train` run
PROVENANCE_FILE = "dpokit.json"  # beside a trained adapter or model: its base and the settings it was trained with


def read_provenance(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """What training wrote beside an adapter (`PROVENANCE_FILE`): its base, quantization and settings; {} when
    there is no such file."""
    path = Path(adapter_dir) / PROVENANCE_FILE
    if not path.is_file():
        return {}
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        recorded = None
    if not isinstance(recorded, dict):
        raise UserError(
            f"{path} is not a valid JSON object; delete it (the base then comes from adapter_config.json, or --model)"
        )
    return recorded


def adapter_base_model(adapter_dir: str | os.PathLike) -> str:
    """The base an adapter belongs to: `dpokit.json`'s `base_model` (the name as the user gave it, e.g. a
    `builtin:` name) when dpokit trained it, else `base_model_name_or_path` from adapter_config.json."""
    from dpokit.models import base_model_of_adapter

    recorded = base_model_of_adapter(adapter_dir)  # also checks that this is an adapter folder
    base = read_provenance(adapter_dir).get("base_model")
    return base if isinstance(base, str) and base else recorded


def run_folder_of(adapter_dir: str | os.PathLike | None) -> Path | None:
    """The `dpokit train` run an adapter belongs to: the nearest folder above it that holds config.yaml."""
    if adapter_dir is None:
        return None
    for folder in Path(adapter_dir).resolve().parents:
        if (folder / RUN_CONFIG).is_file():
            return folder
    return None
