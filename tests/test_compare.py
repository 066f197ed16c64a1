"""`dpokit compare`: the position-swap rule, the rates and their interval on fixed judgments with known answers,
the MT-Bench files, and a whole comparison of two tiny models under a judge whose verdicts we can predict."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dpokit.cli import main
from dpokit.compare import Contestant, compare_models
from dpokit.errors import UserError
from dpokit.generation import SamplingSettings, generate_responses
from dpokit.inference import load_for_inference
from dpokit.questions import Question, load_questions
from dpokit.stats import bootstrap_mean_interval
from dpokit.verdicts import Game, judge_both_orders, judged_exchange, summarize_by_category, summarize_games
from evaluate_helpers import make_run, tiny_base


class LengthJudge:
    """Prefers the longer answer, a tie at equal length: its verdicts follow the answers, not their order."""

    spec = "test:length"

    def score(self, prompt, responses):
        return [float(len(r)) for r in responses]

    def compare(self, prompt, answer_a, answer_b):
        if len(answer_a) == len(answer_b):
            return "tie"
        return "A" if len(answer_a) > len(answer_b) else "B"


class FirstShownJudge:
    """Pure position bias: always the answer shown first."""

    spec = "test:first"

    def score(self, prompt, responses):
        return [0.0 for _ in responses]

    def compare(self, prompt, answer_a, answer_b):
        return "A"


# --- the rule and the numbers, on fixed judgments ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("g1", "g2", "outcome"),
    [
        ("model_2", "model_2", "win"),
        ("model_1", "model_1", "loss"),
        ("tie", "tie", "tie"),
        ("model_2", "model_1", "tie"),  # the orders disagree: position bias, not a preference
        ("model_1", "model_2", "tie"),
        ("model_2", "tie", "tie"),
        ("tie", "model_1", "tie"),
        ("error", "model_2", "failure"),
        ("model_1", "error", "failure"),
        ("error", "error", "failure"),
    ],
)
def test_a_win_needs_both_orders(g1: str, g2: str, outcome: str) -> None:
    assert Game(1, 1, g1, g2).outcome == outcome


def test_position_swap_maps_verdicts_back_to_models() -> None:
    prompt = [{"role": "user", "content": "q"}]
    # model_2's answer is longer: shown second it is "B", shown first it is "A"; both map to model_2
    assert judge_both_orders(LengthJudge(), prompt, "short", "much longer") == ("model_2", "model_2")
    # a judge that always picks the first answer names a different model in each order: a tie
    g1, g2 = judge_both_orders(FirstShownJudge(), prompt, "short", "much longer")
    assert (g1, g2) == ("model_1", "model_2") and Game(1, 1, g1, g2).outcome == "tie"


def test_a_judge_answer_outside_the_protocol_is_an_error() -> None:
    class Rambling(FirstShownJudge):
        def compare(self, prompt, answer_a, answer_b):
            return "A is better"

    with pytest.raises(UserError, match="'A is better'"):
        judge_both_orders(Rambling(), [{"role": "user", "content": "q"}], "a", "b")


def _games(wins: int, ties: int, losses: int, failures: int = 0, category: str | None = None) -> list[Game]:
    verdicts = [("model_2",) * 2] * wins + [("tie", "tie")] * ties + [("model_1",) * 2] * losses
    verdicts += [("error", "model_2")] * failures
    return [Game(f"{category}-{i}", 1, g1, g2, category) for i, (g1, g2) in enumerate(verdicts)]


def test_summary_counts_rates_and_failures() -> None:
    summary = summarize_games(_games(wins=6, ties=3, losses=1, failures=2))
    assert (summary["wins"], summary["ties"], summary["losses"]) == (6, 3, 1)
    assert summary["judge_failures"] == 2 and summary["total"] == 10  # failures are not in the total
    assert summary["win_rate"] == pytest.approx(0.6)  # 6 / 10
    assert summary["win_rate_adjusted"] == pytest.approx(0.75)  # (6 + 3/2) / 10
    assert summary["ci_low"] <= 0.75 <= summary["ci_high"]


def test_only_failures_give_no_rates() -> None:
    summary = summarize_games(_games(0, 0, 0, failures=3))
    assert summary["total"] == 0 and summary["judge_failures"] == 3
    assert summary["win_rate"] is None and summary["ci_low"] is None


def test_interval_of_unanimous_outcomes_is_a_point() -> None:
    assert bootstrap_mean_interval([1.0] * 12) == (1.0, 1.0)
    summary = summarize_games(_games(0, 5, 0))
    assert (summary["win_rate_adjusted"], summary["ci_low"], summary["ci_high"]) == (0.5, 0.5, 0.5)


def test_interval_matches_the_normal_approximation() -> None:
    # 200 wins and 200 losses: the adjusted rate is 0.5 with standard error sqrt(0.25 / 400) = 0.025
    summary = summarize_games(_games(200, 0, 200))
    half_width = 1.96 * math.sqrt(0.25 / 400)
    assert summary["ci_low"] == pytest.approx(0.5 - half_width, abs=0.008)
    assert summary["ci_high"] == pytest.approx(0.5 + half_width, abs=0.008)


def test_interval_resamples_whole_questions() -> None:
    # 200 questions of two turns with the same outcome: 200 independent draws, not 400, so the interval is
    # sqrt(2) wider than if each turn were drawn alone
    games = [Game(q, turn, *(("model_2",) * 2 if q < 100 else ("model_1",) * 2)) for q in range(200) for turn in (1, 2)]
    summary = summarize_games(games)
    half_width = 1.96 * math.sqrt(0.25 / 200)
    assert summary["ci_high"] - summary["ci_low"] == pytest.approx(2 * half_width, abs=0.016)


def test_interval_is_seeded() -> None:
    scores = [(i * 0.37) % 1 for i in range(40)]  # spread values, so different resamples move the percentiles
    assert bootstrap_mean_interval(scores, seed=3) == bootstrap_mean_interval(scores, seed=3)
    assert bootstrap_mean_interval(scores, seed=3) != bootstrap_mean_interval(scores, seed=4)


def test_per_category() -> None:
    games = _games(3, 1, 0, category="writing") + _games(0, 0, 2, failures=1, category="math") + _games(1, 0, 0)
    per_category = summarize_by_category(games)
    assert sorted(per_category) == ["math", "writing"]  # the uncategorized game is only in the overall numbers
    assert per_category["writing"]["win_rate_adjusted"] == pytest.approx(3.5 / 4)
    assert per_category["math"]["win_rate"] == 0.0 and per_category["math"]["judge_failures"] == 1


def test_second_turn_shows_each_sides_whole_conversation() -> None:
    question = Question(7, ("First?", "Second?"), "reasoning", ({"role": "system", "content": "Be brief."},))
    prompt, a, b = judged_exchange(question, 1, ["a1", "a2"], ["b1", "b2"])
    assert prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "First?"}]
    assert (a, b) == ("a1", "b1")
    prompt, a, b = judged_exchange(question, 2, ["a1", "a2"], ["b1", "b2"])
    assert prompt[-1]["role"] == "user" and "Question 1: First?" in prompt[-1]["content"]
    assert "Question 2: Second?" in prompt[-1]["content"]
    assert a == "Answer 1: a1\n\nAnswer 2: a2" and b == "Answer 1: b1\n\nAnswer 2: b2"


# --- prompts ------------------------------------------------------------------------------------------------------


def test_reads_mt_bench_prompt_rows_and_text(tmp_path: Path) -> None:
    mt_bench = tmp_path / "question.jsonl"
    rows = [
        {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorter."]},
        {"question_id": 82, "category": "math", "turns": ["2+2?"], "reference": ["4"]},
    ]
    mt_bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_questions(str(mt_bench)) == [
        Question(81, ("Write a poem.", "Now shorter."), "writing"),
        Question(82, ("2+2?",), "math"),
    ]
    prompts = tmp_path / "prompts.jsonl"
    conversation = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    prompts.write_text(
        json.dumps({"prompt": "Hello?", "id": "h"}) + "\n\n" + json.dumps({"prompt": conversation}) + "\n"
    )
    hello, hi = load_questions(str(prompts))
    assert hello == Question("h", ("Hello?",))
    # without an id, the prompt's content key is its question_id: the same prompt gets the same id in every run
    assert hi.question_id.startswith("sha256:") and hi == Question(hi.question_id, ("Hi",), None, (conversation[0],))
    text = tmp_path / "prompts.txt"
    text.write_text("one\n\ntwo\none\n")
    assert [q.turns for q in load_questions(str(text))] == [("one",), ("two",)]  # a repeated prompt is asked once
    assert [q.turns for q in load_questions(str(text), limit=1)] == [("one",)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        ('{"prompt": "   "}\n', "column 'prompt' is empty"),
        ('{"turns": []}\n', "got an empty list"),
        ('{"text": "hi"}\n', "no prompt column"),
        ('{"prompt": [{"role": "assistant", "content": "hi"}]}\n', "has no user message"),
        ('{"prompt": "a", "question_id": 1}\n{"prompt": "b", "question_id": 1}\n', "ids must be unique"),
        ("{broken\n", "invalid JSON"),
        ("[1]\n", "must be an object"),
    ],
)
def test_bad_prompt_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_questions(str(path))


def test_cli_bad_inputs_exit_2_before_any_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": ""}\n')
    base = ["compare", "--model-b", "m", "--judge", "python:x:y"]
    assert main([*base, "--prompts", str(empty), "--output", str(tmp_path / "o")]) == 2
    assert "column 'prompt' is empty" in capsys.readouterr().err
    assert main([*base, "--prompts", str(tmp_path / "nothing.jsonl"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    good = tmp_path / "good.txt"
    good.write_text("hi\n")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert main([*base, "--prompts", str(good), "--output", str(taken)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main([*base, "--prompts", str(good), "--output", str(taken), "--overwrite"]) == 2
    assert "holds something other than a comparison" in capsys.readouterr().err
    assert (taken / "notes.txt").read_text() == "mine"
    assert main([*base, "--prompts", str(good), "--output", str(good / "under-a-file")]) == 2
    assert "cannot be written" in capsys.readouterr().err
    no_b = ["compare", "--judge", "python:x:y", "--prompts", str(good), "--output", str(tmp_path / "o")]
    assert main(no_b) == 2
    assert "--model-b" in capsys.readouterr().err


# --- a whole comparison on tiny models ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compare")
    base = tiny_base(root)
    return base, make_run(root, base)


QUESTIONS = [
    Question(81, ("Write a haiku about the sea.", "Now make it sad."), "writing"),
    Question(82, ("How many legs does a spider have?",), "stem"),
    Question(83, ("What is the capital of France?",), "stem"),
    Question(84, ("Explain gradient descent.", "Shorter, please."), "writing"),
]
SETTINGS = SamplingSettings(temperature=0.0, max_new_tokens=8)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_compare_two_tiny_models(models: tuple[Path, Path], tmp_path: Path) -> None:
    base, run = models
    side_1 = Contestant(str(base), None, "base")
    side_2 = Contestant(None, str(run / "adapter"), "aligned")
    output = tmp_path / "compare"
    summary = compare_models(side_1, side_2, QUESTIONS, LengthJudge(), SETTINGS, output, bf16=False)

    # MT-Bench's files, readable by its tools
    assert _jsonl(output / "question.jsonl")[0] == {
        "question_id": 81,
        "category": "writing",
        "turns": ["Write a haiku about the sea.", "Now make it sad."],
    }
    answers = {
        side: {row["question_id"]: row for row in _jsonl(output / "model_answer" / f"{side}.jsonl")}
        for side in ("base", "aligned")
    }
    for side, rows in answers.items():
        assert list(rows) == [81, 82, 83, 84]
        assert all(row["model_id"] == side and row["choices"][0]["index"] == 0 for row in rows.values())
        assert [len(rows[q.question_id]["choices"][0]["turns"]) for q in QUESTIONS] == [2, 1, 1, 2]
    judgments = _jsonl(output / "model_judgment" / "dpokit_pair.jsonl")
    assert [(j["question_id"], j["turn"]) for j in judgments] == [(81, 1), (81, 2), (82, 1), (83, 1), (84, 1), (84, 2)]
    for j in judgments:
        assert (j["model_1"], j["model_2"]) == ("base", "aligned")
        assert j["judge"] == ["test:length", "dpokit-pair" if j["turn"] == 1 else "dpokit-pair-multi-turn"]
        assert {"g1_winner", "g2_winner", "g1_judgment", "g2_judgment", "tstamp"} <= set(j)

    # each verdict is what the length judge must say about the written answers
    expected = []
    for q in QUESTIONS:
        for turn in range(1, len(q.turns) + 1):
            turns_1 = answers["base"][q.question_id]["choices"][0]["turns"]
            turns_2 = answers["aligned"][q.question_id]["choices"][0]["turns"]
            _, a, b = judged_exchange(q, turn, turns_1, turns_2)
            expected.append("tie" if len(a) == len(b) else ("win" if len(b) > len(a) else "loss"))
    assert [j["outcome"] for j in judgments] == expected
    assert (summary["wins"], summary["ties"], summary["losses"]) == tuple(
        expected.count(o) for o in ("win", "tie", "loss")
    )
    assert summary["total"] == 6 and summary["judge_failures"] == 0
    assert summary["win_rate_adjusted"] == pytest.approx((expected.count("win") + expected.count("tie") / 2) / 6)
    assert json.loads((output / "summary.json").read_text()) == summary
    assert sorted(summary["per_category"]) == ["stem", "writing"]
    all_1 = [t for r in answers["base"].values() for t in r["choices"][0]["turns"]]
    assert summary["mean_length_a"] == pytest.approx(sum(map(len, all_1)) / len(all_1))

    # FastChat's show_result.py, applied to the judgment file, counts the same
    fastchat = {"win": 0, "tie": 0, "loss": 0}
    for j in judgments:
        if "error" in (j["g1_winner"], j["g2_winner"]):
            continue
        if j["g1_winner"] == "tie" or j["g1_winner"] != j["g2_winner"]:
            fastchat["tie"] += 1
        else:
            fastchat["win" if j["g1_winner"] == "model_2" else "loss"] += 1
    assert (fastchat["win"], fastchat["tie"], fastchat["loss"]) == (summary["wins"], summary["ties"], summary["losses"])

    # the second turn was asked in the conversation that holds the model's own first answer
    model, tokenizer = load_for_inference(None, str(run / "adapter"))
    turns_2 = answers["aligned"][81]["choices"][0]["turns"]
    conversation = [
        {"role": "user", "content": QUESTIONS[0].turns[0]},
        {"role": "assistant", "content": turns_2[0]},
        {"role": "user", "content": QUESTIONS[0].turns[1]},
    ]
    assert generate_responses(model, tokenizer, [conversation], SETTINGS)[0][0] == turns_2[1]


def test_failures_and_position_bias_in_a_comparison(models: tuple[Path, Path], tmp_path: Path) -> None:
    base, _ = models

    class Flaky(FirstShownJudge):
        spec = "test:flaky"

        def compare(self, prompt, answer_a, answer_b):
            return None if "spider" in prompt[-1]["content"] else "A"

    side_1, side_2 = Contestant(str(base), None, "one"), Contestant(str(base), None, "two")
    summary = compare_models(side_1, side_2, QUESTIONS[1:3], Flaky(), SETTINGS, tmp_path / "out", bf16=False)
    # the spider question failed in both orders and is out of the counts; the other is a position-bias tie
    assert (summary["wins"], summary["ties"], summary["losses"], summary["judge_failures"]) == (0, 1, 0, 1)
    assert summary["win_rate_adjusted"] == 0.5
    judgments = _jsonl(tmp_path / "out" / "model_judgment" / "dpokit_pair.jsonl")
    assert [(j["g1_winner"], j["g2_winner"]) for j in judgments] == [("error", "error"), ("model_1", "model_2")]


def test_cli_compare_end_to_end(models: tuple[Path, Path], tmp_path: Path) -> None:
    import dpokit.judges

    if not hasattr(dpokit.judges, "load_judge"):
        pytest.skip("dpokit.judges.load_judge is not on this branch yet")
    _, run = models
    judge_file = tmp_path / "length_judge.py"
    judge_file.write_text("def score(prompt, response):\n    return float(len(response))\n")
    prompts = tmp_path / "question.jsonl"
    prompts.write_text("".join(json.dumps(q.to_mt_bench()) + "\n" for q in QUESTIONS[:2]))
    argv = ["compare", "--adapter-b", str(run / "adapter"), "--prompts", str(prompts), "--max-new-tokens", "6"]
    assert main([*argv, "--judge", f"python:{judge_file}:score"]) == 0
    summary = json.loads((run / "compare" / "summary.json").read_text())
    assert summary["total"] + summary["judge_failures"] == 3
    assert summary["model_a"]["model_id"] == "tiny-0" and summary["model_b"]["model_id"] == "run"
    assert main([*argv, "--judge", f"python:{judge_file}:score"]) == 2  # the folder holds a comparison now
    assert main([*argv, "--judge", f"python:{judge_file}:score", "--overwrite"]) == 0


TWO_PROCESS_SCRIPT = """
import sys
from pathlib import Path

from dpokit.distributed import exit_process
from dpokit.compare import Contestant, compare_models
from dpokit.questions import load_questions
from test_compare import SETTINGS, LengthJudge

base, adapter, prompts, output = sys.argv[1:5]
sides = Contestant(base, None, "base"), Contestant(None, adapter, "aligned")
compare_models(*sides, load_questions(prompts), LengthJudge(), SETTINGS, Path(output), bf16=False)
exit_process(0)  # compare_models leaves the group to its caller, this script: it closes it and ends
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_give_the_one_process_result(models: tuple[Path, Path], tmp_path: Path) -> None:
    """Under torchrun each process answers and judges its share; the files come out whole and in order."""
    import os
    import subprocess
    import sys

    base, run = models
    prompts = tmp_path / "question.jsonl"
    prompts.write_text("".join(json.dumps(q.to_mt_bench()) + "\n" for q in QUESTIONS[:3]))
    script = tmp_path / "two_processes.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": f"{tests.parent / 'src'}{os.pathsep}{tests}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    args = [str(base), str(run / "adapter"), str(prompts), str(tmp_path / "two")]
    subprocess.run([*command, *args], env=env, check=True, capture_output=True, timeout=300)

    sides = Contestant(str(base), None, "base"), Contestant(None, str(run / "adapter"), "aligned")
    one = compare_models(*sides, QUESTIONS[:3], LengthJudge(), SETTINGS, tmp_path / "one", bf16=False)
    assert json.loads((tmp_path / "two" / "summary.json").read_text()) == one

    def without_time(path: Path) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "tstamp"} for row in _jsonl(path)]

    for name in ("question.jsonl", "model_answer/base.jsonl", "model_answer/aligned.jsonl"):
        assert without_time(tmp_path / "two" / name) == without_time(tmp_path / "one" / name)
    judgments = "model_judgment/dpokit_pair.jsonl"
    assert without_time(tmp_path / "two" / judgments) == without_time(tmp_path / "one" / judgments)
