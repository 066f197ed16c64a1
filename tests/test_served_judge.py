"""The `openai:` judge against a real OpenAI-compatible server: `transformers serve` with the built-in model.

Three questions and short answers keep it to a minute or so on CPU. The server's replies are whatever the 135M
model writes; the tests check that every verdict in the files is what the reply in the same row says, that
unparseable replies are counted as failures and shown, and that the flags reach the requests.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REAL_DATA
from dpokit.cli import main
from dpokit.judge_prompts import parse_verdict
from dpokit.mtbench import fastchat_verdict
from served_model import ServedModel, serve

pytestmark = pytest.mark.builtin

BUILTIN = "builtin:smollm2-135m-instruct"
REAL_PROMPTS = REAL_DATA / "mt_bench" / "judge_prompts.jsonl"
QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Name a colour of the sky.", "Now name another one."]},
    {"question_id": 2, "category": "math", "turns": ["What is 2 + 3?", "And 2 * 3?"]},
    {"question_id": 3, "category": "stem", "turns": ["What gas do plants take in?"]},
]
REFERENCES = [  # our own reference answers, in FastChat's reference_answer layout
    {"question_id": 2, "model_id": "ref", "choices": [{"index": 0, "turns": ["5", "6"]}]},
]
WINNER = {"A": "first", "B": "second", "tie": "tie", None: "error"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        pytest.skip("transformers serve needs the serving extra (pip install 'dpokit[serving]')")
    from dpokit.models import resolve_model_path

    model = serve(resolve_model_path(BUILTIN), tmp_path_factory.mktemp("served"))
    try:
        yield model
    finally:
        model.stop()
    assert model.process.poll() is not None


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_rows_follow_the_replies(output: Path, parse, summary: dict) -> None:
    """Each g*_winner is the model named by the parsed reply of that order; failures are the unparsed ones."""
    rows = _jsonl(output / "model_judgment" / "dpokit_pair.jsonl")
    unparsed = 0
    for row in rows:
        for order, (first, second) in (("g1", ("model_1", "model_2")), ("g2", ("model_2", "model_1"))):
            reply = row[f"{order}_judgment"]  # None where the request failed (counted under its own reason)
            verdict = None if reply is None else parse(reply)
            unparsed += reply is not None and verdict is None
            assert row[f"{order}_winner"] == {"A": first, "B": second, "tie": "tie", None: "error"}[verdict]
    failures = sum("error" in (r["g1_winner"], r["g2_winner"]) for r in rows)
    assert summary["judge_failures"] == failures
    assert summary["judge_failure_reasons"].get("unparseable reply", 0) == unparsed
    assert summary["total"] + failures == len(rows)


def test_compare_through_the_served_model(
    served: ServedModel, tiny_model_dir: Path, tiny_ref_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    prompts = _write(tmp_path / "question.jsonl", QUESTIONS)
    output = tmp_path / "ours"
    argv = ["compare", "--model-a", str(tiny_model_dir), "--model-b", str(tiny_ref_model_dir), "--name-a", "one"]
    argv += ["--name-b", "two", "--prompts", str(prompts), "--max-new-tokens", "8", "--judge", served.judge_spec]
    argv += ["--judge-max-tokens", "12", "--judge-concurrency", "2", "--judge-timeout", "120", "--output"]
    assert main([*argv, str(output)]) == 0
    summary = json.loads((output / "summary.json").read_text())
    rows = _jsonl(output / "model_judgment" / "dpokit_pair.jsonl")
    assert [(r["question_id"], r["turn"]) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1)]
    for r in rows:
        assert r["judge"] == [served.judge_spec, "dpokit-pair" if r["turn"] == 1 else "dpokit-pair-multi-turn"]
        assert "[Answer A]" in r["g1_user_prompt"]  # our prompt, as the server was sent it
    _check_rows_follow_the_replies(output, parse_verdict, summary)
    shown = capsys.readouterr().out
    if summary["judge_failures"]:
        assert f"judge gave no verdict {sum(summary['judge_failure_reasons'].values())} times" in shown

    # one request at a time, on answers read back from the files, gives the same replies (greedy)
    one = tmp_path / "one-at-a-time"
    answers = ["--answers-a", f"{output}/model_answer/one.jsonl", "--answers-b", f"{output}/model_answer/two.jsonl"]
    argv_one = ["compare", *answers, "--prompts", str(prompts), "--limit", "1", "--judge", served.judge_spec]
    argv_one += ["--judge-max-tokens", "12", "--judge-concurrency", "1", "--judge-timeout", "120"]
    assert main([*argv_one, "--output", str(one)]) == 0
    replies = [(r["g1_judgment"], r["g2_judgment"]) for r in _jsonl(one / "model_judgment" / "dpokit_pair.jsonl")]
    assert replies == [(r["g1_judgment"], r["g2_judgment"]) for r in rows[:2]]


@pytest.mark.skipif(not REAL_PROMPTS.is_file(), reason=f"FastChat's judge_prompts.jsonl is not at {REAL_PROMPTS}")
def test_mt_bench_prompts_through_the_served_model(served: ServedModel, tmp_path: Path) -> None:
    prompts = _write(tmp_path / "question.jsonl", QUESTIONS[:2])
    references = _write(tmp_path / "reference.jsonl", REFERENCES)
    a = _write(tmp_path / "alpha.jsonl", [_answer(q, "blue") for q in QUESTIONS])
    b = _write(tmp_path / "beta.jsonl", [_answer(q, "I think it is five, or six.") for q in QUESTIONS])
    output = tmp_path / "mtbench"
    argv = ["compare", "--answers-a", str(a), "--answers-b", str(b), "--prompts", str(prompts), "--output", str(output)]
    argv += ["--judge", served.judge_spec, "--judge-prompts", str(REAL_PROMPTS), "--reference-answers", str(references)]
    assert main([*argv, "--judge-max-tokens", "12", "--judge-concurrency", "2", "--judge-timeout", "120"]) == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["judge_prompts"] == "mt-bench"
    assert (summary["model_a"]["model_id"], summary["model_b"]["model_id"]) == ("alpha", "beta")
    rows = _jsonl(output / "model_judgment" / "dpokit_pair.jsonl")
    names = [r["judge"][1] for r in rows]
    assert names == ["pair-v2", "pair-v2-multi-turn", "pair-math-v1", "pair-math-v1-multi-turn"]
    assert rows[0]["g1_user_prompt"].startswith("[User Question]\nName a colour of the sky.")
    assert "[The Start of Reference Answer]\n5\n" in rows[2]["g1_user_prompt"]
    _check_rows_follow_the_replies(output, fastchat_verdict, summary)


def _answer(question: dict, text: str) -> dict:
    turns = [f"{text} ({i})" for i in range(1, len(question["turns"]) + 1)]
    return {"question_id": question["question_id"], "model_id": "x", "choices": [{"index": 0, "turns": turns}]}


def test_timeouts_reach_the_request(served: ServedModel, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prompts = _write(tmp_path / "question.jsonl", QUESTIONS[:1])
    a = _write(tmp_path / "a.jsonl", [_answer(QUESTIONS[0], "red")])
    b = _write(tmp_path / "b.jsonl", [_answer(QUESTIONS[0], "green")])
    argv = ["compare", "--answers-a", str(a), "--answers-b", str(b), "--prompts", str(prompts), "--output"]
    argv += [str(tmp_path / "out"), "--judge-max-tokens", "4"]  # the server still writes the reply it was asked
    argv += ["--judge", served.judge_spec, "--judge-timeout", "0.05", "--judge-retries", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"no reply from {served.base_url} within 0.05 s" in err and "Traceback" not in err
    # a model the server does not serve is named in one line too
    wrong = served.judge_spec.replace(served.folder, "other-model")
    assert main([*argv[:-6], "--judge", wrong]) == 2
    assert "pinned" in capsys.readouterr().err


def test_generate_ranks_with_the_served_model(served: ServedModel, tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name a fruit.\nName a planet.\n")
    output = tmp_path / "pairs.jsonl"
    argv = ["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--num-samples", "2"]
    argv += ["--max-new-tokens", "8", "--judge", served.judge_spec, "--judge-max-tokens", "8", "--output", str(output)]
    argv += ["--judge-concurrency", "2", "--judge-timeout", "120"]
    assert main(argv) == 0
    pairs = _jsonl(output) if output.exists() else []
    skipped = (
        _jsonl(output.with_name("pairs.skipped.jsonl")) if output.with_name("pairs.skipped.jsonl").exists() else []
    )
    assert len(pairs) + len(skipped) == 2  # every prompt is written as a pair or set aside with its reason
    for row in pairs:
        assert row["judge"] == served.judge_spec
        assert row["score_chosen"] > row["score_rejected"]
