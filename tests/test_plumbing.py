"""The shared plumbing every command uses: the sampling flags, progress by increments, part files, output probes
and the appending writer."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from dpokit.console import Quiet, progress_counter
from dpokit.distributed import part_path, parts_of
from dpokit.errors import UserError
from dpokit.generation import SamplingSettings, sampling_from_args
from dpokit.jsonl import read_jsonl
from dpokit.outputs import JsonlAppender, ensure_file_writable


def flags(**given: float) -> argparse.Namespace:
    values = {"temperature": 0.7, "max_new_tokens": 16, "sampling_seed": 3, "batch_size": 4, **given}
    return argparse.Namespace(**values)


def test_one_answer_per_prompt_reads_only_the_shared_flags() -> None:
    # compare, chat and vibe have no --num-samples or --top-p
    assert sampling_from_args(flags()) == SamplingSettings(1, 0.7, 1.0, 16, 3, 4)


def test_several_answers_read_num_samples_and_top_p() -> None:
    settings = sampling_from_args(flags(num_samples=5, top_p=0.9), several=True)
    assert settings == SamplingSettings(5, 0.7, 0.9, 16, 3, 4)


@pytest.mark.parametrize(
    ("given", "several", "message"),
    [
        ({"temperature": -0.1}, False, r"--temperature must be 0 \(greedy\) or more, got -0.1"),
        ({"max_new_tokens": 0}, False, r"--max-new-tokens must be at least 1, got 0"),
        ({"batch_size": 0}, False, r"--batch-size must be at least 1, got 0"),
        ({"num_samples": 1, "top_p": 1.0}, True, r"--num-samples must be at least 2 \(a pair needs two answers\)"),
        ({"num_samples": 2, "top_p": 0.0}, True, r"--top-p must be in \(0, 1\], got 0.0"),
    ],
)
def test_sampling_flags_are_checked_with_one_line(given: dict, several: bool, message: str) -> None:
    with pytest.raises(UserError, match=message):
        sampling_from_args(flags(**given), several=several)


def test_progress_counter_adds_increments_and_shows_the_rate() -> None:
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=False)
    with progress_counter(console, 12, label="sampling", unit="answers", rate_unit="responses") as advance:
        for _ in range(4):
            advance(3)
    text = out.getvalue()
    assert "12/12 answers" in text and "responses/s" in text
    with progress_counter(Quiet(), 12) as advance:  # non-main processes
        advance(3)
    silent = io.StringIO()
    with progress_counter(Console(file=silent), 0, label="nothing") as advance:  # nothing to count: no bar
        pass
    assert silent.getvalue() == ""


def test_part_files_sit_beside_their_output(tmp_path: Path) -> None:
    output = tmp_path / "pairs.jsonl"
    assert part_path(output, 1) == tmp_path / "pairs.jsonl.rank1.part"
    for rank in (1, 0):
        part_path(output, rank).write_text("", encoding="utf-8")
    part_path(tmp_path / "pairs.skipped.jsonl", 0).write_text("", encoding="utf-8")  # another output's part
    assert parts_of(output) == [part_path(output, 0), part_path(output, 1)]


def test_an_output_file_is_probed_before_work_starts(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--output .* is a folder; give a file such as .*pairs.jsonl"):
        ensure_file_writable(tmp_path, "--output")
    target = tmp_path / "new" / "pairs.jsonl"
    ensure_file_writable(target, "--output")
    assert target.parent.is_dir()
    blocked = tmp_path / "a-file"
    blocked.write_text("", encoding="utf-8")
    with pytest.raises(UserError, match=r"--output: .*a-file cannot be written"):
        ensure_file_writable(blocked / "pairs.jsonl", "--output")  # its folder is a file


def test_appended_rows_are_on_disk_after_each_commit(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    writer = JsonlAppender(path)
    writer.write([])
    assert not path.exists()  # opened on the first row
    writer.write([{"prompt_id": "a", "text": "é"}])
    writer.commit()
    assert read_jsonl(path).rows == [{"prompt_id": "a", "text": "é"}]
    writer.write([{"prompt_id": "b"}])
    writer.close()
    assert [json.loads(line)["prompt_id"] for line in path.read_text(encoding="utf-8").splitlines()] == ["a", "b"]
