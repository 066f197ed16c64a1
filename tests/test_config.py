"""The config: types from YAML and key=value text, unknown keys, bad values, and the printed key list."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dpokit.cli import main
from dpokit.config import DPOConfig, keys, load_config, save_config
from dpokit.errors import UserError
from dpokit.sft_config import describe

TRL_KEYS = """
    model_name_or_path train_data eval_data output_dir learning_rate per_device_train_batch_size
    per_device_eval_batch_size gradient_accumulation_steps num_train_epochs max_steps warmup_ratio lr_scheduler_type
    max_grad_norm beta loss_type label_smoothing max_length max_prompt_length seed logging_steps eval_steps save_steps
    gradient_checkpointing bf16 precompute_ref_log_probs use_peft lora_r lora_alpha lora_dropout lora_target_modules
    simpo_gamma rpo_alpha
""".split()


def test_every_key_the_issue_names_exists() -> None:
    names = {f.name for f in keys()}
    assert set(TRL_KEYS) <= names


def test_text_overrides_get_their_declared_types() -> None:
    cfg = load_config(
        None,
        [
            "learning_rate=1e-5",
            "use_peft=false",
            "max_steps=7",
            "bf16=",
            "lora_target_modules=q_proj,v_proj",
            "columns={prompt: q, chosen: a, rejected: b}",
        ],
    )
    assert cfg.learning_rate == 1e-5 and cfg.use_peft is False and cfg.max_steps == 7 and cfg.bf16 is None
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.columns == {"prompt": "q", "chosen": "a", "rejected": "b"}


def test_yaml_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-5\nbeta: 0.2\nlora_target_modules: [q_proj]\n")  # YAML reads 1e-5 as text
    cfg = load_config(path, ["beta=0.3"])
    assert (cfg.learning_rate, cfg.beta, cfg.lora_target_modules) == (1e-5, 0.3, ["q_proj"])


def test_saved_config_loads_back_identical(tmp_path: Path) -> None:
    cfg = load_config(None, ["beta=0.25", "loss_type=ipo", "rpo_alpha=0.5"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("learnin_rate=1", "unknown config key `learnin_rate` (did you mean `learning_rate`?)"),
        ("beta=abc", "config key `beta`: expected a number, got 'abc'"),
        ("beta=0", "config key `beta` = 0.0: must be positive"),
        ("use_peft=maybe", "config key `use_peft`: expected true or false"),
        ("loss_type=dpo", "config key `loss_type` = 'dpo': must be one of sigmoid"),
        ("per_device_train_batch_size=0", "`per_device_train_batch_size` = 0: must be at least 1"),
        ("max_steps=2.5", "config key `max_steps`: expected an integer"),
        ("label_smoothing=0.1", "is used only by loss_type aot, aot_unpaired, exo_pair, robust"),
        ("label_smoothing=0.6", "must be in [0, 0.5)"),
        ("data_format=xml", "config key `data_format` = 'xml'"),
        ("warmup_ratio=1.5", "must be in [0, 1)"),
        ("notakeyvalue", None),
    ],
)
def test_bad_values_name_the_key(override: str, message: str | None) -> None:
    with pytest.raises(UserError) as e:
        load_config(None, [override])
    if message:
        assert message in str(e.value)


def test_python_construction_is_validated_too() -> None:
    with pytest.raises(UserError, match="lora_r"):
        DPOConfig(lora_r=0)


def test_bad_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("beta: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_config(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_config(path)
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_describe_lists_every_key_with_default_and_meaning(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for f in keys():
        assert f"\n{f.name}: " in "\n" + out
        assert f.metadata["help"].split()[0] in out
    assert out == describe()
    assert "beta: 0.1" in out


def test_config_command_resolves_and_fails_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "beta=0.5"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["beta"] == 0.5
    assert main(["config", "beta=-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpokit: error: config key `beta`") and err.count("\n") == 1
