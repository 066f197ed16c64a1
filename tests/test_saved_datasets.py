"""Folders written by `datasets`' `save_to_disk`, and `.arrow` files, read as the data they hold."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from dpokit.cli import main
from dpokit.data.load import load_pairs
from dpokit.data.sources import folder_files, iter_rows
from dpokit.errors import UserError

STANDARD = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
    {"prompt": "Say hi", "chosen": "hi", "rejected": "no"},
]
TEST_ROWS = [{"prompt": "Colour of the sky?", "chosen": "blue", "rejected": "green"}]
CONVERSATIONAL = [
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Count to {n}."}],
        "chosen": [{"role": "assistant", "content": " ".join(str(i) for i in range(1, n + 1))}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    for n in (2, 3, 4)
]


def save_dataset(path: Path, rows: list[dict]) -> Path:
    from datasets import Dataset

    Dataset.from_list(rows).save_to_disk(str(path))
    return path


def save_dataset_dict(path: Path, **splits: list[dict]) -> Path:
    from datasets import Dataset, DatasetDict

    DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(str(path))
    return path


def triplets(source: Path, split: str = "train") -> list[tuple]:
    return [(p.prompt, p.chosen, p.rejected) for p in load_pairs(str(source), split=split).pairs]


def test_saved_dataset_reads_its_rows_not_its_metadata(tmp_path):
    saved = save_dataset(tmp_path / "ds_saved", STANDARD)
    assert {p.name for p in saved.iterdir()} >= {"state.json", "dataset_info.json"}
    rows = list(iter_rows(str(saved)))
    assert [row for _, row in rows] == STANDARD
    assert [origin for origin, _ in rows] == [f"{saved}:{n}" for n in (1, 2, 3)]
    assert triplets(saved) == [(r["prompt"], r["chosen"], r["rejected"]) for r in STANDARD]
    # a saved Dataset is one split, read whatever split is asked for, as a single file is
    assert triplets(saved, split="test") == triplets(saved)


def test_saved_dataset_dict_gives_the_requested_split(tmp_path):
    saved = save_dataset_dict(tmp_path / "dsdict_saved", train=STANDARD, test=TEST_ROWS)
    assert triplets(saved, "train") == [(r["prompt"], r["chosen"], r["rejected"]) for r in STANDARD]
    assert triplets(saved, "test") == [("Colour of the sky?", "blue", "green")]
    assert [origin for origin, _ in iter_rows(str(saved), split="test")] == [f"{saved}[test]:1"]


def test_saved_dataset_dict_missing_split_is_one_line_naming_the_splits(tmp_path):
    saved = save_dataset_dict(tmp_path / "dsdict_saved", train=STANDARD, test=TEST_ROWS)
    with pytest.raises(UserError, match=r"has splits train, test but none named `validation`; set train_split"):
        list(iter_rows(str(saved), split="validation"))


def test_saved_dataset_dict_split_prefix_matches_when_unambiguous(tmp_path):
    saved = save_dataset_dict(tmp_path / "prefs", train_prefs=STANDARD, test_prefs=TEST_ROWS, test_gen=TEST_ROWS)
    assert len(triplets(saved, "train")) == 3
    with pytest.raises(UserError, match=r"splits test_prefs, test_gen all match split `test`"):
        list(iter_rows(str(saved), split="test"))


def test_conversational_saved_dataset_keeps_its_messages(tmp_path):
    saved = save_dataset_dict(tmp_path / "chat", train=CONVERSATIONAL)
    loaded = load_pairs(str(saved))
    assert loaded.format == "trl" and all(p.conversational for p in loaded.pairs)
    assert [p.to_dict() for p in loaded.pairs] == CONVERSATIONAL


def test_arrow_files_given_directly_and_in_a_plain_folder(tmp_path):
    import pyarrow as pa

    saved = save_dataset(tmp_path / "ds", STANDARD)
    (arrow,) = saved.glob("*.arrow")
    assert [row for _, row in iter_rows(str(arrow))] == STANDARD
    # the random-access Arrow file format (Feather v2), as pyarrow or pandas write it
    feather = tmp_path / "pairs.arrow"
    table = pa.Table.from_pylist(TEST_ROWS * 600)  # more rows than one read batch
    with pa.ipc.new_file(str(feather), table.schema) as writer:
        writer.write_table(table)
    rows = list(iter_rows(str(feather)))
    assert len(rows) == 600 and rows[-1] == (f"{feather}:600", TEST_ROWS[0])


def test_folder_scan_leaves_out_datasets_metadata_and_says_what_it_read(tmp_path, caplog):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in STANDARD), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "", "features": {}}))
    (folder / "dataset_infos.json").write_text(json.dumps({"default": {"description": ""}}))
    with caplog.at_level(logging.WARNING, logger="dpokit.data.sources"):
        assert folder_files(folder, "train") == [folder / "pairs.jsonl"]
    assert "read pairs.jsonl as data; left out `datasets` metadata dataset_info.json, dataset_infos.json" in caplog.text
    assert len(triplets(folder)) == 3


def test_folder_holding_a_saved_dataset_dict_reads_its_split_folders(tmp_path):
    save_dataset_dict(tmp_path / "outer" / "saved", train=STANDARD, test=TEST_ROWS)
    files = folder_files(tmp_path / "outer", "test")
    assert [f.relative_to(tmp_path / "outer").parts[:2] for f in files] == [("saved", "test")]
    assert triplets(tmp_path / "outer", "test") == [("Colour of the sky?", "blue", "green")]


def test_metadata_file_given_as_data_names_the_folder(tmp_path):
    saved = save_dataset(tmp_path / "ds", STANDARD)
    with pytest.raises(UserError, match=r"is `datasets` metadata, not rows; give the folder"):
        list(iter_rows(str(saved / "dataset_info.json")))


def test_data_prepare_reads_saved_folders(tmp_path, capsys):
    saved = save_dataset_dict(tmp_path / "dsdict_saved", train=STANDARD, test=TEST_ROWS)
    out = tmp_path / "out.jsonl"
    assert main(["data", "prepare", str(saved), "--output", str(out), "--test-size", "0"]) == 0
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [row["chosen"] for row in written] == [[{"role": "assistant", "content": r["chosen"]}] for r in STANDARD]
    assert "3 rows (format trl, detected from columns prompt, chosen, rejected)" in capsys.readouterr().out
    assert main(["data", "prepare", str(saved), "--output", str(out), "--split", "dev", "--overwrite"]) == 2
    assert "none named `dev`" in capsys.readouterr().err
