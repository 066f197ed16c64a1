"""Judges: python functions, a reward model, a local LLM, and an OpenAI-compatible endpoint on a real local server."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dpokit.errors import UserError
from dpokit.judge_prompts import PAIRWISE_PROMPT, SCORE_PROMPT, parse_score, parse_verdict, question_text
from dpokit.judges import load_judge
from judge_server import LengthJudgeServer, free_port

PROMPT = [{"role": "user", "content": "Name a colour."}]

# --- parsing ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("[[7]] Clear and correct.", 7.0),
        ("Rating: [[10]]", 10.0),
        ("[[ 6.5 ]]", 6.5),
        ("[[8/10]] good", 8.0),
        ("Rating: 4\nThe answer is vague.", 4.0),
        ("score is 9", 9.0),
        ("I would give it 3/10 because it is wrong.", 3.0),
        ("5 out of 10", 5.0),
        ("8", 8.0),
        (" **9**. ", 9.0),
        ("[[3]] ... on reflection [[3]]", 3.0),  # repeated, agreeing
        ("[[3]] or maybe [[8]]", None),  # contradicting
        ("[[0]]", None),  # out of range
        ("[[11]]", None),
        ("The answer is fine.", None),
        ("", None),
    ],
)
def test_parse_score(reply: str, score: float | None) -> None:
    assert parse_score(reply) == score


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("[[A]] A is more precise.", "A"),
        ("[[B]]", "B"),
        ("[[C]] Both are equally good.", "tie"),
        ("[[tie]]", "tie"),
        ("B", "B"),
        (" A. ", "A"),
        ("Verdict: B", "B"),
        ("Final verdict: [[A]]", "A"),
        ("The winner is: Answer B", "B"),
        ("Answer A is better because it is shorter.", "A"),
        ("Verdict is a tie", None),  # no explicit letter: not guessed
        ("[[A]] wait, [[B]]", None),
        ("Both answers have merit.", None),
        ("a", None),  # a lowercase article is not a verdict
    ],
)
def test_parse_verdict(reply: str, verdict: str | None) -> None:
    assert parse_verdict(reply) == verdict


def test_prompts_hold_the_question_and_answers() -> None:
    text = SCORE_PROMPT.format(question="Q-TEXT", answer="ANSWER-TEXT")
    assert "[Question]\nQ-TEXT\n" in text and "[Answer]\nANSWER-TEXT\n[End of answer]" in text and "[[N]]" in text
    text = PAIRWISE_PROMPT.format(question="Q", answer_a="AAA", answer_b="BBB")
    assert text.index("AAA") < text.index("BBB") and "[[C]]" in text
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye?"},
    ]
    assert question_text(PROMPT) == "Name a colour."
    assert question_text(conversation) == "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello\n\nUser: Bye?"


# --- python:module:function ---------------------------------------------------------------------------------------

JUDGE_CODE = """
import math

calls = []

def length(prompt, response):
    calls.append(prompt)
    return len(response)

def prompt_length(prompt, response):
    return float(len(prompt))

def flaky(prompt, response):
    if "boom" in response:
        raise ValueError("cannot score " + response)
    if "none" in response:
        return None
    if "nan" in response:
        return math.nan
    return 1.0

def text(prompt, response):
    return "5"

def boolean(prompt, response):
    return "yes" in response

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def judge_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.py"
    path.write_text(JUDGE_CODE, encoding="utf-8")
    return path


def test_python_judge_from_a_file_scores_and_compares(judge_file: Path) -> None:
    judge = load_judge(f"python:{judge_file}:length")
    assert judge.score(PROMPT, ["red", "green", ""]) == [3.0, 5.0, 0.0]
    assert judge.compare(PROMPT, "red", "green") == "B"
    assert judge.compare(PROMPT, "green", "red") == "A"
    assert judge.compare(PROMPT, "red", "tan") == "tie"
    assert judge.score_batch([PROMPT, PROMPT], [["a"], ["bb", "c"]]) == [[1.0], [2.0, 1.0]]
    assert judge.failures == 0


def test_python_judge_sees_the_last_user_message(judge_file: Path) -> None:
    judge = load_judge(f"python:{judge_file}:prompt_length")
    conversation = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": "12345"},
    ]
    assert judge.score(conversation, ["x"]) == [5.0]


def test_python_judge_module_on_pythonpath_and_beside_us(
    judge_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_judge("python:rules:length").score(PROMPT, ["abcd"]) == [4.0]
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "local_rules.py").write_text("def score(p, r):\n    return 2.5\n", encoding="utf-8")
    monkeypatch.chdir(other)  # not on sys.path, found as ./local_rules.py
    assert load_judge("python:local_rules:score").score(PROMPT, ["x"]) == [2.5]


def test_python_judge_counts_failures_after_it_worked(judge_file: Path) -> None:
    judge = load_judge(f"python:{judge_file}:flaky")
    assert judge.score(PROMPT, ["fine", "boom", "none", "nan", "ok"]) == [1.0, None, None, None, 1.0]
    assert judge.failures == 3
    assert set(judge.failure_reasons) == {
        "function raised",
        "function returned None",
        "function returned a non-finite number",
    }
    assert judge.compare(PROMPT, "fine", "boom") is None


def test_python_judge_accepts_bools_and_numpy_numbers(judge_file: Path, tmp_path: Path) -> None:
    assert load_judge(f"python:{judge_file}:boolean").score(PROMPT, ["yes", "no"]) == [1.0, 0.0]
    numpy_judge = tmp_path / "np_judge.py"
    numpy_judge.write_text("import numpy as np\ndef f(p, r):\n    return np.float32(0.5)\n", encoding="utf-8")
    assert load_judge(f"python:{numpy_judge}:f").score(PROMPT, ["x"]) == [0.5]


def test_python_judge_mistakes_are_one_line_errors(judge_file: Path, tmp_path: Path) -> None:
    cases = {
        "nothing": r"is not a judge spec; use python:module:function",
        "magic:x": r"is not a judge spec",
        "python:onlyone": r"write python:module:function",
        "python:no_such_module_xyz:f": r"no module `no_such_module_xyz` on PYTHONPATH and no file",
        f"python:{tmp_path}/missing.py:f": r"file .*missing.py does not exist",
        f"python:{judge_file}:absent": r"rules.py has no function `absent`",
        f"python:{judge_file}:NOT_A_FUNCTION": r"`NOT_A_FUNCTION` in .* is a int, not a function",
    }
    for spec, message in cases.items():
        with pytest.raises(UserError, match=message) as info:
            load_judge(spec)
        assert "\n" not in str(info.value)
    broken = tmp_path / "broken.py"
    broken.write_text("def f(p, r)\n    return 1\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"importing .*broken.py failed: SyntaxError"):
        load_judge(f"python:{broken}:f")
    with pytest.raises(UserError, match=r"raised ValueError: cannot score boom on its first call"):
        load_judge(f"python:{judge_file}:flaky").score(PROMPT, ["boom"])
    with pytest.raises(UserError, match=r"returned str '5'; it must return a number"):
        load_judge(f"python:{judge_file}:text").score(PROMPT, ["x"])
    with pytest.raises(UserError, match=r"--judge-timeout must be a positive number"):
        load_judge(f"python:{judge_file}:length", timeout=0)


# --- reward-model:ID ----------------------------------------------------------------------------------------------


def save_tiny_reward_model(path: Path, num_labels: int = 1) -> Path:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def test_reward_model_scores_batched_equal_one_by_one_through_the_chat_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    path = save_tiny_reward_model(tmp_path / "rm")
    judge = load_judge(f"reward-model:{path}", batch_size=3)
    answers = ["Paris.", "The capital of France is Paris, of course.", "no", "I am not sure."]
    scores = judge.score(PROMPT, answers)
    # reference: each conversation alone through the template, the score head on the last token's hidden state
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = LlamaForSequenceClassification.from_pretrained(path).eval()
    expected = []
    for answer in answers:
        text = tokenizer.apply_chat_template([*PROMPT, {"role": "assistant", "content": answer}], tokenize=False)
        assert text.endswith("<|im_end|>\n")
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = model.model(ids).last_hidden_state  # (1, T, H)
            expected.append(model.score(hidden)[0, -1, 0].item())
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(scores)) == len(scores)
    best = max(range(2), key=lambda i: scores[i])
    assert judge.compare(PROMPT, answers[0], answers[1]) == "AB"[best]


def test_reward_model_mistakes(tmp_path: Path) -> None:
    path = save_tiny_reward_model(tmp_path / "rm2", num_labels=2)
    with pytest.raises(UserError, match=r"has 2 outputs; a reward model has one"):
        load_judge(f"reward-model:{path}")
    with pytest.raises(UserError, match=r"cannot load reward model"):
        load_judge(f"reward-model:{tmp_path / 'none'}")


# --- llm:MODEL ----------------------------------------------------------------------------------------------------


def test_local_llm_judge_counts_unparseable_replies(tmp_path: Path) -> None:
    from tiny import save_tiny

    path = save_tiny(tmp_path / "tiny")
    judge = load_judge(f"llm:{path}", max_tokens=6, batch_size=4)
    # random weights reply with noise: no verdict, each counted
    assert judge.score(PROMPT, ["red", "blue", "green"]) == [None, None, None]
    assert judge.compare(PROMPT, "red", "blue") is None
    assert judge.failures == 4 and judge.failure_reasons == {"unparseable reply": 4}


# --- openai:MODEL@BASE_URL against a real HTTP server ---------------------------------------------------------


@pytest.fixture
def server() -> Iterator[LengthJudgeServer]:
    with LengthJudgeServer() as fake:
        yield fake


SECRET = "sk-test-7f3a9c1e5b"


def test_openai_judge_scores_and_compares_with_the_key_from_the_environment(
    server: LengthJudgeServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MY_JUDGE_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    judge = load_judge(f"openai:judge-model@{server.url}", api_key_env="MY_JUDGE_KEY", max_tokens=20)
    assert judge.score(PROMPT, ["red", "green", "a much longer answer"]) == [3.0, 5.0, 10.0]
    assert judge.compare(PROMPT, "red", "green") == "B"
    assert judge.compare(PROMPT, "green", "red") == "A"
    assert judge.compare(PROMPT, "tan", "red") == "tie"
    assert judge.failures == 0
    assert server.auth_headers[0] == f"Bearer {SECRET}"
    assert all(r["model"] == "judge-model" and r["temperature"] == 0 and r["max_tokens"] == 20 for r in server.requests)
    expected = [{"role": "user", "content": SCORE_PROMPT.format(question="Name a colour.", answer="red")}]
    assert any(r["messages"] == expected for r in server.requests[:3])  # sent concurrently, in any order
    assert SECRET not in caplog.text and SECRET not in judge.spec
    judge.close()


def test_openai_judge_respects_the_concurrency_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a local server needs no key
    with LengthJudgeServer(delay=0.15) as fake:
        judge = load_judge(f"openai:m@{fake.url}", concurrency=2)
        assert judge.score(PROMPT, ["a" * n for n in range(1, 9)]) == [float(n) for n in range(1, 9)]
        assert fake.max_in_flight == 2
        assert fake.auth_headers[0] == "Bearer unused"


def test_openai_judge_counts_occasional_failures_after_it_worked(server: LengthJudgeServer) -> None:
    judge = load_judge(f"openai:m@{server.url}", concurrency=1, retries=0, timeout=0.5)
    assert judge.score(PROMPT, ["ok"]) == [2.0]
    scores = judge.score(PROMPT, ["GARBAGE", "BADJSON", "NOPARSE", "SLOW", "HTTP500", "fine"])
    assert scores == [None, None, None, None, None, 4.0]
    assert judge.failures == 5
    assert judge.failure_reasons == {"malformed reply": 2, "unparseable reply": 1, "timeout": 1, "HTTP 500": 1}
    assert judge.compare(PROMPT, "GARBAGE", "x") is None


def test_openai_judge_retries_with_backoff(server: LengthJudgeServer) -> None:
    judge = load_judge(f"openai:m@{server.url}", retries=2, concurrency=1)
    assert judge.score(PROMPT, ["ok"]) == [2.0]
    started = time.perf_counter()
    assert judge.score(PROMPT, ["HTTP500"]) == [None]
    waited = time.perf_counter() - started
    assert len(server.requests) == 1 + 3  # one try and two retries
    assert waited >= 0.75 * (0.5 + 1.0)  # exponential backoff: 0.5 s then 1 s, less up to 25% jitter


def test_openai_judge_first_request_failures_are_one_line_errors(
    server: LengthJudgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    with pytest.raises(UserError, match=rf"first request failed: cannot connect to http://127.0.0.1:{port}/v1"):
        load_judge(f"openai:m@http://127.0.0.1:{port}/v1", retries=0).score(PROMPT, ["x"])
    with pytest.raises(UserError, match=r"first request failed: no reply from .* within 0.3 s \(tried 1 time\)"):
        load_judge(f"openai:m@{server.url}", timeout=0.3, retries=0).score(PROMPT, ["SLOW"])
    with pytest.raises(UserError, match=r"first request failed: not a chat completion"):
        load_judge(f"openai:m@{server.url}", retries=0).score(PROMPT, ["GARBAGE"])
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with pytest.raises(UserError, match=r"refused the API key from \$OPENAI_API_KEY \(HTTP 401\)") as info:
        load_judge(f"openai:m@{server.url}").score(PROMPT, ["DENY"])
    assert SECRET not in str(info.value)
    with pytest.raises(UserError, match=r"answered 404 for model `m`; .*often /v1"):
        load_judge(f"openai:m@{server.url.removesuffix('/v1')}").score(PROMPT, ["x"])


def test_openai_judge_stops_when_the_endpoint_keeps_failing(server: LengthJudgeServer) -> None:
    judge = load_judge(f"openai:m@{server.url}", retries=0, concurrency=1, max_consecutive_failures=3)
    judge.score(PROMPT, ["ok"])
    with pytest.raises(UserError, match=r"3 requests in a row failed .* rerun the same command"):
        judge.score(PROMPT, ["GARBAGE"] * 4)
    assert judge.failures == 2


def test_openai_judge_spec_and_key_mistakes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(UserError, match=r"environment variable NO_SUCH_KEY_VAR is not set"):
        load_judge("openai:m@http://127.0.0.1:1/v1", api_key_env="NO_SUCH_KEY_VAR")
    with pytest.raises(UserError, match=r"environment variable OPENAI_API_KEY is not set"):
        load_judge("openai:gpt-4o-mini")  # the OpenAI API itself needs a key
    with pytest.raises(UserError, match=r"BASE_URL must be an http\(s\) address"):
        load_judge("openai:m@localhost:8000")
    with pytest.raises(UserError, match=r"name the model"):
        load_judge("openai:@http://127.0.0.1:1/v1")
    with pytest.raises(UserError, match=r"--judge-api-key-env must name an environment variable"):
        load_judge("openai:m@http://127.0.0.1:1/v1", api_key_env="sk-abc")
    with pytest.raises(UserError, match=r"--judge-concurrency must be at least 1"):
        load_judge("openai:m@http://127.0.0.1:1/v1", concurrency=0)


@pytest.mark.builtin
def test_builtin_llm_judge_answers_in_the_asked_form() -> None:
    judge = load_judge("llm:builtin:smollm2-135m-instruct", max_tokens=6)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    scores = judge.score(question, ["Paris.", "I like turtles."])
    assert all(s is not None and 1 <= s <= 10 for s in scores)
    assert judge.compare(question, "Paris.", "I like turtles.") in ("A", "B", "tie")
    assert judge.failures == 0
