"""`dpokit data inspect / prepare / formats` run for real through the command line, on the tiny tokenizer.

Token counts are known by construction: the tiny tokenizer has no merges for `~`, so `"~" * n` is n tokens. A
standard pair then has n prompt tokens and each response its tildes plus EOS; a conversational one adds the
ChatML frame (11 prompt tokens, 2 per response).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from dpokit.cli import main
from dpokit.data import inspection as inspect_module
from dpokit.data.encode import encode_pairs
from dpokit.data.formats import FORMATS
from dpokit.data.inspection import dataset_stats
from dpokit.data.load import PairReader, load_pairs
from dpokit.models import load_tokenizer
from tiny import save_tiny


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(save_tiny(tmp_path_factory.mktemp("tiny") / "model"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tildes(prompt: int, chosen: int, rejected: int) -> dict:
    return {"prompt": "~" * prompt, "chosen": "~" * chosen, "rejected": "~" * rejected}


# prompts of 2, 4, ..., 20 tokens; chosen 5 tildes (6 tokens with EOS) but 25 in the last pair; rejected 3 (4)
LENGTH_ROWS = [tildes(p, 25 if p == 20 else 5, 3) for p in range(2, 21, 2)]


def run_json(capsys, *argv: str) -> dict:
    assert main(["data", "inspect", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_token_percentiles_limits_and_length_bias(tmp_path, capsys, model):
    path = write_jsonl(tmp_path / "d.jsonl", LENGTH_ROWS)
    stats = run_json(capsys, str(path), "--model", model, "--max-length", "20", "--max-prompt-length", "15")
    assert (stats["rows"], stats["pairs"], stats["format"], stats["format_detected"]) == (10, 10, "trl", True)
    # numpy's linear percentiles by hand: p90 of x sits at index 0.9 * 9 = 8.1 of the sorted values
    assert stats["tokens"]["prompt"] == {"p50": 11.0, "p90": 18.2, "p95": 19.1, "p99": 19.8, "max": 20, "mean": 11.0}
    assert stats["tokens"]["chosen"] == {"p50": 6.0, "p90": 8.0, "p95": 17.0, "p99": 24.2, "max": 26, "mean": 8.0}
    assert stats["tokens"]["rejected"] == {"p50": 4.0, "p90": 4.0, "p95": 4.0, "p99": 4.0, "max": 4, "mean": 4.0}
    assert stats["tokens"]["total"]["max"] == 46
    # prompts of 16, 18, 20 keep their last 15 tokens; then 5 tokens are left for responses of 6, 6 and 26
    assert stats["length_limits"]["rows_over_limits"] == 3
    assert stats["length_limits"]["effects"] == {"prompts truncated": 3, "responses truncated": 3}
    limits = ["--max-length", "20", "--max-prompt-length", "15", "--length-policy", "drop"]
    dropped = run_json(capsys, str(path), "--model", model, *limits)["length_limits"]
    assert (dropped["rows_over_limits"], dropped["effects"]) == (3, {"dropped: prompt over max_prompt_length": 3})
    assert stats["quality"] == {
        "identical_pairs": 0,
        "empty_responses": 0,
        "templated_prompts": 0,
        "duplicate_pairs": 0,
        "chosen_longer": 10,
        "rejected_longer": 0,
        "chosen_longer_share": 1.0,
    }
    assert any(
        w.startswith("length bias: the chosen response is longer than the rejected in 100%") for w in stats["warnings"]
    )


def test_inspect_table_shows_the_same_numbers(tmp_path, capsys, model):
    path = write_jsonl(tmp_path / "d.jsonl", LENGTH_ROWS)
    assert main(["data", "inspect", str(path), "--model", model, "--max-length", "20"]) == 0
    out = capsys.readouterr().out
    assert "trl (detected from columns prompt, chosen, rejected)" in out and "10 (0 conversational)" in out
    assert "18.2" in out and "24.2" in out and "100.0%" in out
    assert "over max_length=20" in out


def test_inspect_quality_warnings_and_bad_rows(tmp_path, capsys, model):
    rows = [
        tildes(3, 2, 1),
        tildes(3, 2, 1),  # duplicate
        tildes(4, 2, 2),  # identical chosen and rejected
        tildes(5, 1, 2),
        {"prompt": "~", "chosen": "", "rejected": "~"},  # empty response: kept as given
        "not json\n",
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    stats = run_json(capsys, str(path), "--model", model, "--max-bad-rows", "1")
    assert (stats["rows"], stats["pairs"], stats["bad_rows"]) == (6, 5, 1)
    assert stats["bad_row_kinds"] == {"invalid JSON": 1}
    assert stats["rejected_file"] == str(tmp_path / "d.rejected.jsonl")
    side = [json.loads(line) for line in (tmp_path / "d.rejected.jsonl").read_text().splitlines()]
    assert [(r["origin"], r["kind"]) for r in side] == [(f"{path}:6", "invalid JSON"), (f"{path}:5", "empty response")]
    assert side[1]["reason"] == "chosen response is empty; kept as given"
    assert {k: stats["quality"][k] for k in ("identical_pairs", "empty_responses", "duplicate_pairs")} == {
        "identical_pairs": 1,
        "empty_responses": 1,
        "duplicate_pairs": 1,
    }
    assert stats["quality"]["chosen_longer_share"] == 0.4  # 2 of 5: neither side biased
    assert not any("length bias" in w for w in stats["warnings"])
    assert len(stats["warnings"]) == 4


def test_inspect_fails_with_code_2_after_reporting_too_many_bad_rows(tmp_path, capsys, model):
    path = write_jsonl(tmp_path / "d.jsonl", [tildes(3, 2, 1), "{oops\n", {"prompt": "~", "chosen": "~"}])
    assert main(["data", "inspect", str(path), "--model", model]) == 2
    captured = capsys.readouterr()
    assert f"bad row {path}:2: invalid JSON" in captured.out
    assert f"bad row {path}:3: missing column 'rejected'" in captured.out
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"dpokit: error: {path}:2: invalid JSON") and "Traceback" not in captured.err
    assert len((tmp_path / "d.rejected.jsonl").read_text().splitlines()) == 2


def test_inspect_streams_in_chunks_with_the_same_result(tmp_path, capsys, model, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", LENGTH_ROWS)
    whole = run_json(capsys, str(path), "--model", model, "--max-length", "20")
    monkeypatch.setattr(inspect_module, "CHUNK_PAIRS", 3)
    assert run_json(capsys, str(path), "--model", model, "--max-length", "20") == whole


def test_reader_is_lazy(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [tildes(i + 1, 1, 2) for i in range(1000)])
    reader = PairReader(str(path))
    first = next(iter(reader))
    assert first.origin == f"{path}:1" and reader.rows == 1


def test_dataset_stats_for_training_equals_inspect(tmp_path, capsys, model):
    rows = [
        {"prompt": [{"role": "user", "content": "~" * n}], "chosen": "~" * (n + 2), "rejected": "~"}
        for n in range(1, 8)
    ]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    inspected = run_json(capsys, str(path), "--model", model, "--max-length", "18")
    assert inspected["tokens"]["prompt"]["max"] == 11 + 7 and inspected["tokens"]["chosen"]["max"] == 9 + 2
    loaded = load_pairs(str(path))
    encoded = encode_pairs(load_tokenizer(model), loaded.pairs)
    stats = dataset_stats(loaded, encoded, max_length=18, max_prompt_length=None, tokenizer_name=model)
    assert stats == inspected


def test_inspect_plot(tmp_path, capsys, model):
    path = write_jsonl(tmp_path / "d.jsonl", LENGTH_ROWS)
    plot = tmp_path / "plots" / "lengths.png"
    assert main(["data", "inspect", str(path), "--model", model, "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote length histograms to {plot}" in capsys.readouterr().out


def test_formats_lists_every_layout(capsys):
    assert main(["data", "formats"]) == 0
    out = capsys.readouterr().out
    for name in FORMATS:
        assert name in out


# --- prepare ----------------------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_prepare_normalizes_deduplicates_and_splits_by_prompt(tmp_path, capsys):
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(1, 11)]
    rows += [
        {"prompt": "q1", "chosen": "good 1", "rejected": "bad 1"},  # duplicate
        {"prompt": "q1", "chosen": "better 1", "rejected": "bad 1"},  # same prompt, another pair
        {"prompt": "q2", "chosen": "same", "rejected": "same"},  # identical responses
        "not json\n",
    ]
    source = write_jsonl(tmp_path / "raw.jsonl", rows)
    out = tmp_path / "prepared" / "pairs.jsonl"
    argv = ["data", "prepare", str(source), "--output", str(out), "--test-size", "0.2", "--max-bad-rows", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    train, test = read_jsonl(out), read_jsonl(out.with_name("pairs.test.jsonl"))
    assert len(train) + len(test) == 11 and len(test) >= 3  # ceil(0.2 * 11)
    detected = "format trl, detected from columns prompt, chosen, rejected"
    assert f"{source}: 14 rows ({detected}): {len(train)} pairs to {out} (train), {len(test)} to " in printed
    assert "left out: 1 bad rows (reasons in" in printed
    assert "1 duplicate pairs, 1 identical chosen and rejected" in printed
    assert (out.parent / "raw.rejected.jsonl").exists()
    assert train[0] == {
        "prompt": [{"role": "user", "content": "q1"}],
        "chosen": [{"role": "assistant", "content": "good 1"}],
        "rejected": [{"role": "assistant", "content": "bad 1"}],
    }
    prompts = lambda pairs: {p["prompt"][0]["content"] for p in pairs}  # noqa: E731
    assert not prompts(train) & prompts(test)
    # the files are there now: replaced only on request, and the same seed gives the same split
    assert main(argv) == 2
    assert f"{out} and {out.with_name('pairs.test.jsonl')} exist already" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert read_jsonl(out.with_name("pairs.test.jsonl")) == test
    # without a test split, the earlier one is removed rather than left beside the new training file
    assert main([*argv, "--overwrite", "--test-size", "0"]) == 0
    assert len(read_jsonl(out)) == 11 and not out.with_name("pairs.test.jsonl").exists()


@pytest.mark.parametrize(
    "limit,kept,reason",
    [
        (["--max-length", "20"], 4, "6 over 20 tokens"),
        (["--filter-percentile", "50"], 5, "5 over the 50th length percentile (21 tokens)"),
    ],
)
def test_prepare_length_filters(tmp_path, capsys, model, limit, kept, reason):
    # as conversations: 11 + p prompt tokens, 3 + 2 chosen tokens, so 16 + p in all, for p = 1..10
    source = write_jsonl(tmp_path / "raw.jsonl", [tildes(p, 3, 1) for p in range(1, 11)])
    out = tmp_path / "out.jsonl"
    assert (
        main(["data", "prepare", str(source), "--output", str(out), "--model", model, "--test-size", "0", *limit]) == 0
    )
    printed = capsys.readouterr().out
    assert [len(r["prompt"][0]["content"]) for r in read_jsonl(out)] == list(range(1, kept + 1))
    assert reason in printed and "no test split" in printed
    assert not (tmp_path / "out.test.jsonl").exists()


# --- bad input: one line, exit code 2, no traceback -------------------------------------------------------------------


def _bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    good = write_jsonl(tmp / "good.jsonl", [tildes(2, 1, 2), tildes(3, 1, 2)])
    (tmp / "empty.jsonl").write_text("")
    (tmp / "pairs.txt").write_text("hello")
    (tmp / "nodata").mkdir()
    write_jsonl(tmp / "odd.jsonl", [{"question": "q", "answer": "a"}])
    write_jsonl(tmp / "broken.jsonl", [tildes(2, 1, 2), "{broken\n"])
    write_jsonl(tmp / "typed.jsonl", [{"prompt": "q", "chosen": 3, "rejected": "b"}])
    (tmp / "bytes.jsonl").write_bytes(b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}\n')
    inspect, prepare = ["data", "inspect"], ["data", "prepare"]
    out = ["--output", str(tmp / "o.jsonl")]
    return [
        (inspect + [str(tmp / "missing.jsonl")], "does not exist"),
        (inspect + [str(tmp / "empty.jsonl")], "is empty"),
        (inspect + [str(tmp / "pairs.txt")], "unknown file type `.txt`"),
        (inspect + [str(tmp / "nodata")], "holds no .jsonl, .json, .csv, .parquet or .arrow files"),
        (inspect + [str(tmp / "odd.jsonl")], "unknown format (columns: answer, question)"),
        (inspect + [str(tmp / "broken.jsonl")], "broken.jsonl:2: invalid JSON"),
        (inspect + [str(tmp / "bytes.jsonl")], "bytes.jsonl:1: undecodable bytes"),
        (inspect + [str(tmp / "typed.jsonl")], "typed.jsonl:1: column 'chosen' must be text, got int"),
        (inspect + [str(good), "--plot", str(tmp / "plot.xyz")], "--plot"),
        (inspect + [str(good), "--data-format", "nope"], "--data-format 'nope': must be auto or one of"),
        (inspect + [str(good), "--columns", "[a, b]"], "--columns: expected a mapping, got '[a, b]'"),
        (inspect + [str(good), "--columns", "{chosen: x}"], "maps chosen, rejected and optionally prompt"),
        (inspect + [str(good), "--data-format", "orca"], "missing column 'question'"),
        (
            inspect + [str(good), "--max-length", "10", "--max-prompt-length", "10"],
            "--max-prompt-length 10: must be below",
        ),
        (inspect + [str(good), "--min-score-margin", "-1"], "--min-score-margin -1.0: must be 0 or more"),
        (inspect + ["nobody/no-such-dataset"], "the hub could not provide it"),
        (prepare + [str(good), "--output", str(tmp / "o.csv")], "give a .jsonl file name"),
        (prepare + [str(good), "--output", str(good)], "is the input file"),
        (prepare + [str(good), *out, "--test-size", "1.5"], "--test-size 1.5"),
        (prepare + [str(good), *out, "--test-size", "2"], "leaves no training pairs out of 2"),
        (prepare + [str(good), *out, "--filter-percentile", "0"], "--filter-percentile 0: must be in (0, 100]"),
        (prepare + [str(tmp / "missing.jsonl"), *out], "does not exist"),
    ]


def test_bad_inputs_give_one_line_and_exit_code_2(tmp_path, capsys, model):
    for argv, message in _bad_inputs(tmp_path):
        code = main([*argv, "--model", model] if argv[1] == "inspect" else argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        (line,) = err.strip().splitlines()
        assert line.startswith("dpokit: error: ") and message in line, (argv, line)
