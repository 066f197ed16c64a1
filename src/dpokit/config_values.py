"""Raw config values (YAML, `key=value` text, TRL-style flags) and their conversion to the declared types.

Nothing here knows the keys: `dpokit.config` declares them and converts through `coerce`.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from dpokit.errors import UserError

# --- conversion of raw values to declared types ---------------------------------------------------------------------

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"", "null", "none", "~"}


def describe_type(tp: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    return str(tp)


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert `value` (from YAML or a `key=value` string) to the declared type `tp`, or name the key and fail."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        return coerce(key, value, args[0])
    bad = UserError(f"config key `{key}`: expected {describe_type(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise bad
    if origin is list:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(tp)
        if item is str and not all(isinstance(v, str) for v in value):
            raise bad
        return [coerce(key, v, item) for v in value]
    if origin is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise bad from None
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise bad
        return dict(value)
    raise TypeError(f"no conversion for {tp}")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["beta=0.2", "use_peft=false"]` -> `{"beta": "0.2", "use_peft": "false"}`; values stay text until `build`."""
    values: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"cannot read `{item}`: overrides are written key=value, e.g. beta=0.1")
        values[key.strip()] = value
    return values


def split_settings(settings: Sequence[str], types_: dict[str, Any]) -> tuple[str | None, list[str]]:
    """`[CONFIG.yaml] [key=value ...]` -> (config path or None, overrides). TRL's `--key value` and `--config FILE`
    are read too (`trl_compat`)."""
    from dpokit.trl_compat import flags_to_overrides

    path, settings = flags_to_overrides(settings, types_)
    if path is not None and settings and "=" not in settings[0]:
        raise UserError(f"cannot read `{settings[0]}`: the config file is already given with --config {path}")
    overrides = []
    for i, item in enumerate(settings):
        if "=" in item:
            overrides.append(item)
        elif i == 0:
            path = item
        else:
            raise UserError(f"cannot read `{item}`: give the config file first, then key=value overrides")
    return path, overrides


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise UserError(f"config file {p} is not valid YAML{where}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"config file {p} must be a mapping of key: value, got {type(raw).__name__}")
    return raw
