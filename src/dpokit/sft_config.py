"""The keys of `dpokit sft`: the shared keys of `dpokit.config.DPOConfig` (model, data, train, LoRA, speed), minus the
DPO-only ones, and SFT's own below; loaded and validated the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dpokit import config_values
from dpokit.config import DPOConfig, keys, option
from dpokit.config_checks import validate, validate_sft
from dpokit.config_values import coerce, describe_keys, parse_overrides, read_yaml
from dpokit.errors import UserError

# Keys only DPO reads: `dpokit sft` refuses them rather than ignore them.
NOT_FOR_SFT = ("prefix_sharing", "max_prompt_length")
# Where SFT's defaults differ from DPO's (TRL's SFTConfig also trains at 2e-5).
SFT_DEFAULTS: dict[str, Any] = {"output_dir": "runs/sft", "learning_rate": 2e-5}


@dataclass
class SFTConfig(DPOConfig):
    """Everything `dpokit sft` needs: the shared keys of `DPOConfig` (model, data, train, LoRA, speed) and the SFT
    keys below. Build it with `load_sft_config`, which refuses DPO-only keys and applies `SFT_DEFAULTS`."""

    # --- sft (dpokit sft only) ---------------------------------------------------------------------------------
    sft_on: str | None = option(
        None,
        "Train on preference data: `chosen` reads `train_data` as pairs (any layout `dpokit train` takes) and "
        "fine-tunes on prompt + chosen response. Empty: the rows are SFT examples (messages, ShareGPT "
        "conversations, prompt/completion, Alpaca instruction/input/output, or text).",
        "sft",
        choices=("chosen",),
    )
    completion_only_loss: bool | None = option(
        None,
        "Loss only on the completion of prompt/completion examples (Alpaca outputs and `sft_on: chosen` responses "
        "count as completions). Empty, TRL's default: true for prompt/completion data, whole sequence otherwise.",
        "sft",
    )
    assistant_only_loss: bool | None = option(
        None,
        "Loss only on the assistant turns of conversational examples. Empty: true for conversational data (the "
        "model learns to answer, not to write the user's turns); `false` trains every token, as TRL's default does. "
        "The turns are found by rendering the conversation one message at a time, so any chat template works.",
        "sft",
    )
    packing: bool = option(
        False,
        "Pack several examples into each training row of up to `max_length` tokens (best-fit decreasing, as TRL's "
        "`bfd`); each example attends only to itself. A batch then counts rows, not examples.",
        "sft",
    )
    dataset_text_field: str = option("text", "Column of plain-text examples (language modelling on all tokens).", "sft")

    def __post_init__(self) -> None:
        validate(self)
        validate_sft(self)

    def to_dict(self) -> dict[str, Any]:
        """The keys an SFT run reads: DPO-only keys are left out."""
        unused = set(NOT_FOR_SFT) | {f.name for f in keys() if f.metadata["group"] == "dpo"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in unused}


def load_sft_config(
    path: str | os.PathLike | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> SFTConfig:
    """`load_config` for `dpokit sft`: SFT's defaults, then the YAML file, then overrides; DPO-only keys refused."""
    values = read_yaml(path) if path is not None else {}
    values.update(overrides if isinstance(overrides, dict) else parse_overrides(overrides or []))
    types_ = typing.get_type_hints(SFTConfig)
    dpo_only = set(NOT_FOR_SFT) | {f.name for f in keys() if f.metadata["group"] == "dpo"}
    converted = dict(SFT_DEFAULTS)
    for key, value in values.items():
        if key in dpo_only:
            raise UserError(f"config key `{key}` is a DPO setting that dpokit sft does not use; remove it")
        if key not in types_:
            close = difflib.get_close_matches(key, [k for k in types_ if k not in dpo_only], n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise UserError(f"unknown config key `{key}`{hint}; `dpokit config` lists every key")
        converted[key] = coerce(key, value, types_[key])
    return SFTConfig(**converted)


def field_types() -> dict[str, Any]:
    """Every key's declared type, SFT's own included (for reading TRL-style flags)."""
    return typing.get_type_hints(SFTConfig)


def split_settings(settings: Sequence[str]) -> tuple[str | None, list[str]]:
    """`config.split_settings` with SFT's keys known to the TRL-style flags."""
    return config_values.split_settings(settings, field_types())


def describe() -> str:
    """Every key with its default and meaning, grouped, for `dpokit config`: the shared and DPO keys, then SFT's."""
    return describe_keys(SFTConfig)
