"""Loading prompts: every file layout, MT-Bench's question.jsonl, stable keys, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpokit.errors import UserError
from dpokit.prompts import content_key, load_prompts


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_text_file_one_prompt_per_line_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("What is 2+2?\n\n  \nName a colour.\r\n", encoding="utf-8")
    items = load_prompts(str(path))
    assert [i.messages for i in items] == [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "user", "content": "Name a colour."}],
    ]
    assert items[1].origin == f"{path}:4"
    assert items[0].key == content_key([{"role": "user", "content": "What is 2+2?"}])


def test_keys_are_stable_and_depend_only_on_the_prompt(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x"}, {"prompt": "y"}])
    b = tmp_path / "b.txt"
    b.write_text("y\nx\n", encoding="utf-8")
    keys_a = {i.text: i.key for i in load_prompts(str(a))}
    keys_b = {i.text: i.key for i in load_prompts(str(b))}
    assert keys_a == keys_b
    assert keys_a["x"] != keys_a["y"]
    assert keys_a["x"].startswith("sha256:") and len(keys_a["x"]) == len("sha256:") + 24


def test_mt_bench_question_jsonl(tmp_path: Path) -> None:
    rows = [
        {"question_id": 81, "category": "writing", "turns": ["Write a blog post.", "Rewrite it in limericks."]},
        {"question_id": 101, "category": "reasoning", "turns": ["Who is second?"], "reference": ["Bob"]},
    ]
    items = load_prompts(str(write_jsonl(tmp_path / "question.jsonl", rows)))
    assert [i.key for i in items] == ["81", "101"]
    assert items[0].source_id == 81 and items[0].category == "writing"
    assert items[0].messages == [{"role": "user", "content": "Write a blog post."}]
    assert items[0].later_turns == ("Rewrite it in limericks.",)
    assert items[0].turns == ["Write a blog post.", "Rewrite it in limericks."]
    assert items[1].later_turns == () and items[1].text == "Who is second?"


def test_column_detection_order_and_explicit_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "Q?", "instruction": "I", "other": "O"}])
    assert load_prompts(str(path))[0].text == "Q?"  # question comes before instruction
    assert load_prompts(str(path), column="other")[0].text == "O"
    with pytest.raises(UserError, match=r"p.jsonl:1: missing column 'nope'"):
        load_prompts(str(path), column="nope")


def test_alpaca_instruction_gets_its_input(tmp_path: Path) -> None:
    rows = [{"instruction": "Translate to French.", "input": "Good morning"}, {"instruction": "Say hi.", "input": ""}]
    items = load_prompts(str(write_jsonl(tmp_path / "alpaca.jsonl", rows)))
    assert [i.text for i in items] == ["Translate to French.\n\nGood morning", "Say hi."]


def test_messages_are_cut_after_the_last_user_turn(tmp_path: Path) -> None:
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "Apple."},
    ]
    items = load_prompts(str(write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation, "id": "c1"}])))
    assert items[0].messages == conversation[:4]
    assert items[0].key == "c1" and items[0].text == "Name a fruit."
    assert items[0].turns == ["Hi", "Name a fruit."]


def test_json_list_csv_and_parquet(tmp_path: Path) -> None:
    json_path = tmp_path / "p.json"
    json_path.write_text(json.dumps({"data": [{"prompt": "a"}, {"prompt": "b"}]}), encoding="utf-8")
    assert [i.text for i in load_prompts(str(json_path))] == ["a", "b"]
    csv_path = tmp_path / "p.csv"
    csv_path.write_text('id,prompt\n7,"Hello, world"\n8,"two\nlines"\n', encoding="utf-8")
    items = load_prompts(str(csv_path))
    assert [(i.key, i.text) for i in items] == [("7", "Hello, world"), ("8", "two\nlines")]
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet_path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"question": ["first?", "second?"], "category": ["x", "y"]}), parquet_path)
    items = load_prompts(str(parquet_path))
    assert [(i.text, i.category) for i in items] == [("first?", "x"), ("second?", "y")]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", "", r"empty.jsonl is empty"),
        ("blank.txt", "\n\n", r"no prompts found"),
        ("num.jsonl", '{"prompt": "ok"}\n{"prompt": 5}\n', r"num.jsonl:2: column 'prompt' must be text"),
        ("blank.jsonl", '{"prompt": "  "}\n', r"blank.jsonl:1: column 'prompt' is empty"),
        ("list.jsonl", '{"prompt": []}\n', r"list.jsonl:1: .*got an empty list"),
        ("bad.jsonl", '{"prompt": "ok"}\n{oops\n', r"bad.jsonl:2: invalid JSON"),
        ("arr.jsonl", '["a"]\n', r"arr.jsonl:1: expected a JSON object"),
        ("cols.jsonl", '{"text": "a"}\n', r"no prompt column \(columns: text\); name one with --prompt-column"),
        ("roles.jsonl", '{"messages": [{"role": "bot", "content": "x"}]}\n', r"unknown role 'bot'"),
        ("nouser.jsonl", '{"messages": [{"role": "system", "content": "x"}]}\n', r"no user message"),
        ("ids.jsonl", '{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', r"ids.jsonl:2: id 1 is used by"),
        ("p.xml", "<a/>", r"unknown file type `.xml`"),
    ],
)
def test_bad_prompt_files_name_file_and_row(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message) as info:
        load_prompts(str(path))
    assert "\n" not in str(info.value)


def test_missing_file_and_unreachable_hub_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match=r"data file .*nothere.jsonl does not exist"):
        load_prompts(str(tmp_path / "nothere.jsonl"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"`someone/no-such-set` is not a local file or folder, and the hub could not"):
        load_prompts("someone/no-such-set", split="test")
