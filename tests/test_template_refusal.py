"""Chat templates that refuse a conversation: bad rows with the template's message, `system_message`, prefix
warnings, and TRL's tokenization where TRL accepts the data."""

from __future__ import annotations

import dataclasses
import io
import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import conversational_rows, write_jsonl
from dpokit.cli import main
from dpokit.data import Pair
from dpokit.data.chat_template import (
    DROPPED,
    MERGED,
    TEMPLATE_REFUSED,
    TemplateRefused,
    apply_system_message,
    render_chat,
)
from dpokit.data.encode import encode_checked, encode_pairs
from dpokit.data.rows import as_text_pair
from dpokit.models import load_tokenizer

# Gemma's shape: no system role, and strictly alternating user/model turns.
NO_SYSTEM = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<|im_start|>' + role + '\n' + message['content'] | trim + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>model\n' }}{% endif %}"
)
# Mistral-Instruct's shape: an optional first system turn, then user/assistant strictly alternating.
ALTERNATING = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}"
    "{% endif %}{{ bos_token }}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('After the optional system "
    "message, conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{% if loop.first and system %}"
    "{{ '[INST] ' + system + '\n\n' + message['content'] + ' [/INST]' }}{% else %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}{% else %}"
    "{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)
# The last user turn is marked, so the prompt alone renders differently from the prompt inside prompt+response.
NOT_PREFIX = (
    "{% for message in messages %}{% if loop.last and message['role'] == 'user' %}"
    "{{ '<|im_start|>user (last)\n' + message['content'] + '<|im_end|>\n' }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tokenizer_with(model_dir: Path, template: str):
    tokenizer = load_tokenizer(str(model_dir))
    tokenizer.chat_template = template
    return tokenizer


def pairs_of(rows: list[dict], name: str = "pairs.jsonl") -> list[Pair]:
    return [
        dataclasses.replace(as_text_pair(r["prompt"], r["chosen"], r["rejected"]), origin=f"{name}:{i}")
        for i, r in enumerate(rows, start=1)
    ]


def with_system(rows: list[dict]) -> list[dict]:
    return [{**r, "prompt": [{"role": "system", "content": "Be brief."}, *r["prompt"][-1:]]} for r in rows]


def merged_by_hand(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if r["prompt"][0]["role"] == "system":
            user = {"role": "user", "content": r["prompt"][0]["content"] + "\n\n" + r["prompt"][1]["content"]}
            r = {**r, "prompt": [user, *r["prompt"][2:]]}
        out.append(r)
    return out


# --- the pieces -------------------------------------------------------------------------------------------------------


def test_system_message_keep_merge_drop():
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "system", "content": "Now in French."},
        {"role": "user", "content": "Bye"},
    ]
    counts: Counter[str] = Counter()
    assert apply_system_message(conversation, "keep", counts) == conversation
    merged = apply_system_message(conversation, "merge", counts)
    assert [m["content"] for m in merged] == ["Be brief.\n\nHi", "Hello", "Now in French.\n\nBye"]
    assert [m["role"] for m in merged] == ["user", "assistant", "user"]
    assert [m["content"] for m in apply_system_message(conversation, "drop", counts)] == ["Hi", "Hello", "Bye"]
    assert counts == {MERGED: 2, DROPPED: 2}


def test_render_chat_turns_the_templates_exception_into_a_refusal(tiny_model_dir):
    tokenizer = tokenizer_with(tiny_model_dir, NO_SYSTEM)
    with pytest.raises(TemplateRefused, match="^the chat template refused this conversation: System role not"):
        render_chat(tokenizer, [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])
    assert render_chat(tokenizer, [{"role": "user", "content": "y"}], add_generation_prompt=True).endswith(
        "<|im_start|>model\n"
    )


def test_refused_pairs_are_bad_rows_and_the_rest_encode(tiny_model_dir):
    rows = conversational_rows(9)  # rows 1, 4, 7 have a system turn
    result = encode_checked(tokenizer_with(tiny_model_dir, NO_SYSTEM), pairs_of(rows))
    assert [row.origin for row in result.refused] == ["pairs.jsonl:1", "pairs.jsonl:4", "pairs.jsonl:7"]
    assert {row.reason for row in result.refused} == {
        "the chat template refused this conversation: System role not supported"
    }
    assert {row.kind for row in result.refused} == {TEMPLATE_REFUSED}
    assert result.refused[0].row == rows[0]  # the row as given, for the side file
    assert len(result.encoded) == len(result.pairs) == 6
    with pytest.raises(Exception, match=r"pairs.jsonl:1: the chat template refused .* \(and 2 more pairs\)"):
        encode_pairs(tokenizer_with(tiny_model_dir, NO_SYSTEM), pairs_of(rows))


def test_merge_and_drop_make_the_template_accept_system_turns(tiny_model_dir):
    tokenizer = tokenizer_with(tiny_model_dir, NO_SYSTEM)
    rows = conversational_rows(9)
    merged = encode_checked(tokenizer, pairs_of(rows), system_message="merge")
    assert not merged.refused and merged.counts == {MERGED: 3}
    assert merged.pairs[0].prompt == [{"role": "user", "content": "Be brief.\n\n" + rows[0]["prompt"][1]["content"]}]
    by_hand = encode_checked(tokenizer, pairs_of(merged_by_hand(rows)))
    assert merged.encoded == by_hand.encoded
    dropped = encode_checked(tokenizer, pairs_of(rows), system_message="drop")
    assert not dropped.refused and dropped.counts == {DROPPED: 3}
    assert dropped.pairs[0].prompt == rows[0]["prompt"][1:]


def test_non_alternating_roles_are_refused_with_the_templates_message(tiny_model_dir):
    rows = conversational_rows(4)
    rows[2] = {**rows[2], "prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    result = encode_checked(tokenizer_with(tiny_model_dir, ALTERNATING), pairs_of(rows))
    assert [(row.origin, row.reason) for row in result.refused] == [
        (
            "pairs.jsonl:3",
            "the chat template refused this conversation: After the optional system message, conversation roles "
            "must alternate user/assistant/user/assistant/...",
        )
    ]
    assert len(result.encoded) == 3


def test_prompt_that_is_not_a_prefix_is_counted_and_shown_once(tiny_model_dir):
    rows = conversational_rows(5)
    result = encode_checked(tokenizer_with(tiny_model_dir, NOT_PREFIX), pairs_of(rows))
    assert result.not_prefix == 5 and result.total == 5
    (warning,) = result.warnings()
    assert warning.startswith("in 5 of 5 pairs the tokenized prompt is not a prefix")
    assert "for example pairs.jsonl:1: the prompt alone ends" in warning and "(last)" in warning
    for encoded in result.encoded:  # the common prefix stops before the marked user turn
        assert encoded.chosen_ids and encoded.rejected_ids
    assert not encode_checked(load_tokenizer(str(tiny_model_dir)), pairs_of(rows)).warnings()  # ChatML: a prefix


# --- parity with TRL, where TRL accepts the data ----------------------------------------------------------------------


def trl_tokenization(model_dir: Path, tokenizer, rows: list[dict], tmp_path: Path) -> list[tuple]:
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=2,
        max_length=1024,
        bf16=False,
        use_cpu=True,
        report_to=[],
        precompute_ref_log_probs=False,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = trl.DPOTrainer(
        model=model,
        ref_model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset]


@pytest.mark.parametrize("template", ["no_system_merged", "alternating", "not_prefix"])
def test_tokenization_matches_trl_where_trl_accepts_the_data(tiny_model_dir, tmp_path, template):
    templates = {"no_system_merged": NO_SYSTEM, "alternating": ALTERNATING, "not_prefix": NOT_PREFIX}
    tokenizer = tokenizer_with(tiny_model_dir, templates[template])
    rows = conversational_rows(8)
    policy = "merge" if template == "no_system_merged" else "keep"
    ours = encode_checked(tokenizer, pairs_of(rows), system_message=policy)
    assert not ours.refused and len(ours.encoded) == 8
    # TRL refuses the system turns of the first template outright; it is given the rows merged by hand
    theirs = trl_tokenization(tiny_model_dir, tokenizer, merged_by_hand(rows) if policy == "merge" else rows, tmp_path)
    assert [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in ours.encoded] == theirs
    assert (ours.not_prefix == 8) == (template == "not_prefix")


# --- the commands -----------------------------------------------------------------------------------------------------


@pytest.fixture
def template_file(tmp_path: Path) -> Path:
    path = tmp_path / "gemma_like.jinja"
    path.write_text(NO_SYSTEM, encoding="utf-8")
    return path


def test_inspect_counts_refusals_writes_them_and_exits_2_with_one_line(tiny_model_dir, template_file, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", conversational_rows(9))
    argv = ["data", "inspect", str(data), "--model", str(tiny_model_dir), "--chat-template", str(template_file)]
    assert main([*argv, "--json"]) == 2
    captured = capsys.readouterr()
    stats = json.loads(captured.out)
    assert stats["pairs"] == 6 and stats["bad_row_kinds"] == {TEMPLATE_REFUSED: 3}
    error = captured.err.strip().splitlines()[-1]
    assert error.startswith(f"dpokit: error: {data}:1: the chat template refused this conversation: System role")
    assert "(and 2 more bad rows)" in error and "or set --system-message merge" in error
    side = [json.loads(line) for line in (tmp_path / "pairs.rejected.jsonl").read_text().splitlines()]
    refusal = "the chat template refused this conversation: System role not supported"
    assert [row["reason"] for row in side] == [refusal] * 3
    assert main([*argv, "--json", "--max-bad-rows", "3"]) == 0
    capsys.readouterr()
    assert main([*argv, "--json", "--system-message", "merge"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["pairs"] == 9 and stats["counts"] == {MERGED: 3}


def test_every_row_refused_for_one_reason_is_one_line_naming_the_fix(tiny_model_dir, template_file, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", with_system(conversational_rows(5)))
    argv = ["--model", str(tiny_model_dir), "--chat-template", str(template_file)]
    assert main(["data", "inspect", str(data), *argv]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (
        f"dpokit: error: {data}: the chat template refused every conversation (5): System role not supported; set "
        "--system-message merge to fold the system text into the first user turn (or drop it), or use a chat "
        "template that accepts system turns"
    )
    out = tmp_path / "out.jsonl"
    assert main(["data", "prepare", str(data), "--output", str(out), "--test-size", "0", *argv]) == 2
    assert "refused every conversation (5)" in capsys.readouterr().err
    prepared = [*argv, "--system-message", "merge"]
    assert main(["data", "prepare", str(data), "--output", str(out), "--test-size", "0", *prepared]) == 0
    assert "kept after a change: 5 (system messages merged into the user turn)" in capsys.readouterr().out
    first = json.loads(out.read_text().splitlines()[0])
    assert first["prompt"][0]["content"].startswith("Be brief.\n\n") and len(first["prompt"]) == 1


def test_train_refusals_are_bad_rows_and_merge_trains(tiny_model_dir, template_file, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", conversational_rows(6))
    base = [
        f"model_name_or_path={tiny_model_dir}",
        f"chat_template={template_file}",
        f"train_data={data}",
        "bf16=false",
        "max_steps=1",
        "per_device_train_batch_size=2",
    ]
    assert main(["train", *base, f"output_dir={tmp_path / 'a'}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{data}:1: the chat template refused this conversation: System role not supported (and 1 more" in err
    assert (tmp_path / "a" / "pairs.rejected.jsonl").is_file()
    assert main(["train", *base, f"output_dir={tmp_path / 'b'}", "max_bad_rows=2"]) == 0
    assert "4 pairs to train on" in capsys.readouterr().err
    assert main(["train", *base, f"output_dir={tmp_path / 'c'}", "system_message=merge"]) == 0
    assert "6 pairs to train on" in capsys.readouterr().err


def test_sft_refusals_are_bad_rows_and_merge_trains(tiny_model_dir, template_file, tmp_path, capsys):
    system = [{"role": "system", "content": "Be brief."}]
    rows = [
        {
            "messages": [*(system if i % 3 == 0 else []), {"role": "user", "content": f"Question {i}?"}]
            + [{"role": "assistant", "content": f"Answer number {i}."}]
        }
        for i in range(6)
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    base = [f"model_name_or_path={tiny_model_dir}", f"chat_template={template_file}", f"train_data={data}"]
    base += ["bf16=false", "max_steps=1", "per_device_train_batch_size=2"]
    assert main(["sft", *base, f"output_dir={tmp_path / 'a'}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{data}:1: the chat template refused this conversation: System role not supported (and 1 more" in err
    side = [json.loads(line) for line in (tmp_path / "a" / "chat.rejected.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in side] == ["the chat template refused this conversation: System role not supported"] * 2
    assert main(["sft", *base, f"output_dir={tmp_path / 'b'}", "max_bad_rows=2"]) == 0
    assert main(["sft", *base, f"output_dir={tmp_path / 'c'}", "system_message=merge"]) == 0
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["steps"] == 1


# --- generate, compare, vibe, chat ------------------------------------------------------------------------------------

JUDGE = "def score(prompt, response):\n    return float(len(response))\n"
ANSWERING = ["--max-new-tokens", "4", "--temperature", "0", "--no-bf16"]


@pytest.fixture(scope="module")
def gemma_like(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model whose own template refuses system turns, a LoRA adapter on it, a judge and prompt files."""
    from peft import LoraConfig, get_peft_model

    import tiny

    root = tmp_path_factory.mktemp("gemma-like")
    model_dir = tiny.save_tiny(root / "model")
    tokenizer = load_tokenizer(str(model_dir))
    tokenizer.chat_template = NO_SYSTEM
    tokenizer.save_pretrained(model_dir)
    peft_model = get_peft_model(tiny.build_model(len(tokenizer)), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.peft_config["default"].base_model_name_or_path = str(model_dir)
    peft_model.save_pretrained(root / "adapter")
    (root / "judge.py").write_text(JUDGE, encoding="utf-8")
    system = [{"role": "system", "content": "Be brief."}]
    questions = ["What is the capital of France?", "How many legs does a spider have?", "Say hi."]
    rows = [
        {"id": f"q{i}", "prompt": [*system[: int(i < 2)], {"role": "user", "content": q}]}
        for i, q in enumerate(questions)
    ]
    write_jsonl(root / "prompts.jsonl", rows)  # the first two have a system turn
    write_jsonl(root / "system_prompts.jsonl", rows[:2])
    return {"root": root, "model": model_dir, "adapter": root / "adapter", "judge": root / "judge.py"}


def last_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_generate_refused_prompts_are_bad_rows_before_the_model_loads(gemma_like, tmp_path, capsys):
    prompts = gemma_like["root"] / "prompts.jsonl"
    argv = ["generate", "--model", str(gemma_like["model"]), "--prompts", str(prompts), *ANSWERING[:2]]
    argv += ["--judge", f"python:{gemma_like['judge']}:score", "--num-samples", "2", "--temperature", "1"]
    assert main([*argv, "--output", str(tmp_path / "a" / "pairs.jsonl")]) == 2
    error = last_error(capsys)
    assert error.startswith(f"dpokit: error: {prompts}:1: the chat template refused this conversation: System role")
    assert "(and 1 more bad rows)" in error and error.endswith("or use a chat template that accepts system turns")
    side = [json.loads(line) for line in (tmp_path / "a" / "prompts.rejected.jsonl").read_text().splitlines()]
    assert [row["origin"] for row in side] == [f"{prompts}:1", f"{prompts}:2"]
    assert main([*argv, "--output", str(tmp_path / "b" / "pairs.jsonl"), "--max-bad-rows", "2"]) == 0
    assert [json.loads(r)["prompt_id"] for r in (tmp_path / "b" / "pairs.jsonl").read_text().splitlines()] == ["q2"]
    assert main([*argv, "--output", str(tmp_path / "c" / "pairs.jsonl"), "--system-message", "merge"]) == 0
    rows = [json.loads(r) for r in (tmp_path / "c" / "pairs.jsonl").read_text().splitlines()]
    skipped = (tmp_path / "c" / "pairs.skipped.jsonl").read_text().splitlines()  # tied answers
    assert len(rows) + len(skipped) == 3 and {r["system_message"] for r in rows} == {"merge"}


def test_compare_stops_with_one_line_when_every_question_is_refused(gemma_like, tmp_path, capsys):
    prompts = gemma_like["root"] / "system_prompts.jsonl"
    model = str(gemma_like["model"])
    argv = ["compare", "--model-a", model, "--model-b", model, "--name-a", "a", "--name-b", "b", *ANSWERING]
    argv += ["--prompts", str(prompts), "--judge", f"python:{gemma_like['judge']}:score"]
    assert main([*argv, "--output", str(tmp_path / "cmp")]) == 2
    assert last_error(capsys) == (
        f"dpokit: error: {prompts}: the chat template refused every conversation (2): System role not supported; "
        "set --system-message merge to fold the system text into the first user turn (or drop it), or use a chat "
        "template that accepts system turns"
    )
    assert not (tmp_path / "cmp").exists()
    assert main([*argv, "--output", str(tmp_path / "cmp"), "--system-message", "merge"]) == 0


def test_vibe_and_chat_merge_the_system_turn_as_asked(gemma_like, tmp_path, monkeypatch, capsys):
    from dpokit.generation import SamplingSettings, generate_responses
    from dpokit.inference import load_for_inference

    adapter = str(gemma_like["adapter"])
    prompts = gemma_like["root"] / "system_prompts.jsonl"
    vibe = ["vibe", "--adapter", adapter, "--prompts", str(prompts), "--output", str(tmp_path / "v.jsonl"), *ANSWERING]
    assert main(vibe) == 2
    assert "the chat template refused every conversation (2): System role not supported" in last_error(capsys)
    assert main([*vibe, "--system-message", "merge"]) == 0
    capsys.readouterr()
    model, tokenizer = load_for_inference(None, adapter)
    by_hand = [[{"role": "user", "content": "Be brief.\n\nWhat is the capital of France?"}]]
    settings = SamplingSettings(temperature=0.0, max_new_tokens=4)
    expected = generate_responses(model, tokenizer, by_hand, settings)[0][0]
    assert json.loads((tmp_path / "v.jsonl").read_text().splitlines()[0])["aligned"] == expected

    chat = ["chat", "--adapter", adapter, "--system", "Be brief.", *ANSWERING]
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n/exit\n"))
    assert main(chat) == 2
    assert last_error(capsys).startswith(
        "dpokit: error: --system: the chat template refused this conversation: System role not supported; set "
        "--system-message merge"
    )
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n/exit\n"))
    assert main([*chat, "--system-message", "merge"]) == 0
    assert f"assistant> {expected}" in capsys.readouterr().out
