"""dpokit: align language models with preferences through Direct Preference Optimization.

From Python, `train(load_config("config.yaml", ["beta=0.2"]))` does exactly what `dpokit train config.yaml
beta=0.2` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["DPOConfig", "load_config", "train", "__version__"]

if TYPE_CHECKING:
    from dpokit.config import DPOConfig, load_config
    from dpokit.train import train


def __getattr__(name: str) -> Any:
    # Imported on first use: `import dpokit` stays light and the CLI answers --help at once.
    if name in ("DPOConfig", "load_config"):
        from dpokit import config

        return getattr(config, name)
    if name == "train":
        from dpokit.train import train

        return train
    raise AttributeError(f"module 'dpokit' has no attribute {name!r}")
