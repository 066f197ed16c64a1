"""`report_to`: one real run logs to TensorBoard, W&B (offline), Trackio (local store) and MLflow (local store),
and each tracker's own reader finds the rows of metrics.jsonl under the same names, and the resolved config."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dpokit.config import load_config
from dpokit.errors import UserError
from dpokit.sft_config import load_sft_config
from dpokit.trackers import flat_config, mlflow_uri

SRC = str(Path(__file__).resolve().parents[1] / "src")
CHECKED = ("loss", "rewards/margins", "logps/chosen", "grad_norm", "learning_rate")


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    """A 3-step `dpokit train` reporting to all four trackers, all offline."""
    from conftest import conversational_rows, write_jsonl

    tmp = tmp_path_factory.mktemp("tracked")
    data = write_jsonl(tmp / "pairs.jsonl", conversational_rows(12))
    out = tmp / "run"
    env = {
        **os.environ,
        "PYTHONPATH": SRC,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "TRACKIO_DIR": str(tmp / "trackio"),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [
        f"model_name_or_path={tiny_model_dir}",
        f"train_data={data}",
        f"output_dir={out}",
        "max_steps=3",
        "per_device_train_batch_size=4",
        "logging_steps=1",
        "learning_rate=1e-3",
        "bf16=false",
        "report_to=tensorboard,wandb,trackio,mlflow",
        "run_name=tracked-run",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "dpokit", "train", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"out": out, "rows": rows, "trackio": tmp / "trackio"}


def expect(rows: list[dict[str, Any]], got: dict[int, dict[str, float]]) -> None:
    """Every tracked step has every checked metric of metrics.jsonl, to float32 precision."""
    assert sorted(got) == [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        for key in CHECKED:
            assert got[row["step"]][key] == pytest.approx(row[key], rel=1e-6, abs=1e-9), (row["step"], key)


def test_tensorboard_reads_back(tracked_run: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run["out"] / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    got: dict[int, dict[str, float]] = {}
    for key in CHECKED:
        for event in events.Scalars(key):
            got.setdefault(event.step, {})[key] = event.value
    expect(tracked_run["rows"], got)
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "learning_rate: 0.001" in config and "report_to: tensorboard,wandb,trackio,mlflow" in config


def wandb_records(path: Path) -> list[Any]:
    """The records of a `.wandb` file: W&B's 7-byte header, then LevelDB-log blocks of protobuf `Record`s (wandb
    0.31 ships no Python reader for its own file any more, only the protobuf definitions)."""
    from wandb.proto import wandb_internal_pb2 as pb

    block, data = 32768, path.read_bytes()
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        room = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if room < 7 or (length == 0 and kind == 0):  # the rest of a block is padding
            pos += room
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL record or the LAST piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_reads_back(tracked_run: dict[str, Any]) -> None:
    (path,) = (tracked_run["out"] / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(path)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.display_name, run.project) == ("tracked-run", "dpokit")
    got: dict[int, dict[str, float]] = {}
    config: dict[str, Any] = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            # W&B keeps a key with a slash as a nested key
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            got[items["_step"]] = {k: items[k] for k in CHECKED}
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
    expect(tracked_run["rows"], got)
    assert config["learning_rate"] == 0.001 and config["max_steps"] == 3


def test_trackio_local_store_reads_back(tracked_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from trackio import sqlite_storage

    monkeypatch.setattr(sqlite_storage, "TRACKIO_DIR", tracked_run["trackio"])
    assert sqlite_storage.SQLiteStorage.get_runs("dpokit") == ["tracked-run"]
    logs = sqlite_storage.SQLiteStorage.get_logs("dpokit", "tracked-run")
    expect(tracked_run["rows"], {row["step"]: {k: row[k] for k in CHECKED} for row in logs if "loss" in row})
    config = sqlite_storage.SQLiteStorage.get_run_config("dpokit", "tracked-run")
    assert config["learning_rate"] == 0.001 and config["report_to"] == "tensorboard,wandb,trackio,mlflow"


def test_mlflow_local_store_reads_back(tracked_run: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri(tracked_run["out"]))
    (run,) = client.search_runs([client.get_experiment_by_name("dpokit").experiment_id])
    assert run.info.run_name == "tracked-run" and run.info.status == "FINISHED"
    got: dict[int, dict[str, float]] = {}
    for key in CHECKED:
        for metric in client.get_metric_history(run.info.run_id, key):
            got.setdefault(metric.step, {})[key] = metric.value
    expect(tracked_run["rows"], got)
    assert float(run.data.params["learning_rate"]) == 0.001 and run.data.params["report_to"].startswith("tensorb")


def test_report_to_keys() -> None:
    assert load_config(None, ["report_to=none"]).report_to == ["none"]
    assert load_sft_config(None, ["report_to=wandb,mlflow"]).report_to == ["wandb", "mlflow"]
    with pytest.raises(UserError, match="report_to"):
        load_config(None, ["report_to=tensorboard,comet"])
    with pytest.raises(UserError, match="report_to"):
        load_config(None, ["report_to=none,wandb"])
    flat = flat_config(load_config(None, ["columns={chosen: a, rejected: b}"]).to_dict())
    assert flat["report_to"] == "tensorboard" and flat["lora_target_modules"] == "all-linear"
    assert all(v is None or isinstance(v, str | int | float | bool) for v in flat.values())
    assert not math.isnan(flat["learning_rate"])


def test_report_to_none_writes_no_tracker(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    from dpokit.train import train

    out = tmp_path / "quiet"
    args = [f"model_name_or_path={tiny_model_dir}", f"train_data={pairs_file}", f"output_dir={out}", "max_steps=1"]
    train(load_config(None, [*args, "report_to=none", "bf16=false", "per_device_train_batch_size=2"]))
    assert (out / "metrics.jsonl").is_file() and not (out / "tensorboard").exists()
