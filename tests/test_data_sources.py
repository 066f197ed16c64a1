"""Reading rows: every file type, folders with and without splits, the hub's one-line failure, unreadable input."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before `datasets` is imported anywhere: fail at once, no retries

import pytest

from dpokit.data import BadRow
from dpokit.data.sources import folder_files, iter_rows
from dpokit.errors import UserError

ROWS = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
    {"prompt": "Say hi", "chosen": "hi", "rejected": "no"},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in row.items()})
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    return path


def read(source: Path | str, split: str = "train") -> list:
    return list(iter_rows(str(source), split=split))


@pytest.mark.parametrize(
    "writer,name",
    [
        (write_jsonl, "d.jsonl"),
        (lambda p, rows: p.write_text(json.dumps(rows)) and p, "d.json"),
        (lambda p, rows: p.write_text(json.dumps({"data": rows})) and p, "d.json"),
        (write_jsonl, "lines.json"),  # JSON Lines under a .json name
        (write_csv, "d.csv"),
        (write_parquet, "d.parquet"),
    ],
)
def test_every_file_type_reads_the_same_rows_with_one_based_origins(tmp_path, writer, name):
    path = tmp_path / name
    writer(path, ROWS)
    items = read(path)
    assert [row for _, row in items] == ROWS
    assert [origin for origin, _ in items] == [f"{path}:1", f"{path}:2", f"{path}:3"]


def test_jsonl_origin_is_the_line_number_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    assert [origin for origin, _ in read(path)] == [f"{path}:1", f"{path}:3"]


def test_csv_cells_holding_json_are_decoded_and_other_text_kept(tmp_path):
    messages = [{"role": "user", "content": "hi"}]
    path = write_csv(
        tmp_path / "d.csv",
        [{"prompt": messages, "chosen": "[not json", "rejected": "plain", "scores": [1, 2.5]}],
    )
    ((_, row),) = read(path)
    assert row == {"prompt": messages, "chosen": "[not json", "rejected": "plain", "scores": [1, 2.5]}


def test_parquet_is_read_in_batches_across_row_groups(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(700)]  # > one 256-row batch
    path = write_parquet(tmp_path / "d.parquet", rows)
    items = read(path)
    assert len(items) == 700
    assert items[699] == (f"{path}:700", rows[699])


def test_unreadable_rows_become_bad_rows_and_reading_goes_on(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        json.dumps(ROWS[0]).encode()
        + b"\n"
        + b'{"prompt": "\xff\xfe"}\n'
        + b"{broken\n"
        + b"[1, 2]\n"
        + json.dumps(ROWS[1]).encode()
        + b"\n"
    )
    items = read(path)
    assert items[0][1] == ROWS[0] and items[4][1] == ROWS[1]
    kinds = [(row.origin, row.kind) for _, row in items[1:4]]
    assert kinds == [(f"{path}:2", "undecodable bytes"), (f"{path}:3", "invalid JSON"), (f"{path}:4", "wrong type")]


def test_csv_bad_bytes_and_wrong_field_counts_are_bad_rows(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,chosen,rejected\nq,a,b\nq,\xff,b\nq,a\nq,a,b\n")
    items = read(path)
    assert [type(row) for _, row in items] == [dict, BadRow, BadRow, dict]
    assert items[1][1].kind == "undecodable bytes" and items[1][1].origin == f"{path}:2"
    assert items[2][1].kind == "wrong number of fields" and "2 fields, the header has 3" in items[2][1].reason


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("e.jsonl", "\n\n", "is empty"),
        ("e.json", "", "is empty"),
        ("e.json", "[]", "is empty"),
        ("e.csv", "", "is empty"),
        ("e.csv", "prompt,chosen,rejected\n", "is empty"),
        ("e.json", '{"a": [1, 2', "invalid JSON"),
        ("e.txt", "hello", "unknown file type `.txt`"),
        ("e.parquet", "not parquet", "not a readable Parquet file"),
    ],
)
def test_unusable_files_fail_with_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=message) as e:
        read(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read(tmp_path / "missing.jsonl")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="holds no .jsonl, .json, .csv, .parquet or .arrow files"):
        read(tmp_path / "empty")


def test_folder_without_split_names_reads_every_file_in_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", ROWS[1:])
    write_parquet(tmp_path / "a.parquet", ROWS[:1])
    write_jsonl(tmp_path / "b.rejected.jsonl", [{"origin": "x", "reason": "y"}])  # a side file of ours
    write_jsonl(tmp_path / ".hidden.jsonl", [{"x": 1}])
    assert [row for _, row in read(tmp_path)] == ROWS


def test_folder_with_split_files_reads_the_requested_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS[:2])
    write_parquet(tmp_path / "test-00000-of-00001.parquet", ROWS[2:])
    (tmp_path / "validation").mkdir()
    write_jsonl(tmp_path / "validation" / "part-0.jsonl", ROWS[:1])
    assert [row for _, row in read(tmp_path, "train")] == ROWS[:2]
    assert [row for _, row in read(tmp_path, "test")] == ROWS[2:]
    assert [row for _, row in read(tmp_path, "validation")] == ROWS[:1]
    with pytest.raises(UserError, match="splits test, train, validation but none for split `dev`"):
        read(tmp_path, "dev")


def test_prepared_output_folder_splits_into_train_and_test(tmp_path):
    """`dpokit data prepare` writes OUT.jsonl and OUT.test.jsonl: as a folder they are train and test."""
    write_jsonl(tmp_path / "pairs.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "pairs.test.jsonl", ROWS[2:])
    assert [row for _, row in read(tmp_path, "train")] == ROWS[:2]
    assert [row for _, row in read(tmp_path, "test")] == ROWS[2:]


def test_hub_style_split_names(tmp_path):
    write_parquet(tmp_path / "train_prefs-00000-of-00001.parquet", ROWS[:1])
    write_parquet(tmp_path / "test_prefs-00000-of-00001.parquet", ROWS[1:])
    assert [f.name for f in folder_files(tmp_path, "train_prefs")] == ["train_prefs-00000-of-00001.parquet"]
    assert [f.name for f in folder_files(tmp_path, "train")] == ["train_prefs-00000-of-00001.parquet"]
    write_parquet(tmp_path / "train_sft-00000-of-00001.parquet", ROWS[1:])
    with pytest.raises(UserError, match="splits train_prefs, train_sft all match split `train`"):
        folder_files(tmp_path, "train")
    with pytest.raises(UserError, match="test_prefs, train_prefs, train_sft but none for split `validation`"):
        folder_files(tmp_path, "validation")


def test_hub_dataset_that_cannot_be_reached_is_one_line():
    with pytest.raises(UserError) as e:
        read("no-such-owner/no-such-dataset")
    message = str(e.value)
    assert message.startswith("data `no-such-owner/no-such-dataset` is not a local file or folder")
    assert "\n" not in message


def test_path_like_source_that_does_not_exist_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read("./data/pairs")


def test_split_prefixes_match_when_unambiguous(tmp_path):
    write_jsonl(tmp_path / "train_data.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "test_data.jsonl", ROWS[2:])
    assert [row for _, row in read(tmp_path, "train")] == ROWS[:2]
    assert [row for _, row in read(tmp_path, "test")] == ROWS[2:]
    write_jsonl(tmp_path / "train_extra.jsonl", ROWS[:1])
    with pytest.raises(UserError, match="splits train_data, train_extra all match split `train`"):
        read(tmp_path, "train")
    assert [row for _, row in read(tmp_path, "train_extra")] == ROWS[:1]
