"""One settings model: every command reads what training saved, names where each value came from, and gets its
flags from the key declarations."""

from __future__ import annotations

import argparse
import json
import shutil
import typing
from pathlib import Path
from typing import Any

import pytest

from conftest import conversational_rows, write_jsonl
from dpokit.cli import build_parser, main
from dpokit.config import DPOConfig, keys, load_config
from dpokit.data.encode import encode_pairs
from dpokit.data.load import load_pairs
from dpokit.models import load_tokenizer
from dpokit.settings import flag_of, view
from dpokit.train import train

COMMANDS = ("eval", "compare", "vibe", "chat", "generate", "merge", "data inspect", "data prepare")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    """A real `dpokit train` run with a non-default beta and `length_policy: drop` under a limit some pairs pass."""
    root = tmp_path_factory.mktemp("settings")
    data = write_jsonl(root / "pairs.jsonl", conversational_rows(16))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    pairs = encode_pairs(tokenizer, load_pairs(str(data)).pairs)
    lengths = sorted(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    limit = lengths[len(lengths) // 2]  # about half the pairs are longer
    out = root / "run"
    overrides = [
        f"model_name_or_path={tiny_model_dir}",
        f"train_data={data}",
        f"output_dir={out}",
        "beta=0.3",
        "length_policy=drop",
        f"max_length={limit}",
        "max_steps=2",
        "per_device_train_batch_size=2",
        "learning_rate=1e-2",
        "bf16=false",
        "report_to=none",
    ]
    train(load_config(None, overrides))
    return {"root": root, "data": data, "run": out, "kept": sum(n <= limit for n in lengths)}


def _eval(capsys: pytest.CaptureFixture, *argv: str) -> tuple[dict, str]:
    assert main(["eval", *argv, "--no-bf16"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_eval_drops_what_training_dropped(trained: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    result, err = _eval(capsys, "--adapter", str(trained["run"] / "adapter"), "--data", str(trained["data"]))
    kept = trained["kept"]
    assert 0 < kept < 16
    assert result["pairs"] == kept  # dropped as in training, not truncated
    assert result["length_policy"] == {"dropped: over max_length": 16 - kept}
    assert result["beta"] == 0.3
    assert "length_policy = 'drop'" in err and "dpokit.json" in err  # printed with its source


def test_eval_of_a_moved_adapter_reads_its_saved_beta(trained: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    moved = trained["root"] / "elsewhere" / "adapter"
    shutil.copytree(trained["run"] / "adapter", moved)  # outside any run folder: no config.yaml above it
    result, err = _eval(capsys, "--adapter", str(moved), "--data", str(trained["data"]))
    assert result["beta"] == 0.3 and result["settings_from"]["beta"] == str(moved / "dpokit.json")
    assert result["pairs"] == trained["kept"]
    flagged, _ = _eval(capsys, "--adapter", str(moved), "--data", str(trained["data"]), "--beta", "0.05")
    assert flagged["beta"] == 0.05 and flagged["settings_from"]["beta"] == "--beta"
    # the flag only rescales the rewards
    assert flagged["rewards/margins"] == pytest.approx(result["rewards/margins"] * 0.05 / 0.3, rel=1e-5)


def test_a_bad_flag_value_names_the_flag(trained: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    argv = ["eval", "--adapter", str(trained["run"] / "adapter"), "--data", str(trained["data"]), "--max-length", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dpokit: error: --max-length 1: must be at least 2 tokens"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    return dict(sub.choices) if sub is not None else {}


def _commands() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser, by the name keys use for it: `eval`, `data inspect`, ..."""
    commands = {}
    for name, parser in _subparsers(build_parser()).items():
        commands[name] = parser
        commands.update({f"{name} {sub}": p for sub, p in _subparsers(parser).items()})
    return commands


def _subparser(name: str) -> argparse.ArgumentParser:
    return _commands()[name]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_of_a_shared_key_comes_from_its_declaration(command: str) -> None:
    """A command has a flag for each key that names it in `used_by`, and no hand-made flag for any other key."""
    declared = {f.name: f for f in keys()}
    types_ = typing.get_type_hints(DPOConfig)
    flags = {a.dest: a for a in _subparser(command)._actions if a.dest in declared}
    expected = {f.name for f in view(command)} - ({"model_name_or_path"} if command == "compare" else set())
    assert set(flags) == expected
    for key, action in flags.items():
        field = declared[key]
        assert flag_of(key) in action.option_strings
        assert action.default is None  # the run's value, else the declared default
        assert f"key {key};" in action.help
        if field.metadata["choices"]:
            assert tuple(action.choices) == field.metadata["choices"]
        assert (action.nargs == "+") == (typing.get_origin(types_[key]) is list)


def test_keys_name_only_commands_that_exist() -> None:
    commands = set(_commands())
    for f in keys():
        assert set(f.metadata["used_by"]) <= commands, f.name


def test_data_inspect_reads_a_training_config(
    trained: dict[str, Any], tiny_model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """`--config` gives the data commands training's model, limits and policy; a flag still wins."""
    config = trained["run"] / "config.yaml"  # the resolved config the run saved
    argv = ["data", "inspect", str(trained["data"]), "--config", str(config), "--json"]
    assert main(argv) == 0
    stats = json.loads(capsys.readouterr().out)
    limits = load_config(config)
    assert stats["tokenizer"] == str(tiny_model_dir)
    assert stats["length_limits"]["max_length"] == limits.max_length
    assert stats["length_limits"]["effects"] == {"dropped: over max_length": 16 - trained["kept"]}
    assert main([*argv, "--length-policy", "truncate", "--max-length", "4096"]) == 0
    assert json.loads(capsys.readouterr().out)["length_limits"]["effects"] == {}
