"""`dpokit merge`: a plain transformers model that computes what base + adapter computed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpokit.cli import main
from dpokit.inference import load_for_inference
from dpokit.merge import MERGE_RELATIVE_TOLERANCE, PROBE_CONVERSATION
from evaluate_helpers import make_adapter, tiny_base


def _logits(model, tokenizer) -> torch.Tensor:
    text = tokenizer.apply_chat_template(
        PROBE_CONVERSATION + [{"role": "user", "content": "And more?"}], tokenize=False
    )
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**inputs).logits.float()


def _check_merged(adapter: Path, merged: Path) -> None:
    """The merged folder loads with plain transformers and gives the adapter's logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peft_model, tokenizer = load_for_inference(None, str(adapter))
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    plain_tokenizer = AutoTokenizer.from_pretrained(merged)
    assert plain_tokenizer.chat_template == tokenizer.chat_template
    expected, actual = _logits(peft_model, tokenizer), _logits(plain, plain_tokenizer)
    with peft_model.disable_adapter():
        base = _logits(peft_model, tokenizer)
    tolerance = MERGE_RELATIVE_TOLERANCE * max(1.0, expected.abs().max().item())
    assert (actual - expected).abs().max().item() <= tolerance
    assert (base - expected).abs().max().item() > 100 * tolerance  # the adapter is really in the weights
    assert sorted(p.name for p in merged.glob("*.safetensors")) and not list(merged.glob("*.bin"))
    check = json.loads((merged / "merge.json").read_text())["check"]
    assert check["passed"] and check["max_abs_diff"] <= check["tolerance"]


def test_merge_tiny_adapter(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = tiny_base(tmp_path)
    adapter = make_adapter(base, tmp_path / "adapter")
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--output", str(merged)]) == 0
    assert "logits agree" in capsys.readouterr().out
    _check_merged(adapter, merged)
    # an existing, non-empty output folder is left alone
    assert main(["merge", "--adapter", str(adapter), "--output", str(merged)]) == 2
    assert "is not empty" in capsys.readouterr().err
    # an output that cannot be written is found before the model loads
    assert main(["merge", "--adapter", str(adapter), "--output", str(merged / "config.json" / "x")]) == 2
    assert "cannot be written" in capsys.readouterr().err
    assert main(["merge", "--adapter", str(tmp_path / "nowhere"), "--output", str(tmp_path / "m2")]) == 2
    assert f"adapter folder {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


def test_merge_prefers_the_base_named_in_dpokit_json(tmp_path: Path) -> None:
    base = tiny_base(tmp_path)
    adapter = make_adapter(base, tmp_path / "adapter", base_name=str(base))
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved-away")  # what peft recorded no longer exists
    config_file.write_text(json.dumps(config))
    assert main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 0


def test_adapter_for_another_base_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    base = tiny_base(tmp_path)
    adapter = make_adapter(base, tmp_path / "adapter")
    wider = tmp_path / "wider"
    config = LlamaConfig(
        vocab_size=400, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4
    )
    LlamaForCausalLM(config).save_pretrained(wider)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (wider / name).write_bytes((base / name).read_bytes())
    output = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--model", str(wider), "--output", str(output)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dpokit: error:")]
    assert len(errors) == 1 and "does not fit" in errors[0] and "another base model" in errors[0]
    assert not output.exists() and not list(tmp_path.glob(".merged*"))  # nothing half-written


@pytest.mark.builtin
def test_merge_on_the_builtin_model(tmp_path: Path) -> None:
    from dpokit.models import add_lora, load_model

    model = add_lora(
        load_model("builtin:smollm2-135m-instruct"),
        r=4,
        alpha=8,
        dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        seed=0,
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    adapter = tmp_path / "run" / "adapter"
    model.save_pretrained(adapter)
    (adapter / "dpokit.json").write_text(json.dumps({"base_model": "builtin:smollm2-135m-instruct"}))
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--output", str(merged)]) == 0
    _check_merged(adapter, merged)
