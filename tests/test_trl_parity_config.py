"""A TRL config carries over: its YAML and its `trl dpo` command line give dpokit the config its own form gives,
and TRL itself (its `TrlParser`) reads the same files and flags to the same values."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from dpokit import cli
from dpokit.config import keys, load_config
from dpokit.errors import UserError
from dpokit.trl_keys import TRL_ALIASES, TRL_KEYS

trl = pytest.importorskip("trl")

# a TRL 1.16 DPO config as TRL's docs write one: its keys, its list forms, some options dpokit does not have
TRL_YAML = """\
model_name_or_path: builtin:smollm2-135m-instruct
dataset_name: pairs.jsonl
dataset_train_split: train
output_dir: runs/from-trl
learning_rate: 5.0e-7
per_device_train_batch_size: 2
gradient_accumulation_steps: 8
num_train_epochs: 1
beta: 0.05
loss_type: [sigmoid, bco_pair, sft]
loss_weights: [0.8, 0.2, 1.0]
ld_alpha: 0.5
max_length: 512
logging_steps: 5
gradient_checkpointing: true
use_peft: true
lora_r: 32
lora_alpha: 16
lora_target_modules: [q_proj, v_proj]
push_to_hub: false
eval_strategy: "no"
dtype: bfloat16
"""
NOT_IN_DPOKIT = {"push_to_hub", "eval_strategy", "dtype"}  # (report_to and run_name may be dpokit's own)
OURS = {
    "model_name_or_path": "builtin:smollm2-135m-instruct",
    "train_data": "pairs.jsonl",
    "train_split": "train",
    "output_dir": "runs/from-trl",
    "learning_rate": 5e-7,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 8,
    "num_train_epochs": 1.0,
    "beta": 0.05,
    "loss_type": ["sigmoid", "bco_pair", "sft"],
    "loss_weights": [0.8, 0.2, 1.0],
    "ld_alpha": 0.5,
    "max_length": 512,
    "logging_steps": 5,
    "gradient_checkpointing": True,
    "use_peft": True,
    "lora_r": 32,
    "lora_alpha": 16,
    "lora_target_modules": ["q_proj", "v_proj"],
}
TRL_FLAGS = [
    "--model_name_or_path", "builtin:smollm2-135m-instruct", "--dataset_name", "pairs.jsonl", "--output_dir",
    "runs/from-trl", "--learning_rate", "5e-7", "--per_device_train_batch_size=2", "--gradient_accumulation_steps",
    "8", "--num_train_epochs", "1", "--beta", "0.05", "--loss_type", "sigmoid", "bco_pair", "sft", "--loss_weights",
    "0.8", "0.2", "1.0", "--ld_alpha", "0.5", "--max_length", "512", "--logging_steps", "5",
    "--gradient_checkpointing", "--use_peft", "--lora_r", "32", "--lora_alpha", "16", "--lora_target_modules",
    "q_proj", "v_proj",
]  # fmt: skip


def trl_parse(args: list[str]) -> dict:
    """What `trl dpo` makes of these arguments: its DPO script's three dataclasses, merged."""
    parser = trl.TrlParser((trl.ScriptArguments, trl.DPOConfig, trl.ModelConfig))
    # use_cpu: TRL refuses its bf16 default on a machine without a bf16 GPU
    parsed = parser.parse_args_and_config([*args, "--use_cpu"], return_remaining_strings=True)[:3]
    return {k: v for d in parsed for k, v in vars(d).items()}


def cli_config(capsys: pytest.CaptureFixture, *args: str) -> dict:
    assert cli.main(["config", *args]) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.fixture
def trl_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "trl_dpo.yaml"
    path.write_text(TRL_YAML)
    return path


def test_trl_yaml_loads_as_our_own_form(trl_yaml: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        cfg = load_config(trl_yaml)
    assert cfg == load_config(None, OURS)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sorted(warned) == sorted(
        f"config: `{k}` is a TRL option dpokit does not implement; it has no effect here" for k in NOT_IN_DPOKIT
    )  # each named once, on one line
    assert any("`dataset_name` is TRL's name for dpokit's `train_data`" in r.getMessage() for r in caplog.records)


def test_trl_reads_the_same_yaml_to_the_same_values(trl_yaml: Path) -> None:
    theirs, cfg = trl_parse(["--config", str(trl_yaml)]), load_config(trl_yaml).to_dict()
    names = {TRL_ALIASES.get(k, k): k for k in yaml.safe_load(TRL_YAML)}
    for ours, trl_name in names.items():
        if ours in cfg:
            assert cfg[ours] == theirs[trl_name], ours


def test_trl_command_line_gives_the_same_config(capsys: pytest.CaptureFixture, trl_yaml: Path) -> None:
    ours = [f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in OURS.items()]
    assert cli_config(capsys, *TRL_FLAGS) == cli_config(capsys, *ours)
    theirs = trl_parse(TRL_FLAGS)
    assert cli_config(capsys, *TRL_FLAGS)["loss_weights"] == theirs["loss_weights"] == [0.8, 0.2, 1.0]
    assert theirs["use_peft"] is True and theirs["loss_type"] == ["sigmoid", "bco_pair", "sft"]
    # --config FILE with flags over it, as `trl dpo` takes them
    mixed = cli_config(capsys, "--config", str(trl_yaml), "--beta=0.2", "--no_gradient_checkpointing")
    assert mixed == {**load_config(trl_yaml).to_dict(), "beta": 0.2, "gradient_checkpointing": False}
    assert cli_config(capsys, str(trl_yaml), "beta=0.2", "--gradient_checkpointing", "false") == mixed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--beta"], "cannot read `--beta`: give it a value"),
        (["--learnin_rate", "1"], "unknown config key `learnin_rate` (did you mean `learning_rate`?)"),
        (["--beta", "abc"], "config key `beta`: expected a number"),
        (["--loss_type", "sigmoid", "dpo"], "config key `loss_type` = 'dpo': must be one of"),
    ],
)
def test_flag_mistakes_are_one_line_errors(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_unknown_keys_that_are_not_trls_stay_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("beta: 0.1\nbeta_schedule: cosine\n")
    with pytest.raises(UserError, match="unknown config key `beta_schedule`"):
        load_config(path)


def test_env_sets_environment_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.delenv("DPOKIT_TEST_ENV", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text("env:\n  DPOKIT_TEST_ENV: from-yaml\nbeta: 0.3\n")
    assert load_config(path).beta == 0.3
    assert os.environ["DPOKIT_TEST_ENV"] == "from-yaml"
    monkeypatch.delenv("DPOKIT_TEST_ENV")


def test_trl_key_list_is_trls() -> None:
    """The list of TRL's names equals the installed TRL's, so no TRL key is mistaken for a typo or missed."""
    import dataclasses

    fields = {f.name for c in (trl.DPOConfig, trl.ScriptArguments, trl.ModelConfig) for f in dataclasses.fields(c)}
    assert fields == TRL_KEYS
    assert set(TRL_ALIASES) <= TRL_KEYS and set(TRL_ALIASES.values()) <= {f.name for f in keys()}
