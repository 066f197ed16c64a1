"""Every command's settings are a view of the one config (`dpokit.config.DPOConfig`).

A key declares, where it is declared, the commands besides train that read it (`used_by`). Such a command gets the
key's flag from here: its name (`--max-length` for `max_length`), type, choices and help all come from the
declaration. Its values come, in order, from the defaults, from what training saved (an adapter's dpokit.json, else
its run folder's config.yaml), and from the flags given; the result is validated once, as a `DPOConfig`, and each
value's source is printed at start.

    dpokit eval --adapter runs/dpo/adapter --data test.jsonl
      beta = 0.3                  runs/dpo/adapter/dpokit.json
      length_policy = drop        runs/dpo/adapter/dpokit.json
      per_device_eval_batch_size = 4   --batch-size
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpokit.config import DPOConfig, keys
from dpokit.config_values import coerce, read_yaml
from dpokit.errors import UserError
from dpokit.runs import PROVENANCE_FILE, RUN_CONFIG, adapter_base_model, read_provenance, run_folder_of

# Flags that keep a shorter name than their key's, the name users know from the commands' first versions.
FLAG_NAMES = {
    "model_name_or_path": "--model",
    "per_device_eval_batch_size": "--batch-size",
    "train_split": "--split",
    "eval_split": "--split",
    "train_data_config": "--data-config",
    "eval_data_config": "--data-config",
}
DEFAULTS = "default"
# Where a command's default differs from the key's: `data prepare` filters by length only when asked.
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {"data prepare": {"max_length": None}}
# Keys of which at most one is on: a flag turning one on turns off the other one a run saved.
EXCLUSIVE = (("load_in_4bit", "load_in_8bit"),)


def view(command: str) -> list[dataclasses.Field]:
    """The keys `command` reads, in declaration order."""
    return [f for f in keys() if command in f.metadata["used_by"]]


def flag_of(key: str) -> str:
    return FLAG_NAMES.get(key, "--" + key.replace("_", "-"))


def add_flags(parser: argparse.ArgumentParser, command: str, skip: tuple[str, ...] = ()) -> None:
    """One flag per key of the command's view (except `skip`, which the command names per model, as compare's
    --model-a does), each defaulting to None: the run's value, else the key's default."""
    types_ = typing.get_type_hints(DPOConfig)
    group = parser.add_argument_group("settings (default: the trained run's, else the config default)")
    for f in view(command):
        if f.name in skip:
            continue
        names = [flag_of(f.name)]
        if names[0] != "--" + f.name.replace("_", "-"):
            names.append("--" + f.name.replace("_", "-"))
        default = COMMAND_DEFAULTS.get(command, {}).get(f.name, _default(f))
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": _help(f, default)}
        tp = _plain(types_[f.name])
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.metadata["choices"]:
            kwargs["choices"] = f.metadata["choices"]
        else:
            kwargs["metavar"] = {int: "N", float: "X"}.get(tp, "TEXT")
        if typing.get_origin(tp) is list:
            kwargs["nargs"] = "+"
            if f.metadata["choices"]:  # the usage line names the key; the help lists the choices
                kwargs["metavar"] = f.name.upper()
                kwargs["help"] += f"; one or more of {', '.join(f.metadata['choices'])}"
        group.add_argument(*names, **kwargs)


def _plain(tp: Any) -> Any:
    """`int | None` -> int."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, type(int | None)) and len(args) == 1 else tp


def _help(f: dataclasses.Field, default: Any) -> str:
    first = re.split(r"(?<=[^.]{3}\.) (?=[A-Z])", f.metadata["help"], maxsplit=1)[0]  # not at "e.g. `x`"
    return f"{first} (key {f.name}; default: the run's, else {default!r})".replace("%", "%%")


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


@dataclass(frozen=True)
class Settings:
    """A command's resolved view: the validated config and where each value of the view came from."""

    config: DPOConfig
    sources: dict[str, str]

    def announce(self, title: str) -> None:
        """Print the view and the source of each value, on stderr, from the main process."""
        from dpokit.console import make_console
        from dpokit.distributed import launch_rank

        make_console(launch_rank() == 0).print(f"{title} settings:\n" + "\n".join(self.lines()), markup=False)

    def lines(self) -> list[str]:
        """`key = value    source`, one per key of the view."""
        width = max((len(f"{k} = {getattr(self.config, k)!r}") for k in self.sources), default=0)
        return [f"  {k} = {getattr(self.config, k)!r}".ljust(width + 4) + f"  {src}" for k, src in self.sources.items()]


def saved_settings(adapter: str | None, config: str | None = None) -> tuple[dict[str, Any], str | None]:
    """What training saved about an adapter: dpokit.json's settings when it carries them (wherever the adapter now
    is), else the config.yaml of the run folder it sits in; or a training config file given with --config;
    ({}, None) when there is none."""
    if config is not None:
        return read_yaml(config), config
    if adapter is None:
        return {}, None
    saved = read_provenance(adapter).get("settings")
    if isinstance(saved, dict):
        return saved, str(Path(adapter) / PROVENANCE_FILE)
    run_dir = run_folder_of(adapter)
    if run_dir is not None:
        return read_yaml(run_dir / RUN_CONFIG), str(run_dir / RUN_CONFIG)
    return {}, None


def resolve(command: str, args: argparse.Namespace, adapter: str | None, skip: tuple[str, ...] = ()) -> Settings:
    """The command's settings for a model with `adapter` (or none): defaults, then what training saved (or the
    file of `args.config`), then the flags in `args`. Errors name the flag when a flag gave the value, else the file
    it came from."""
    saved, saved_from = saved_settings(adapter, getattr(args, "config", None))
    given: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for f in view(command):
        if f.name in skip:
            continue
        if getattr(args, f.name, None) is not None:
            given[f.name], sources[f.name] = getattr(args, f.name), flag_of(f.name)
        elif f.name in saved and saved_from is not None:
            given[f.name], sources[f.name] = saved[f.name], saved_from
        elif f.name in COMMAND_DEFAULTS.get(command, {}):
            given[f.name], sources[f.name] = COMMAND_DEFAULTS[command][f.name], f"default of {command}"
        else:
            sources[f.name] = DEFAULTS
    for pair in EXCLUSIVE:
        for key, other in (pair, pair[::-1]):
            if given.get(key) is True and sources.get(key, "").startswith("--") and not sources[other].startswith("--"):
                given[other], sources[other] = False, f"off: {flag_of(key)}"
    if sources.get("model_name_or_path") == DEFAULTS and adapter is not None:
        given["model_name_or_path"] = adapter_base_model(adapter)  # dpokit.json's base, else adapter_config.json's
        sources["model_name_or_path"] = str(Path(adapter))
    types_ = typing.get_type_hints(DPOConfig)
    try:
        values = {key: coerce(key, value, types_[key]) for key, value in given.items()}
        return Settings(DPOConfig(**values), sources)
    except UserError as e:
        raise UserError(_name_source(str(e), sources)) from None


def _name_source(message: str, sources: dict[str, str]) -> str:
    """`config key `max_length` = 1: ...` -> `--max-length 1: ...`, or with `(from FILE)` for a saved value."""
    match = re.match(r"config key `(\w+)`", message)
    if match is None or match.group(1) not in sources:
        return message
    key, source = match.group(1), sources[match.group(1)]
    if source.startswith("--"):
        return message.replace(f"config key `{key}` =", source, 1).replace(f"config key `{key}`", source, 1)
    return f"{message} (from {source})"
