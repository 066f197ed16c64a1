"""Which attention a run uses, for each device and `attn_implementation` value, and what it says about it."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dpokit import attention, devices, flex
from dpokit.config import load_config
from dpokit.errors import UserError
from tiny import build_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def choose(requested: str, device: torch.device, padding_free=True, prefix_sharing=True, segment_attention=True):
    packed = padding_free or prefix_sharing
    return attention.choose(
        requested, device, packed=packed, prefix_sharing=prefix_sharing, segment_attention=segment_attention
    )


@pytest.mark.parametrize(
    ("requested", "device", "layout", "kernel", "load_as"),
    [
        ("auto", CUDA, (True, True, True), flex.NAME, "sdpa"),
        ("auto", CUDA, (True, False, True), flex.NAME, "sdpa"),
        ("auto", CUDA, (False, True, False), flex.NAME, "sdpa"),
        ("auto", CUDA, (False, False, True), "sdpa", "sdpa"),  # padded rows: SDPA with padding
        ("auto", CPU, (True, True, True), attention.NAME, "sdpa"),  # what measures fastest on CPU
        ("auto", CPU, (True, True, False), "sdpa", "sdpa"),  # one dense masked pass
        ("auto", CPU, (False, False, True), "sdpa", "sdpa"),
        ("sdpa", CUDA, (True, True, True), attention.NAME, "sdpa"),
        ("sdpa", CUDA, (True, True, False), "sdpa", "sdpa"),
        ("flex_attention", CUDA, (False, False, True), flex.NAME, "sdpa"),
        ("eager", CPU, (False, False, True), "eager", "eager"),
        ("eager", CUDA, (True, True, False), "eager", "eager"),
    ],
)
def test_choice_per_device_and_setting(requested, device, layout, kernel, load_as) -> None:
    choice = choose(requested, device, *layout)
    assert (choice.kernel, choice.load_as) == (kernel, load_as)
    assert choice.describe().startswith("attention: ")
    assert ("auto" in choice.reason) == (requested == "auto")


def test_auto_says_why() -> None:
    assert choose("auto", CUDA).describe() == "attention: flex_attention block masks (auto: packed rows on CUDA)"
    assert choose("auto", CPU).describe() == "attention: sdpa, one segment at a time (auto: packed rows on cpu)"


def test_auto_falls_back_to_sdpa_without_flex(monkeypatch) -> None:
    monkeypatch.setattr(flex, "available", lambda: False)
    choice = choose("auto", CUDA)
    assert choice.kernel == attention.NAME
    assert "has no FlexAttention" in choice.reason
    with pytest.raises(UserError, match="needs torch >= 2.5"):
        choose("flex_attention", CUDA)


@pytest.mark.parametrize(
    ("requested", "device", "layout", "message"),
    [
        ("flex_attention", CPU, (True, True, True), "trains on CUDA only"),
        ("eager", CPU, (True, False, True), "set segment_attention=false"),
    ],
)
def test_refusals(requested, device, layout, message) -> None:
    with pytest.raises(UserError, match=message) as e:
        choose(requested, device, *layout)
    assert "\n" not in str(e.value)


def test_flash_attention_2_needs_the_package_cuda_and_no_prefix_sharing(monkeypatch) -> None:
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(UserError, match="pip install flash-attn"):
            choose("flash_attention_2", CUDA, True, False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else real(name))
    with pytest.raises(UserError, match="CUDA only"):
        choose("flash_attention_2", CPU, True, False)
    with pytest.raises(UserError, match="set prefix_sharing=false"):
        choose("flash_attention_2", CUDA, True, True)
    choice = choose("flash_attention_2", CUDA, True, False)
    assert (choice.kernel, choice.load_as) == ("flash_attention_2", "flash_attention_2")


def test_config_takes_each_value_and_refuses_others(tmp_path) -> None:
    for value in attention.KERNELS:
        assert load_config(None, [f"attn_implementation={value}"]).attn_implementation == value
    assert load_config(None, []).attn_implementation == "auto"
    with pytest.raises(UserError, match="attn_implementation"):
        load_config(None, ["attn_implementation=flash"])


def test_apply_switches_the_model_and_prints_the_choice(caplog) -> None:
    model = build_model(50)
    with caplog.at_level("INFO", logger="dpokit.attention"):
        attention.apply(choose("auto", CPU), model)
    assert attention.enabled(model)
    assert "attention: sdpa, one segment at a time (auto: packed rows on cpu)" in caplog.text
    other = build_model(50)
    attention.apply(attention.Choice("sdpa", flex.NAME, "test"), other)
    assert flex.enabled(other) and not attention.enabled(other)


@pytest.mark.parametrize(
    ("device", "capability", "expected"),
    [(CUDA, (8, 0), True), (CUDA, (9, 0), True), (CUDA, (7, 5), False), (CPU, None, False)],
)
def test_tf32_from_ampere_on(device, capability, expected) -> None:
    assert devices.wants_tf32(device, capability) is expected


def test_nothing_is_set_on_cpu() -> None:
    before = torch.backends.cuda.matmul.fp32_precision
    assert devices.prepare(CPU) == []
    assert torch.backends.cuda.matmul.fp32_precision == before
