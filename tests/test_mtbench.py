"""MT-Bench's own files: judge prompts rendered exactly as FastChat renders them, FastChat's verdict rule, answer and
reference files in FastChat's layout, and FastChat's `show_result.py` tallying our judgment file as we do.

FastChat's code and its judge_prompts.jsonl are read where they are installed / stored; tests that need them skip
with the reason otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from conftest import REAL_DATA
from dpokit.cli import main
from dpokit.compare import ComparisonRecord, Contestant, comparison_summary, write_comparison
from dpokit.errors import UserError
from dpokit.generation import SamplingSettings
from dpokit.mtbench import (
    MTBenchPrompts,
    answers_for,
    fastchat_verdict,
    load_answer_file,
    load_judge_prompts,
)
from dpokit.questions import Question
from dpokit.verdicts import Game

REAL = REAL_DATA / "mt_bench"
JUDGE_PROMPTS = REAL / "judge_prompts.jsonl"
needs_prompts = pytest.mark.skipif(not JUDGE_PROMPTS.is_file(), reason=f"no judge_prompts.jsonl at {REAL}")
HAS_FASTCHAT = importlib.util.find_spec("fastchat") is not None and importlib.util.find_spec("pandas") is not None
needs_fastchat = pytest.mark.skipif(
    not HAS_FASTCHAT, reason="FastChat's reader needs `pip install --no-deps fschat==0.2.36` and pandas"
)

QUESTIONS = [
    Question(81, ("Write a haiku about rain.", "Now make it about snow."), "writing"),
    Question(111, ("What is 7 * 6?", "And 7 * 7?"), "math"),
    Question(130, ("Write a Python function that reverses a string.",), "coding"),
]
ANSWERS_1 = [["Rain taps on the roof.", "Snow hushes the town."], ["42", "48"], ["def r(s): return s[::-1]"]]
ANSWERS_2 = [["Grey sky, wet street, calm.", "White fields, no sound."], ["It is 42.", "It is 49."], ["s[::-1]"]]
REFERENCES = {"111": ["42", "49"], "130": ["def reverse(s):\n    return s[::-1]"]}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _answer_rows(model_id: str, answers: list[list[str]]) -> list[dict]:
    return [
        {"question_id": q.question_id, "model_id": model_id, "choices": [{"index": 0, "turns": a}]}
        for q, a in zip(QUESTIONS, answers, strict=True)
    ]


# --- FastChat's rendering and verdict rule, through FastChat's own code ----------------------------------------------


@pytest.fixture(scope="module")
def fastchat_common():
    """fastchat.llm_judge.common; it imports `anthropic` for Claude judges, which rendering does not touch."""
    if importlib.util.find_spec("fastchat") is None:
        pytest.skip("FastChat is not installed (pip install --no-deps fschat==0.2.36)")
    sys.modules.setdefault("anthropic", types.ModuleType("anthropic"))
    import fastchat.llm_judge.common as common

    return common


def _fastchat_pair(common, monkeypatch, prompt: dict, question: Question, a1, a2, ref, multi_turn, judgments):
    """FastChat's play_a_match_pair on one match; its API call replaced by a recorder that answers `judgments`
    in turn, so FastChat renders, sends and reads exactly as it would."""
    sent: list[list[dict]] = []
    replies = iter(judgments)

    def recorder(model, conv, temperature, max_tokens, api_dict=None):
        sent.append(conv.to_openai_api_messages())
        return next(replies)

    monkeypatch.setattr(common, "chat_completion_openai", recorder)
    judge = common.Judge("gpt-4", prompt, ref_based=ref is not None, multi_turn=multi_turn)
    q = {"question_id": question.question_id, "category": question.category, "turns": list(question.turns)}

    def answer(turns):
        return {"choices": [{"index": 0, "turns": turns}]}

    reference = None if ref is None else answer(ref)
    match = common.MatchPair(q, "m1", "m2", answer(a1), answer(a2), judge, ref_answer=reference, multi_turn=multi_turn)
    return common.play_a_match_pair(match, output_file=None), sent


@needs_prompts
@pytest.mark.parametrize(
    ("index", "turn", "expected_name"),
    [(0, 1, "pair-v2"), (0, 2, "pair-v2-multi-turn"), (1, 1, "pair-math-v1"), (1, 2, "pair-math-v1-multi-turn")],
)
def test_prompts_are_rendered_and_read_as_fastchat_does(
    fastchat_common, monkeypatch: pytest.MonkeyPatch, index: int, turn: int, expected_name: str
) -> None:
    prompts = MTBenchPrompts(load_judge_prompts(JUDGE_PROMPTS), REFERENCES)
    question, a1, a2 = QUESTIONS[index], ANSWERS_1[index], ANSWERS_2[index]
    assert prompts.prompt_name(question, turn) == expected_name
    raw = {json.loads(line)["name"]: json.loads(line) for line in JUDGE_PROMPTS.read_text().splitlines()}
    ref = REFERENCES.get(str(question.question_id))
    judgments = ["I prefer the second. [[B]]", "Both wrote [[A]] first... [[B]]"]  # FastChat reads A before B
    result, sent = _fastchat_pair(
        fastchat_common, monkeypatch, raw[expected_name], question, a1, a2, ref, turn == 2, judgments
    )
    ours = [
        list(prompts.request(question, turn, a1, a2).messages),
        list(prompts.request(question, turn, a2, a1).messages),
    ]
    assert ours == sent  # system and user message, character for character, in both orders
    assert ours[0][-1]["content"] == result["g1_user_prompt"] and ours[1][-1]["content"] == result["g2_user_prompt"]
    assert [fastchat_verdict(j) for j in judgments] == ["B", "A"]
    assert (result["g1_winner"], result["g2_winner"]) == ("model_2", "model_2")


def test_fastchat_verdict_rule() -> None:
    assert fastchat_verdict("... [[C]]") == "tie"
    assert fastchat_verdict("[[B]] then [[A]]") == "A"  # FastChat tests [[A]] first, whatever comes first
    assert fastchat_verdict("A is better") is None
    assert fastchat_verdict("[A]") is None


@needs_prompts
def test_loads_fastchat_judge_prompts() -> None:
    prompts = load_judge_prompts(JUDGE_PROMPTS)
    assert {"pair-v2", "pair-v2-multi-turn", "pair-math-v1", "pair-math-v1-multi-turn"} <= set(prompts)
    assert prompts["pair-v2"].output_format == "[[A]]"
    assert prompts["pair-v2"].system_prompt.startswith("Please act as an impartial judge")
    assert "{ref_answer_1}" in prompts["pair-math-v1"].prompt_template


@needs_prompts
def test_questions_that_need_references_need_them(tmp_path: Path) -> None:
    prompts = MTBenchPrompts(load_judge_prompts(JUDGE_PROMPTS), {"111": ["42", "49"]})
    with pytest.raises(UserError, match=r"1 math/reasoning/coding question\(s\) \(130\) have no reference answer"):
        prompts.check(QUESTIONS)
    MTBenchPrompts(load_judge_prompts(JUDGE_PROMPTS), REFERENCES).check(QUESTIONS)
    general_only = _write(
        tmp_path / "p.jsonl", [json.loads(line) for line in JUDGE_PROMPTS.read_text().splitlines()][:2]
    )
    with pytest.raises(UserError, match="no pair-math-v1 or pair-math-v1-multi-turn"):
        MTBenchPrompts(load_judge_prompts(general_only), REFERENCES).check(QUESTIONS)
    with pytest.raises(UserError, match="has no pair-v2"):
        load_judge_prompts(
            _write(
                tmp_path / "q.jsonl",
                [{"name": "x", "system_prompt": "", "prompt_template": "", "output_format": "[[A]]"}],
            )
        )


@pytest.mark.skipif(not (REAL / "mt_bench").is_dir(), reason=f"no MT-Bench sample at {REAL}")
def test_reads_fastchat_reference_answers() -> None:
    from dpokit.questions import load_questions

    questions = load_questions(str(REAL / "mt_bench" / "question.jsonl"))
    references = load_answer_file(REAL / "mt_bench" / "reference_answer" / "gpt-4.jsonl", "--reference-answers")
    graded = [q for q in questions if q.category in ("math", "reasoning", "coding")]
    assert len(questions) == 80 and len(graded) == 30
    assert all(len(references[str(q.question_id)]) == 2 for q in graded)
    if JUDGE_PROMPTS.is_file():
        MTBenchPrompts(load_judge_prompts(JUDGE_PROMPTS), references).check(questions)


def test_answer_files(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.jsonl", _answer_rows("m", ANSWERS_1))
    answers = load_answer_file(path, "--answers-a")
    assert answers_for(answers, QUESTIONS, "--answers-a") == ANSWERS_1
    with pytest.raises(UserError, match=r"no answer to every turn of 1 question\(s\) \(999\)"):
        answers_for(answers, [*QUESTIONS, Question(999, ("?",))], "--answers-a")
    (tmp_path / "bad.jsonl").write_text('{"question_id": 1}\n')
    with pytest.raises(UserError, match="line 1 has no question_id and choices"):
        load_answer_file(tmp_path / "bad.jsonl", "--answers-b")


def test_compare_judges_answer_files_without_loading_a_model(tmp_path: Path) -> None:
    """FastChat's model_answer files in, MT-Bench's folder out, with a rule judge: no model is loaded."""
    questions = _write(tmp_path / "question.jsonl", [q.to_mt_bench() for q in QUESTIONS])
    a = _write(tmp_path / "short-model.jsonl", _answer_rows("ignored", ANSWERS_1))
    b = _write(tmp_path / "long-model.jsonl", _answer_rows("ignored", ANSWERS_2))
    judge = tmp_path / "length.py"
    judge.write_text("def score(prompt, response):\n    return float(len(response))\n")
    out = tmp_path / "out"
    argv = ["compare", "--answers-a", str(a), "--answers-b", str(b), "--prompts", str(questions), "--output", str(out)]
    assert main([*argv, "--judge", f"python:{judge}:score"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["model_a"]["model_id"], summary["model_b"]["model_id"]) == ("short-model", "long-model")
    b_longer = [
        len(y) > len(x) for x1, x2 in zip(ANSWERS_1, ANSWERS_2, strict=True) for x, y in zip(x1, x2, strict=True)
    ]
    assert (summary["wins"], summary["losses"], summary["ties"]) == (sum(b_longer), len(b_longer) - sum(b_longer), 0)
    assert summary["position_consistency"] == 1.0  # a length judge never looks at the order
    rows = [json.loads(line) for line in (out / "model_answer" / "long-model.jsonl").read_text().splitlines()]
    assert [r["choices"][0]["turns"] for r in rows] == ANSWERS_2
    assert main([*argv, "--overwrite", "--judge", f"python:{judge}:score", "--judge-prompts", str(a)]) == 2


# --- FastChat's show_result.py reads our judgment file -----------------------------------------------------------


def _handmade_records() -> list[ComparisonRecord]:
    """Games of every kind, failures included; the answers' lengths vary so the length fit has work to do."""
    verdicts = [
        ("model_2", "model_2"),
        ("model_1", "model_1"),
        ("tie", "tie"),
        ("model_1", "model_2"),
        ("error", "model_2"),
        ("model_2", "tie"),
        ("model_2", "model_2"),
        ("error", "error"),
    ]
    records = []
    for i, (g1, g2) in enumerate(verdicts):
        question = Question(100 + i, (f"q{i}",), "writing" if i % 2 else "math")
        record = ComparisonRecord(question, ["a" * (5 + i)], ["b" * (12 - i)])
        game = Game(question.question_id, 1, g1, g2, question.category, 5 + i, 12 - i)
        record.games.append(game)
        record.judgments.append(
            {
                "question_id": question.question_id,
                "model_1": "base",
                "model_2": "aligned",
                "g1_winner": g1,
                "g2_winner": g2,
                "judge": ["test", "pair-v2"],
                "turn": 1,
                "tstamp": 0.0,
                "outcome": game.outcome,
            }
        )
        records.append(record)
    return records


@needs_fastchat
def test_fastchat_show_result_tallies_what_we_report(tmp_path: Path) -> None:
    records = _handmade_records()
    sides = Contestant("m", None, "base"), Contestant("m", None, "aligned")
    summary = comparison_summary(records, *sides, "test", SamplingSettings(), seed=0)
    write_comparison(tmp_path / "cmp", records, *sides, summary)
    judgments = tmp_path / "cmp" / "model_judgment" / "dpokit_pair.jsonl"
    command = [sys.executable, "-m", "fastchat.llm_judge.show_result", "--mode", "pairwise-all"]
    shown = subprocess.run([*command, "--input-file", str(judgments)], capture_output=True, text=True, check=True)
    table = {}
    for line in shown.stdout.splitlines():
        cells = line.split()
        if len(cells) == 7 and cells[0] in ("base", "aligned"):
            table[cells[0]] = [float(c) for c in cells[1:]]
    win, loss, tie, win_rate, _, adjusted = table["aligned"]
    assert (win, loss, tie) == (summary["wins"], summary["losses"], summary["ties"]) == (2, 1, 3)
    assert win_rate == pytest.approx(summary["win_rate"], abs=1e-6)
    assert adjusted == pytest.approx(summary["win_rate_adjusted"], abs=1e-6)
    assert table["base"][:3] == [loss, win, tie]
    assert summary["position_consistency"] == pytest.approx(4 / 6)
    assert summary["judge_failures"] == 2  # dropped by FastChat as "error" judgments, counted apart by us
    assert re.search(r"win_rate_adjusted", shown.stdout)
