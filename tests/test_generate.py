"""`dpokit generate`: pair selection, deduplication, resumable output, bad inputs, judges end to end."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpokit.cli import main
from dpokit.data.load import load_pairs
from dpokit.distributed import part_path
from dpokit.judges import load_judge
from dpokit.onpolicy import merge_parts, skipped_path
from dpokit.pairing import (
    SKIP_IDENTICAL,
    SKIP_JUDGE,
    SKIP_MARGIN,
    SKIP_TIED,
    Choice,
    PairingSettings,
    distinct_answers,
    judge_batch,
    select_pair,
)
from dpokit.prompts import PromptItem, load_prompts
from judge_server import LengthJudgeServer, free_port

SRC = Path(__file__).resolve().parents[1] / "src"

# --- pair selection -----------------------------------------------------------------------------------------------

WORST = PairingSettings("best-worst")
RANDOM = PairingSettings("best-random")


def test_best_worst_takes_the_first_best_and_the_first_worst() -> None:
    rng = random.Random(0)
    assert select_pair([("a", 1.0), ("b", 5.0), ("c", 3.0)], WORST, rng) == Choice("b", "a", 5.0, 1.0)
    assert select_pair([("a", 5.0), ("b", 5.0), ("c", 1.0), ("d", 1.0)], WORST, rng) == Choice("a", "c", 5.0, 1.0)
    assert Choice("b", "a", 5.0, 1.0).margin == 4.0


def test_ties_and_margins_make_no_pair() -> None:
    rng = random.Random(0)
    assert select_pair([("a", 2.0), ("b", 2.0), ("c", 2.0)], WORST, rng) == SKIP_TIED
    assert select_pair([("a", 2.0)], WORST, rng) == SKIP_IDENTICAL
    assert select_pair([], WORST, rng) == SKIP_IDENTICAL
    scored = [("a", 1.0), ("b", 5.0)]
    assert select_pair(scored, PairingSettings("best-worst", 4.5), rng) == SKIP_MARGIN
    assert select_pair(scored, PairingSettings("best-worst", 4.0), rng) == Choice("b", "a", 5.0, 1.0)  # >= margin


def test_best_random_picks_only_lower_scored_answers_beyond_the_margin() -> None:
    scored = [("a", 5.0), ("b", 1.0), ("c", 3.0), ("d", 5.0), ("e", 4.5)]
    picked = {select_pair(scored, RANDOM, random.Random(seed)).rejected for seed in range(200)}
    assert picked == {"b", "c", "e"}  # never the tied "d", never the best itself
    picked = {select_pair(scored, PairingSettings("best-random", 2.0), random.Random(s)).rejected for s in range(50)}
    assert picked == {"b", "c"}
    assert select_pair(scored, PairingSettings("best-random", 4.5), random.Random(0)) == SKIP_MARGIN
    assert select_pair([("a", 1.0), ("b", 1.0)], RANDOM, random.Random(0)) == SKIP_TIED


def test_pairing_settings_are_checked() -> None:
    from dpokit.errors import UserError

    with pytest.raises(UserError, match="--pairing must be one of best-worst, best-random"):
        PairingSettings("best-median")
    with pytest.raises(UserError, match="--min-margin must be zero or positive"):
        PairingSettings("best-worst", -1.0)


def test_distinct_answers_keep_order_and_set_empty_ones_aside() -> None:
    assert distinct_answers(["x", "x", "", "  ", "y", "x"]) == (["x", "y"], 2)


# --- one batch: deduplication before judging ----------------------------------------------------------------------

JUDGE_CODE = """
calls = []

def length(prompt, response):
    calls.append(response)
    return float(len(response))

def constant(prompt, response):
    return 1.0

def nothing(prompt, response):
    return None
"""


@pytest.fixture
def judge_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.py"
    path.write_text(JUDGE_CODE, encoding="utf-8")
    return path


def item(text: str) -> PromptItem:
    return PromptItem(key=f"k-{text}", messages=[{"role": "user", "content": text}], origin="test")


def test_identical_answers_are_judged_once(judge_file: Path) -> None:
    judge = load_judge(f"python:{judge_file}:length")
    calls = judge.function.__globals__["calls"]
    items = [item("p1"), item("p2"), item("p3")]
    answers = [["aa", "aa", "b", "aa"], ["same", "same", "same", ""], ["x", "yy", "zzz", "yy"]]
    rows, skipped, summary = judge_batch(items, answers, judge, WORST, 0, {"judge": judge.spec})
    assert calls == ["aa", "b", "x", "yy", "zzz"]  # p2 has one distinct answer: never judged
    assert [(r["prompt_id"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [
        ("k-p1", "aa", "b"),
        ("k-p3", "zzz", "x"),
    ]
    assert rows[1]["score_chosen"] == 3.0 and rows[1]["score_rejected"] == 1.0 and rows[1]["margin"] == 2.0
    assert [(s["prompt_id"], s["reason"], s["answers"]) for s in skipped] == [("k-p2", SKIP_IDENTICAL, ["same"])]
    assert summary.counts == {"pairs written": 2, SKIP_IDENTICAL: 1} and summary.empty_answers == 1


def test_merging_part_files_orders_rows_and_finishes_a_half_done_merge(tmp_path: Path) -> None:
    output = tmp_path / "pairs.jsonl"
    order = {"a": 0, "b": 1, "c": 2, "d": 3}
    rows = {key: {"prompt_id": key, "prompt": key} for key in order}
    # process 0 did a and c, process 1 did b and d; a killed merge already moved a and b, and cut a row in half
    part_path(output, 0).write_text(json.dumps(rows["a"]) + "\n" + json.dumps(rows["c"]) + "\n")
    part_path(output, 1).write_text(json.dumps(rows["b"]) + "\n" + json.dumps(rows["d"]) + "\n")
    output.write_text(json.dumps(rows["a"]) + "\n" + json.dumps(rows["b"]) + "\n" + '{"prompt_id": "c", "pr')
    merge_parts(output, order)
    assert read_jsonl(output) == [rows["a"], rows["b"], rows["c"], rows["d"]]
    assert not list(tmp_path.glob("*.part"))


# --- the command, on a tiny model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "How many legs does a spider have?"]
    rows = [{"id": f"q{i}", "prompt": q} for i, q in enumerate(questions)]
    rows.append({"id": "q3", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def generate_args(model: Path, prompts: Path, judge: str, output: Path, *extra: str) -> list[str]:
    return [
        "generate",
        "--model",
        str(model),
        "--prompts",
        str(prompts),
        "--judge",
        judge,
        "--output",
        str(output),
        "--num-samples",
        "3",
        "--max-new-tokens",
        "8",
        "--batch-size",
        "3",  # one prompt per batch: each prompt's answers depend only on the seed and its key
        *extra,
    ]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_generate_writes_trainable_pairs_with_provenance(
    tiny_model: Path, prompts_file: Path, judge_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out" / "pairs.jsonl"
    judge = f"python:{judge_file}:length"
    assert main(generate_args(tiny_model, prompts_file, judge, output, "--seed", "7")) == 0
    captured = capsys.readouterr()
    assert "generate: 4 pairs written to" in captured.out and "0 already done" in captured.out
    assert "responses/s" in captured.err
    rows = read_jsonl(output)
    assert [r["prompt_id"] for r in rows] == ["q0", "q1", "q2", "q3"]
    first = rows[0]
    assert first["prompt"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert rows[3]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert first["chosen"][0]["role"] == "assistant" and first["rejected"][0]["role"] == "assistant"
    for row in rows:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert row["score_chosen"] == len(chosen) > row["score_rejected"] == len(rejected)
        assert row["margin"] == row["score_chosen"] - row["score_rejected"]
    assert first["judge"] == judge and first["model"] == str(tiny_model) and first["adapter"] is None
    assert first["sampling"] == {"num_samples": 3, "temperature": 0.7, "top_p": 1.0, "max_new_tokens": 8, "seed": 7}
    assert first["pairing"] == "best-worst" and first["min_margin"] == 0.0
    loaded = load_pairs(str(output))  # what `dpokit train` reads: UltraFeedback's binarized layout, as it is
    assert [(p.prompt, p.chosen, p.rejected) for p in loaded.pairs] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in rows
    ]
    assert not skipped_path(output).exists()

    # the same command again: nothing to do, nothing loaded, nothing appended
    assert main(generate_args(tiny_model, prompts_file, judge, output, "--seed", "7")) == 0
    assert "0 pairs written" in capsys.readouterr().out
    assert read_jsonl(output) == rows


def test_resume_after_a_partial_file_matches_an_unbroken_run(
    tiny_model: Path, prompts_file: Path, judge_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    judge = f"python:{judge_file}:length"
    unbroken = tmp_path / "unbroken.jsonl"
    assert main(generate_args(tiny_model, prompts_file, judge, unbroken)) == 0
    lines = unbroken.read_text(encoding="utf-8").splitlines(keepends=True)
    # a run killed while writing its second row: one complete row, half of the next, no newline
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_text(lines[0] + lines[1][: len(lines[1]) // 2], encoding="utf-8")
    capsys.readouterr()
    assert main(generate_args(tiny_model, prompts_file, judge, resumed)) == 0
    out = capsys.readouterr().out
    assert "3 pairs written" in out and "1 already done" in out
    assert resumed.read_text(encoding="utf-8") == unbroken.read_text(encoding="utf-8")


def test_all_tied_prompts_are_counted_skipped_and_not_redone(
    tiny_model: Path, prompts_file: Path, judge_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "pairs.jsonl"
    args = generate_args(tiny_model, prompts_file, f"python:{judge_file}:constant", output)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "0 pairs written" in out and "4 prompts skipped because all answers tied" in out
    skipped = read_jsonl(skipped_path(output))
    assert [s["reason"] for s in skipped] == [SKIP_TIED] * 4
    assert skipped[0]["scores"] == [1.0] * len(skipped[0]["answers"])
    assert output.read_text() == ""
    assert main(args) == 0
    assert "4 already done" in capsys.readouterr().out


def test_unranked_prompts_are_tried_again_on_rerun(
    tiny_model: Path, prompts_file: Path, judge_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "pairs.jsonl"
    args = generate_args(tiny_model, prompts_file, f"python:{judge_file}:nothing", output, "--limit", "2")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2 unranked (retried on rerun)" in out and "6 judge failures (6 function returned None)" in out
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "0 already done" in out and "2 unranked" in out
    assert [s["reason"] for s in read_jsonl(skipped_path(output))] == [SKIP_JUDGE] * 4


def test_mt_bench_questions_pair_their_first_turn(
    tiny_model: Path, judge_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    questions = tmp_path / "question.jsonl"
    row = {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorter."]}
    questions.write_text(json.dumps(row) + "\n", encoding="utf-8")
    output = tmp_path / "pairs.jsonl"
    args = generate_args(tiny_model, questions, f"python:{judge_file}:length", output, "--pairing", "best-random")
    assert main(args) == 0
    (pair,) = read_jsonl(output)
    assert pair["prompt_id"] == "81" and pair["category"] == "writing" and pair["pairing"] == "best-random"
    assert pair["prompt"] == [{"role": "user", "content": "Write a poem."}]


def test_openai_judge_end_to_end_never_writes_the_key(
    tiny_model: Path,
    prompts_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = "sk-generate-test-5e8d2b"
    monkeypatch.setenv("JUDGE_KEY", secret)
    output = tmp_path / "pairs.jsonl"
    with LengthJudgeServer() as server:
        judge = f"openai:judge@{server.url}"
        args = generate_args(tiny_model, prompts_file, judge, output, "--judge-api-key-env", "JUDGE_KEY", "--debug")
        assert main(args) == 0
    captured = capsys.readouterr()
    assert server.auth_headers and set(server.auth_headers) == {f"Bearer {secret}"}
    rows = read_jsonl(output)
    assert rows and all(r["judge"] == judge for r in rows)
    assert all(1 <= r["score_rejected"] < r["score_chosen"] <= 10 for r in rows)
    written = output.read_text() + (skipped_path(output).read_text() if skipped_path(output).exists() else "")
    assert secret not in written + captured.out + captured.err


@pytest.mark.slow
def test_a_killed_run_resumes_to_what_an_unbroken_run_writes(
    tiny_model: Path, judge_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"Question {i}: tell me something.\n" for i in range(24)), encoding="utf-8")
    judge = f"python:{judge_file}:length"
    extra = ("--max-new-tokens", "16")
    unbroken = tmp_path / "unbroken.jsonl"
    assert main(generate_args(tiny_model, prompts, judge, unbroken, *extra)) == 0
    killed = tmp_path / "killed.jsonl"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "dpokit", *generate_args(tiny_model, prompts, judge, killed, *extra)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if killed.exists() and killed.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    survived = killed.read_bytes().count(b"\n")
    assert 2 <= survived < 24
    capsys.readouterr()
    assert main(generate_args(tiny_model, prompts, judge, killed, *extra)) == 0
    assert f"{survived} already done" in capsys.readouterr().out
    assert killed.read_text() == unbroken.read_text()


# --- bad inputs: one line, exit code 2 ----------------------------------------------------------------------------


def test_bad_inputs_exit_2_with_one_line(
    tiny_model: Path, prompts_file: Path, judge_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    judge = f"python:{judge_file}:length"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    not_text = tmp_path / "bad.jsonl"
    not_text.write_text('{"prompt": "ok"}\n{"prompt": {"x": 1}}\n', encoding="utf-8")
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n', encoding="utf-8")
    other_run = tmp_path / "other.jsonl"
    other_run.write_text(json.dumps({"prompt_id": "q0", "judge": "python:x.py:f"}) + "\n", encoding="utf-8")
    port = free_port()
    cases = [
        (generate_args(tiny_model, empty, judge, tmp_path / "o1.jsonl"), r"empty.jsonl is empty"),
        (generate_args(tiny_model, not_text, judge, tmp_path / "o2.jsonl"), r"bad.jsonl:2: column 'prompt' must be"),
        (generate_args(tiny_model, tmp_path / "nope.txt", judge, tmp_path / "o3.jsonl"), r"does not exist"),
        (generate_args(tiny_model, prompts_file, "python:nomodule_abc:f", tmp_path / "o4.jsonl"), r"no module"),
        (generate_args(tiny_model, prompts_file, "gpt4", tmp_path / "o5.jsonl"), r"is not a judge spec"),
        (generate_args(tiny_model, prompts_file, judge, tmp_path / "o6.jsonl", "--num-samples", "1"), r"at least 2"),
        (generate_args(tiny_model, prompts_file, judge, tmp_path / "o7.jsonl", "--top-p", "0"), r"--top-p must be"),
        (generate_args(tiny_model, prompts_file, judge, tmp_path / "o8.jsonl", "--min-margin", "-1"), r"--min-margin"),
        (generate_args(tiny_model, prompts_file, judge, tmp_path), r"is a folder"),
        (generate_args(tiny_model, prompts_file, judge, foreign), r"foreign.jsonl:1 is not a row written by dpokit"),
        (generate_args(tiny_model, prompts_file, judge, other_run), r"was made with judge \"python:x.py:f\""),
        (generate_args(tmp_path / "no-model", prompts_file, judge, tmp_path / "o9.jsonl"), r"no-model"),
        (
            generate_args(tiny_model, prompts_file, f"openai:m@http://127.0.0.1:{port}/v1", tmp_path / "o10.jsonl"),
            rf"first request failed: cannot connect to http://127.0.0.1:{port}/v1",
        ),
        (
            generate_args(tiny_model, prompts_file, judge, tmp_path / "o11.jsonl", "--judge-timeout", "-1"),
            r"--judge-timeout must be a positive",
        ),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(args) == 2, args
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert last.startswith("dpokit: error: ") and "Traceback" not in err, err
        assert re.search(message, last), (message, last)


# --- several processes --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_write_what_one_process_writes(
    tiny_model: Path, judge_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"Question {i}: say something.\n" for i in range(7)), encoding="utf-8")
    judge = f"python:{judge_file}:length"
    single = tmp_path / "single.jsonl"
    assert main(generate_args(tiny_model, prompts, judge, single, "--batch-size", "6")) == 0
    double = tmp_path / "double.jsonl"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "dpokit"]
    result = subprocess.run(
        command + generate_args(tiny_model, prompts, judge, double, "--batch-size", "6"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("generate: 7 pairs written") == 1  # only the main process reports
    assert double.read_text() == single.read_text()  # same rows, merged in the prompts' order
    assert not list(tmp_path.glob("*.part"))
    assert [r["prompt_id"] for r in read_jsonl(double)] == [i.key for i in load_prompts(str(prompts))]


# --- the built-in model -------------------------------------------------------------------------------------------


@pytest.mark.builtin
def test_builtin_model_makes_real_pairs(judge_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("Name a fruit.\nWhat is 2 + 2?\n", encoding="utf-8")
    output = tmp_path / "pairs.jsonl"
    args = ["generate", "--prompts", str(prompts), "--judge", f"python:{judge_file}:length", "--output", str(output)]
    args += ["--num-samples", "3", "--max-new-tokens", "12", "--temperature", "1.0"]
    assert main(args) == 0
    rows = read_jsonl(output)
    assert len(rows) + len(read_jsonl(skipped_path(output)) if skipped_path(output).exists() else []) == 2
    assert rows, capsys.readouterr().out
    for row in rows:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen != rejected and len(chosen) > len(rejected) > 0
        assert any(c.isalpha() for c in chosen)  # words, not noise
        assert row["model"] == "builtin:smollm2-135m-instruct"
