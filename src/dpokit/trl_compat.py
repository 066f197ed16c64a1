"""Coming from TRL: its command-line habits, its YAML keys and its loss forms, mapped onto dpokit's config.

- `--beta 0.1`, `--beta=0.1`, `--use_peft` (a bare boolean), `--no_use_peft`, `--loss_type sigmoid sft` (a list)
  and `--config FILE.yaml` read as dpokit's `key=value` overrides and config file, so a `trl dpo` command line
  runs with the program name changed;
- a TRL `DPOConfig` YAML loads as it is: a TRL key dpokit lacks is named in a one-line warning (it has no effect),
  a TRL name for a dpokit key (`dataset_name`) is used as that key with a note, `env` sets environment variables
  as TRL's does, any other key stays an error;
- `loss_type` as one name becomes TRL's one-element list; `rpo_alpha`, TRL's former RPO key, becomes the `sft`
  term with that weight, with a note, so the saved config is in TRL's current form.
"""

from __future__ import annotations

import logging
import os
import types as types_module
import typing
from collections.abc import Sequence
from typing import Any

from dpokit.errors import UserError
from dpokit.trl_keys import TRL_ALIASES, TRL_KEYS

log = logging.getLogger(__name__)

_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def from_trl(values: dict[str, Any], ours: set[str]) -> dict[str, Any]:
    """`values` with TRL's names for dpokit keys renamed and TRL's keys that dpokit lacks dropped, each named on
    one line. Keys that are neither stay, for `config.build` to reject."""
    kept: dict[str, Any] = {}
    for key, value in values.items():
        alias = TRL_ALIASES.get(key)
        if key == "env" and key not in ours and isinstance(value, dict):
            # TRL's YAML sets these environment variables for the run (WANDB_PROJECT, HF_HOME, ...); so does dpokit
            for name, setting in value.items():
                os.environ[str(name)] = str(setting)
            log.info("config: `env` set %s", ", ".join(map(str, value)))
        elif key in ours:
            kept[key] = value
        elif alias is not None and alias not in values:
            log.info("config: `%s` is TRL's name for dpokit's `%s`; using it as %s", key, alias, alias)
            kept[alias] = value
        elif key in TRL_KEYS:
            log.warning("config: `%s` is a TRL option dpokit does not implement; it has no effect here", key)
        else:
            kept[key] = value
    return kept


def normalize_losses(cfg: Any) -> None:
    """TRL's forms, done once when a config is made: one loss name -> a list; `rpo_alpha` -> the `sft` term."""
    if isinstance(cfg.loss_type, str):
        cfg.loss_type = [cfg.loss_type]
    if cfg.rpo_alpha is None:
        return
    alpha = cfg.rpo_alpha
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha < 0:
        raise UserError(f"config key `rpo_alpha` = {alpha!r}: must be 0 or more")
    if "sft" in cfg.loss_type:
        raise UserError("config key `rpo_alpha`: loss_type already has sft; set its weight in loss_weights instead")
    weights = [1.0] * len(cfg.loss_type) if cfg.loss_weights is None else list(cfg.loss_weights)
    if len(weights) != len(cfg.loss_type):
        raise UserError(f"config key `loss_weights`: needs one weight per loss_type entry ({len(cfg.loss_type)})")
    cfg.loss_type = [*cfg.loss_type, "sft"]
    cfg.loss_weights = [*weights, float(alpha)]
    cfg.rpo_alpha = None
    log.info(
        "config: rpo_alpha=%s runs as TRL's loss_type=%s with loss_weights=%s",
        alpha,
        ",".join(cfg.loss_type),
        ",".join(f"{w:g}" for w in cfg.loss_weights),
    )


def _kind(key: str, types: dict[str, Any]) -> str:
    """How a flag takes its value: `bool` (optional value), `list` (every value up to the next flag) or `one`."""
    tp = types.get(key)
    union = typing.get_origin(tp) in (typing.Union, types_module.UnionType)
    args = [a for a in typing.get_args(tp) if a is not type(None)] if union else [tp]
    if bool in args:
        return "bool"
    if any(typing.get_origin(a) is list for a in args):
        return "list"
    return "one"


def flags_to_overrides(tokens: Sequence[str], types: dict[str, Any]) -> tuple[str | None, list[str]]:
    """TRL-style flags among `tokens` as `key=value` items: (the `--config` file or None, the other tokens in
    order, each flag turned into one `key=value`). `types` are the declared types of dpokit's keys."""
    config_file, out, i = None, [], 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not token.startswith("--") or token == "--":
            out.append(token)
            continue
        key, sep, value = token[2:].partition("=")
        key = key.replace("-", "_")
        values = [value] if sep else []
        if not sep:
            kind = _kind(key, types)
            if key.startswith("no_") and key not in types and _kind(key[3:], types) == "bool":
                key, values = key[3:], ["false"]
            elif kind == "bool":
                if i < len(tokens) and tokens[i].strip().lower() in _BOOL_WORDS:
                    values, i = [tokens[i]], i + 1
                else:
                    values = ["true"]
            else:
                while i < len(tokens) and not tokens[i].startswith("--") and (kind == "list" or not values):
                    values.append(tokens[i])
                    i += 1
        if not values:
            raise UserError(f"cannot read `{token}`: give it a value, e.g. `{token} VALUE` or `{token}=VALUE`")
        if key == "config":
            config_file = values[0]
        else:
            out.append(f"{key}={','.join(values)}")
    return config_file, out
