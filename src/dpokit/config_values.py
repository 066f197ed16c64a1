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


class _Bad(ValueError):
    """A value that is not of the declared type; `coerce` names the key."""


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _Bad


def _to_number(kind: type) -> Any:
    """int or float from a number or its text; never from a bool, and an int only from a whole number."""

    def convert(value: Any) -> Any:
        if isinstance(value, bool):
            raise _Bad
        if isinstance(value, str):
            try:
                return kind(value.strip())
            except ValueError:
                raise _Bad from None
        if kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) or (kind is float and isinstance(value, float)):
            return kind(value)
        raise _Bad

    return convert


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise _Bad


def _to_mapping(value: Any) -> dict[str, str]:
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise _Bad from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise _Bad
    return dict(value)


_CONVERTERS: dict[Any, Any] = {bool: _to_bool, int: _to_number(int), float: _to_number(float), str: _to_str}


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert `value` (from YAML or a `key=value` string) to the declared type `tp`, or name the key and fail."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return coerce(key, value, inner)
    try:
        if origin is list:
            return _to_list(key, value, tp)
        if origin is dict:
            return _to_mapping(value)
        if tp not in _CONVERTERS:
            raise TypeError(f"no conversion for {tp}")
        return _CONVERTERS[tp](value)
    except _Bad:
        raise UserError(f"config key `{key}`: expected {describe_type(tp)}, got {value!r}") from None


def _to_list(key: str, value: Any, tp: Any) -> list[Any]:
    """A list, or comma-separated text, of the item type."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    (item,) = typing.get_args(tp)
    if not isinstance(value, list) or (item is str and not all(isinstance(v, str) for v in value)):
        raise _Bad
    return [coerce(key, v, item) for v in value]


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


def describe_keys(config_class: type) -> str:
    """Every key of a config dataclass with its default, type, meaning, choices and the commands besides train that
    read it, grouped, for `dpokit config`."""
    import dataclasses
    import textwrap

    lines: list[str] = []
    group = None
    types_ = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        if f.metadata["group"] != group:
            group = f.metadata["group"]
            lines.append(f"\n# {group}")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"{f.name}: {shown}    # {describe_type(types_[f.name])}")
        lines += [f"    # {chunk}" for chunk in textwrap.wrap(f.metadata["help"], 100)]
        if f.metadata["choices"]:
            lines.append(f"    # one of: {', '.join(f.metadata['choices'])}")
        if f.metadata.get("used_by"):
            lines.append(f"    # also read by: {', '.join(f.metadata['used_by'])}")
    return "\n".join(lines).lstrip() + "\n"
