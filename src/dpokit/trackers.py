"""The experiment trackers a run reports to (`report_to`): TensorBoard, Weights & Biases, Trackio and MLflow.

Each goes through accelerate's tracker for it (`accelerate.tracking`), which calls the tracker's own library, and
only the main process starts one, so a launch on several processes makes one run. Every tracker receives the rows
`metrics.jsonl` receives, under the same names, and the resolved config once at the start. All four work offline:
TensorBoard writes event files, `WANDB_MODE=offline` keeps a W&B run on disk for `wandb sync`, Trackio logs to its
local SQLite store (`TRACKIO_DIR`), and MLflow to a local SQLite store in the run folder (`mlflow.db`; MLflow 3
keeps its plain-file store only behind `MLFLOW_ALLOW_FILE_STORE`) unless `MLFLOW_TRACKING_URI` names another.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import yaml
from accelerate.tracking import GeneralTracker, MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker
from accelerate.tracking import on_main_process as _on_main_process

from dpokit.errors import UserError

PROJECT = "dpokit"  # the W&B / Trackio project and the MLflow experiment, unless their own variables name another
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
# tracker -> (module it needs, how to install it: TensorBoard comes with dpokit, the others are extras)
LIBRARIES = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install 'dpokit[wandb]'"),
    "trackio": ("trackio", "pip install 'dpokit[trackio]'"),
    "mlflow": ("mlflow", "pip install 'dpokit[mlflow]'"),
}


class TensorBoard(TensorBoardTracker):
    """accelerate's TensorBoard tracker, with the config stored as one text entry in the run's own event file (as
    transformers' callback stores its `args`) instead of a separate hparams run whose values must all be scalars."""

    @_on_main_process
    def store_init_configuration(self, values: dict[str, Any]) -> None:
        text = yaml.safe_dump(values, sort_keys=False)
        self.writer.add_text("config", "```\n" + text + "```")
        self.writer.flush()


def run_name(cfg: Any) -> str:
    """The run's name in every tracker: `run_name`, or the name of the output folder."""
    return cfg.run_name or Path(cfg.output_dir).resolve().name


def requested(cfg: Any) -> list[str]:
    """The trackers `report_to` names, without `none`."""
    return [name for name in cfg.report_to if name != "none"]


def check_installed(cfg: Any) -> None:
    """Fail before any work when a requested tracker's library is missing."""
    for name in requested(cfg):
        module, install = LIBRARIES[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(
                f"config key `report_to` names {name}, which needs the `{module}` package: {install} (or drop "
                f"{name} from report_to)"
            )


def build(cfg: Any) -> list[GeneralTracker]:
    """One accelerate tracker per name in `report_to`, not yet started."""
    out, name = Path(cfg.output_dir), run_name(cfg)
    makers = {
        "tensorboard": lambda: TensorBoard(TENSORBOARD_DIR, out),
        "wandb": lambda: WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), name=name, dir=str(out)),
        "trackio": lambda: TrackioTracker(os.environ.get("TRACKIO_PROJECT", PROJECT), name=name),
        "mlflow": lambda: MLflowTracker(experiment_name=PROJECT, run_name=name),
    }
    return [makers[tracker]() for tracker in requested(cfg)]


def mlflow_uri(output_dir: str | os.PathLike) -> str:
    """The run folder's own MLflow store."""
    return "sqlite:///" + str((Path(output_dir) / MLFLOW_DB).resolve())


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved config with only scalar values, which every tracker stores: lists joined, mappings as YAML."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, dict):
            value = yaml.safe_dump(value, default_flow_style=True).strip()
        flat[key] = value
    return flat


def start(acc: Any, cfg: Any) -> None:
    """Start the trackers on the main process and store the resolved config in each; `acc.log` then feeds them."""
    if not acc.is_main_process:
        return
    trackers = build(cfg)
    if any(t.name == "mlflow" for t in trackers) and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        mlflow.set_tracking_uri(mlflow_uri(cfg.output_dir))
    config = flat_config(cfg.to_dict())
    for tracker in trackers:
        tracker.start()
        acc.trackers.append(tracker)
        tracker.store_init_configuration(config)


def finish(acc: Any) -> None:
    """Close every tracker (W&B and MLflow mark their run finished)."""
    for tracker in acc.trackers:
        tracker.finish()
    acc.trackers.clear()
