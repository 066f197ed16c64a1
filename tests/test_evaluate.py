"""`dpokit eval`, `chat` and `vibe` on tiny models: numbers against the plain definition, real CLI runs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from dpokit.cli import main
from dpokit.data.collate import collate
from dpokit.data.encode import encode_pairs
from dpokit.data.load import load_pairs
from dpokit.generation import SamplingSettings, generate_responses
from dpokit.inference import load_for_inference
from dpokit.logprobs import sequence_logps_reference
from evaluate_helpers import PAIRS, make_run, tiny_base, write_pairs


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    base = tiny_base(root)
    return {"root": root, "base": base, "other": tiny_base(root, seed=1), "run": make_run(root, base, beta=0.2)}


@torch.no_grad()
def _plain_logps(model, tokenizer, pairs_file: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs by the plain definition, one pair at a time, padded layout."""
    encoded = encode_pairs(tokenizer, load_pairs(str(pairs_file)).pairs)
    chosen, rejected = [], []
    for pair in encoded:
        logps = sequence_logps_reference(model, collate([pair], tokenizer.pad_token_id))
        chosen.append(logps.chosen)
        rejected.append(logps.rejected)
    return torch.cat(chosen).double(), torch.cat(rejected).double()


def _expected(policy: tuple, reference: tuple, beta: float) -> dict[str, float]:
    chosen_rewards = beta * (policy[0] - reference[0])
    rejected_rewards = beta * (policy[1] - reference[1])
    return {
        "rewards/accuracies": (chosen_rewards > rejected_rewards).double().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "logps/chosen": policy[0].mean().item(),
        "logps/rejected": policy[1].mean().item(),
    }


def test_eval_with_adapter_matches_the_plain_definition(setup: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    data = write_pairs(setup["root"] / "test.jsonl")
    adapter = setup["run"] / "adapter"
    assert main(["eval", "--adapter", str(adapter), "--data", str(data), "--batch-size", "2", "--no-bf16"]) == 0
    result = json.loads(capsys.readouterr().out)
    # beta comes from the run's config.yaml; the JSON also lands in the run folder for the report
    assert result["beta"] == 0.2 and result["beta_from"].endswith("config.yaml")
    assert json.loads((setup["run"] / "eval.json").read_text()) == result
    assert result["pairs"] == len(PAIRS)

    model, tokenizer = load_for_inference(None, str(adapter))
    policy = _plain_logps(model, tokenizer, data)
    with model.disable_adapter():
        reference = _plain_logps(model, tokenizer, data)
    assert not torch.allclose(policy[0], reference[0])  # the adapter does change the model
    for key, value in _expected(policy, reference, 0.2).items():
        assert result[key] == pytest.approx(value, abs=1e-4), key
    assert result["accuracy_ci_low"] <= result["rewards/accuracies"] <= result["accuracy_ci_high"]


def test_eval_with_a_reference_model(setup: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    data = write_pairs(setup["root"] / "test-ref.jsonl")
    output = setup["root"] / "out" / "eval.json"
    argv = ["eval", "--model", str(setup["other"]), "--reference", str(setup["base"]), "--data", str(data)]
    assert main([*argv, "--beta", "0.5", "--no-bf16", "--output", str(output)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads(output.read_text()) == result and result["beta_from"] == "--beta"
    policy_model, tokenizer = load_for_inference(str(setup["other"]), None)
    reference_model, _ = load_for_inference(str(setup["base"]), None)
    expected = _expected(
        _plain_logps(policy_model, tokenizer, data), _plain_logps(reference_model, tokenizer, data), 0.5
    )
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-4), key


def test_eval_bad_inputs(setup: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    data = write_pairs(setup["root"] / "test-bad.jsonl")
    assert main(["eval", "--model", str(setup["base"]), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "eval needs a reference" in err and err.count("\n") == 1
    adapter = str(setup["run"] / "adapter")
    assert main(["eval", "--adapter", adapter, "--data", str(setup["root"] / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--adapter", adapter, "--data", str(data), "--beta", "0"]) == 2
    assert capsys.readouterr().err == "dpokit: error: --beta 0.0: must be positive\n"  # checked where beta is declared
    assert main(["eval", "--adapter", str(setup["root"]), "--data", str(data)]) == 2
    assert "not a LoRA adapter folder" in capsys.readouterr().err


def test_chat_reads_stdin_keeps_history_and_resets(
    setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    adapter = str(setup["run"] / "adapter")
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nHow many legs?\n/reset\nHow many legs?\n/exit\nignored\n"))
    assert main(["chat", "--adapter", adapter, "--max-new-tokens", "6", "--temperature", "0", "--no-bf16"]) == 0
    replies = [
        line.split("assistant> ", 1)[1] for line in capsys.readouterr().out.splitlines() if "assistant> " in line
    ]
    assert len(replies) == 3
    model, tokenizer = load_for_inference(None, adapter)
    settings = SamplingSettings(temperature=0.0, max_new_tokens=6)

    def answer(conversation: list[dict[str, str]]) -> str:
        return generate_responses(model, tokenizer, [conversation], settings)[0][0]

    first = answer([{"role": "user", "content": "Hello"}])
    assert replies[0] == first
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first}]
    assert replies[1] == answer([*history, {"role": "user", "content": "How many legs?"}])
    assert replies[2] == answer([{"role": "user", "content": "How many legs?"}])  # /reset forgot the history


def test_vibe_saves_base_and_aligned_answers_in_the_run_folder(
    setup: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    prompts = setup["root"] / "prompts.jsonl"
    texts = ["Write a haiku about the sea.", "How many legs does a spider have?", "Say hello."]
    prompts.write_text("".join(json.dumps({"prompt": t, "category": "demo"}) + "\n" for t in texts))
    adapter = setup["run"] / "adapter"
    argv = ["vibe", "--adapter", str(adapter), "--prompts", str(prompts), "--limit", "2", "--max-new-tokens", "6"]
    assert main([*argv, "--no-bf16"]) == 0
    out = capsys.readouterr().out
    assert "vibe check" in out and "aligned" in out
    rows = [json.loads(line) for line in (setup["run"] / "vibe.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == texts[:2]
    settings = SamplingSettings(temperature=0.0, max_new_tokens=6)
    conversations = [[{"role": "user", "content": t}] for t in texts[:2]]
    base_model, tokenizer = load_for_inference(str(setup["base"]), None)
    aligned_model, _ = load_for_inference(None, str(adapter))
    assert [r["base"] for r in rows] == [
        a[0] for a in generate_responses(base_model, tokenizer, conversations, settings)
    ]
    aligned = [a[0] for a in generate_responses(aligned_model, tokenizer, conversations, settings)]
    assert [r["aligned"] for r in rows] == aligned
    assert [r["base"] for r in rows] != aligned


def test_autocast_follows_the_flag_else_the_hardware() -> None:
    from dpokit.devices import autocast_for, bf16_is_fast

    cpu = torch.device("cpu")
    with autocast_for(cpu, True):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast_for(cpu, False):
        assert not torch.is_autocast_enabled("cpu")
    with autocast_for(cpu, None):
        assert torch.is_autocast_enabled("cpu") == bf16_is_fast(cpu)
