"""The loss keys: TRL's name-or-list form, the rpo_alpha alias, and TRL 1.16's restrictions as one-line errors."""

from __future__ import annotations

import logging

import pytest

from dpokit.config import DPOConfig, load_config, save_config
from dpokit.errors import UserError


def test_a_name_is_a_one_element_list() -> None:
    assert load_config(None, ["loss_type=ipo"]).loss_type == ["ipo"]
    assert DPOConfig(loss_type="hinge").loss_type == ["hinge"]  # type: ignore[arg-type]  # as TRL's __post_init__
    cfg = load_config(None, ["loss_type=sigmoid,bco_pair,sft", "loss_weights=0.8,0.2,1"])
    assert (cfg.loss_type, cfg.loss_weights) == (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])


def test_rpo_alpha_maps_to_trls_list_form_with_a_note(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        cfg = load_config(None, ["loss_type=ipo", "rpo_alpha=0.5"])
    assert (cfg.loss_type, cfg.loss_weights, cfg.rpo_alpha) == (["ipo", "sft"], [1.0, 0.5], None)
    assert "rpo_alpha=0.5 runs as TRL's loss_type=ipo,sft with loss_weights=1,0.5" in caplog.text
    weighted = load_config(None, ["loss_type=sigmoid,bco_pair", "loss_weights=0.8,0.2", "rpo_alpha=1"])
    assert (weighted.loss_type, weighted.loss_weights) == (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])
    save_config(cfg, tmp_path / "config.yaml")  # saved in the list form, so loading it back maps nothing twice
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss_type=sigmoid,dpo"], "config key `loss_type` = 'dpo': must be one of sigmoid"),
        (["loss_type=sigmoid,sigmoid"], "names a loss twice"),
        (["loss_type=sigmoid,sft", "loss_weights=1"], "`loss_weights` = [1.0]: needs one weight per loss_type entry"),
        (["loss_type=simpo,sft"], "simpo logs its own rewards and cannot be combined"),
        (["loss_type=orpo,sigmoid"], "orpo logs its own rewards and cannot be combined"),
        (["loss_type=exo_pair"], "must be above 0 for loss_type exo_pair"),
        (["loss_type=sigmoid", "label_smoothing=0.1"], "is used only by loss_type aot, aot_unpaired, exo_pair"),
        (["loss_type=bco_pair", "f_divergence_type=js_divergence"], "other than reverse_kl works only with"),
        (["f_divergence_type=kl"], "`f_divergence_type` = 'kl': must be one of reverse_kl"),
        (["loss_type=aot", "use_weighting=true"], "cannot weight aot or aot_unpaired"),
        (["ld_alpha=1.5"], "`ld_alpha` = 1.5: must be in [0, 1]"),
        (["discopop_tau=0"], "`discopop_tau` = 0.0: must be positive"),
        (["rpo_alpha=-1"], "`rpo_alpha` = -1.0: must be 0 or more"),
        (["loss_type=sigmoid,sft", "rpo_alpha=0.5"], "loss_type already has sft"),
        (["loss_weights=a"], "config key `loss_weights`: expected a number, got 'a'"),
    ],
)
def test_loss_mistakes_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(UserError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss_type=exo_pair", "label_smoothing=1e-3"],
        ["loss_type=aot_unpaired", "label_smoothing=0.1"],
        ["loss_type=ipo,sft", "f_divergence_type=alpha_divergence", "f_alpha_divergence_coef=0.3"],
        ["loss_type=sigmoid,bco_pair,sft", "use_weighting=true", "ld_alpha=0"],
        ["loss_type=orpo", "orpo_alpha=0.2"],
    ],
)
def test_what_trl_allows_loads(overrides: list[str]) -> None:
    load_config(None, overrides)
