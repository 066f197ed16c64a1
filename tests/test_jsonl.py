"""The one JSON-lines reader and each caller's policy: generate cuts a torn tail and refuses foreign lines, report
notes bad lines and skips them, train drops a torn tail of metrics.jsonl (a kill mid-append) and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpokit.errors import UserError
from dpokit.jsonl import read_jsonl
from dpokit.loop import read_lines as _read_lines
from dpokit.onpolicy import read_rows
from dpokit.report import read_metrics
from test_train import metrics, run_train, settings

TORN = '{"step": 3, "lo'  # what a kill leaves while a row is being appended


def test_a_torn_tail_is_read_dropped_or_cut_as_asked(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    whole = '{"a": 1}\n\n{"a": 2}\n'
    path.write_text(whole + TORN, encoding="utf-8")

    read = read_jsonl(path)  # a person's file: the last line is a line like any other
    assert [r["a"] for r in read.rows] == [1, 2] and read.bad_lines == [4] and not read.torn_tail

    dropped = read_jsonl(path, tail="drop")
    assert [r["a"] for r in dropped.rows] == [1, 2] and dropped.bad_lines == [] and dropped.torn_tail
    assert path.read_text(encoding="utf-8") == whole + TORN  # left in place

    cut = read_jsonl(path, tail="cut")
    assert cut.rows == dropped.rows and cut.torn_tail
    assert path.read_text(encoding="utf-8") == whole  # appending goes on after the last whole row


def test_a_complete_last_line_without_newline_is_kept_only_when_read(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}', encoding="utf-8")
    assert [r["a"] for r in read_jsonl(path).rows] == [1, 2]
    assert [r["a"] for r in read_jsonl(path, tail="drop").rows] == [1]


def test_bad_lines_are_numbered_and_kept_rows_keep_their_text(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"step": 1}\n[1, 2]\nnot json\n{"other": 1}\n{"step":  2}\n', encoding="utf-8")
    found = read_jsonl(path, lambda row: "step" in row)
    assert [r["step"] for r in found.rows] == [1, 2]
    assert found.lines == ['{"step": 1}', '{"step":  2}']  # as in the file, spacing included
    assert found.bad_lines == [2, 3, 4]
    with pytest.raises(UserError, match=r"rows.jsonl:2 is not a step row; remove it$"):
        found.require_clean(path, "a step row", "remove it")
    assert read_jsonl(tmp_path / "missing.jsonl").rows == []


def test_generate_cuts_a_torn_tail_and_refuses_a_foreign_line(tmp_path: Path) -> None:
    output = tmp_path / "pairs.jsonl"
    row = json.dumps({"prompt_id": "p1", "chosen": []})
    output.write_text(row + "\n" + TORN, encoding="utf-8")
    assert read_rows(output, repair=False) == [json.loads(row)]
    assert output.read_text(encoding="utf-8").endswith(TORN)
    assert read_rows(output, repair=True) == [json.loads(row)]
    assert output.read_text(encoding="utf-8") == row + "\n"
    output.write_text(row + "\n" + json.dumps({"prompt": "no id"}) + "\n" + row + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"pairs.jsonl:2 is not a row written by dpokit generate"):
        read_rows(output, repair=False)


def test_report_notes_bad_metric_lines_and_skips_them(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.69}\n{"step": "x"}\n{"step": 2, "loss": 0.5}\n' + TORN, encoding="utf-8")
    notes: list[str] = []
    train, _ = read_metrics(path, notes)
    assert train["loss"] == [(1.0, 0.69), (2.0, 0.5)]
    assert notes == ["metrics.jsonl: 2 line(s) were not metric rows (JSON objects with a numeric step) and left out"]


def test_train_reads_metrics_without_their_torn_tail_but_not_past_a_broken_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n' + TORN, encoding="utf-8")
    assert _read_lines(path) == ['{"step": 1}', '{"step": 2}']
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"metrics.jsonl:2 is not a metrics row"):
        _read_lines(path)


def test_train_resumes_after_a_kill_tore_the_last_metrics_row(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    config = settings(tiny_model_dir, pairs_file, out, "max_steps=3", "per_device_train_batch_size=2", "save_steps=2")
    run_train(*config)  # a checkpoint at step 2, then step 3
    with (out / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write(TORN)
    run_train(*config, "resume=true")  # step 3 again, from the checkpoint
    assert [row["step"] for row in metrics(out)] == [1, 2, 3]
