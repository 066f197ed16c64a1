"""Judges: who decides which answer is better, for `generate` (ranking samples) and `compare` (pairwise).

A judge is built from a spec string by `load_judge`:

- `python:module:function` or `python:path/to/file.py:function`: `function(prompt, response) -> float`, both as
  text (the prompt's last user message), higher is better; `None` means no verdict.
- `reward-model:ID`: a sequence-classification reward model (one output), scoring in batches through the
  model's chat template where its tokenizer has one.
- `llm:MODEL`: a local causal LM asked, greedily, for a 1-10 score (`SCORE_PROMPT`) or an A/B verdict
  (`PAIRWISE_PROMPT`); its reply is started for it with `[[`, the opening of the asked-for verdict.
- `openai:MODEL@BASE_URL` (or `openai:MODEL` for api.openai.com): any OpenAI-compatible chat endpoint, asked the
  same two prompts. The key comes from the environment variable `api_key_env` (OPENAI_API_KEY by default).

Every judge offers both verbs. `score` returns one score per response, `None` where the judge gave no usable
verdict; `compare` returns "A", "B", "tie", or `None` for no verdict. Scoring judges compare by score; LLM judges
are asked the pairwise question. LLM judges also take pairwise questions already written out
(`PairwiseRequest`: `compare` writes MT-Bench's prompts that way) through `compare_requests`, which returns each
reply beside its verdict. Every missing verdict is counted in `judge.failures` (by reason in
`judge.failure_reasons`), never guessed.

Failures follow one rule: a judge that fails before it ever worked is misconfigured, and that is a one-line
`UserError` (a function that raises on its first call, an endpoint that refuses the first connection); once it has
worked, a failure is a counted, logged skip. An LLM reply that cannot be parsed is always a counted skip, and an
endpoint that fails `max_consecutive_failures` requests in a row stops the run.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
import re
import sys
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol, TypeVar

from dpokit.data import Message
from dpokit.errors import UserError

log = logging.getLogger(__name__)

Verdict = str  # "A" | "B" | "tie"
T = TypeVar("T")
R = TypeVar("R")

DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
LOGGED_FAILURES = 5  # failures logged one by one; the rest are only counted

# The judge prompts, in our words, after MT-Bench's single-answer grading and pairwise comparison prompts
# (Zheng et al. 2023, https://arxiv.org/abs/2306.05685). The verdict comes first so that a small local judge with a
# short reply budget still gives one.
SCORE_PROMPT = """\
Please act as a fair and careful judge. Rate how well the answer below responds to the question, on a scale \
from 1 (useless, wrong or off-topic) to 10 (excellent). Weigh helpfulness, correctness, relevance, depth and \
clarity. Do not reward length for its own sake. If the question is a conversation, rate the answer to its last \
user message.

[Question]
{question}

[Answer]
{answer}
[End of answer]

Reply with your rating first, written exactly as [[N]] where N is a whole number from 1 to 10 (for example \
[[6]]), then at most one sentence explaining it."""

PAIRWISE_PROMPT = """\
Please act as a fair and careful judge. Two assistants answered the same question; decide which answer is \
better. Weigh helpfulness, correctness, relevance, depth and clarity. The order in which the answers appear, \
their length and the assistants' names must not influence you. If the question is a conversation, judge the \
answers to its last user message.

[Question]
{question}

[Answer A]
{answer_a}
[End of answer A]

[Answer B]
{answer_b}
[End of answer B]

Reply with your verdict first, written exactly as [[A]] if answer A is better, [[B]] if answer B is better, or \
[[C]] for a tie, then at most one sentence explaining it."""


class Judge(Protocol):
    """What `generate` and `compare` need from a judge."""

    spec: str  # the spec it was built from, safe to write into outputs (never holds a key)
    failures: int  # verdicts the judge could not give (unparseable replies, failed requests, raised errors)
    failure_reasons: Counter[str]  # the same, by reason

    def score(self, prompt: list[Message], responses: list[str]) -> list[float | None]:
        """One score per response to `prompt` (a conversation ending in a user turn); higher is better."""
        ...

    def compare(self, prompt: list[Message], answer_a: str, answer_b: str) -> Verdict | None:
        """Which answer to `prompt` is better, in this order of presentation."""
        ...

    def score_batch(self, prompts: Sequence[list[Message]], responses: Sequence[list[str]]) -> list[list[float | None]]:
        """`score` for many prompts at once; model and endpoint judges batch or overlap the work."""
        ...

    def compare_batch(self, items: Sequence[tuple[list[Message], str, str]]) -> list[Verdict | None]:
        """`compare` for many (prompt, answer_a, answer_b) at once."""
        ...

    def check(self) -> None:
        """Raise a one-line `UserError` now when the judge cannot work at all (an endpoint that cannot be reached,
        refuses the key or does not know the model), before hours of answers are generated for it."""
        ...

    def close(self) -> None:
        """Release threads, connections and models."""
        ...


@dataclass(frozen=True)
class JudgeOptions:
    """Settings of the judges; each kind reads the ones that concern it (the CLI flag is `--judge-<name>`)."""

    concurrency: int = 8
    """openai: requests in flight at once (threads)."""
    timeout: float = 60.0
    """openai: seconds to wait for one reply."""
    retries: int = 3
    """openai: retries of a request that timed out, could not connect, or got HTTP 408/409/429/5xx; the openai
    client waits 0.5 s, 1 s, 2 s, ... (at most 8 s, or the server's Retry-After) between tries."""
    api_key_env: str = DEFAULT_API_KEY_ENV
    """openai: environment variable holding the API key. A local server needs none when this is left at
    OPENAI_API_KEY and the variable is unset."""
    max_tokens: int = 64
    """llm, openai: longest reply; the verdict comes first, so a short budget suffices."""
    batch_size: int = 8
    """reward-model, llm: sequences per forward pass or generate() call."""
    max_length: int = 2048
    """reward-model: tokens per scored conversation; longer ones keep their end."""
    max_consecutive_failures: int = 10
    """openai: failed requests in a row that stop the run (the endpoint went away)."""
    trust_remote_code: bool = False
    """reward-model, llm: let the model folder run its own code."""

    def __post_init__(self) -> None:
        for name, low in (("concurrency", 1), ("retries", 0), ("max_tokens", 1), ("batch_size", 1)):
            if getattr(self, name) < low:
                raise UserError(f"--judge-{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        for name in ("max_length", "max_consecutive_failures"):
            if getattr(self, name) < 1:
                raise UserError(f"judge option {name} must be at least 1, got {getattr(self, name)}")
        if not self.timeout > 0:
            raise UserError(f"--judge-timeout must be a positive number of seconds, got {self.timeout}")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            raise UserError(f"--judge-api-key-env must name an environment variable, got {self.api_key_env!r}")


def load_judge(spec: str, **options: Any) -> Judge:
    """The judge `spec` names, with `JudgeOptions` fields as keyword options. A bad spec is a one-line UserError."""
    known = {f.name for f in fields(JudgeOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown judge options {unknown}; known: {sorted(known)}")
    opts = JudgeOptions(**options)
    kind, sep, rest = spec.partition(":")
    builders: dict[str, Callable[[str, str, JudgeOptions], Judge]] = {
        "python": _python_judge,
        "reward-model": RewardModelJudge,
        "llm": LocalLLMJudge,
        "openai": _openai_judge,
    }
    if not sep or kind not in builders or not rest.strip():
        raise UserError(
            f"judge `{spec}` is not a judge spec; use python:module:function, python:path/to/file.py:function, "
            "reward-model:ID, llm:MODEL or openai:MODEL@BASE_URL"
        )
    return builders[kind](spec, rest, opts)


def judge_options_from_args(args: Any) -> dict[str, Any]:
    """The `--judge-*` flags of a parsed command line, as keyword options for `load_judge`."""
    names = ("concurrency", "timeout", "retries", "api_key_env", "max_tokens", "batch_size")
    return {n: getattr(args, f"judge_{n}") for n in names if getattr(args, f"judge_{n}", None) is not None}


# --- shared parts -------------------------------------------------------------------------------------------------


def last_user_text(prompt: list[Message]) -> str:
    """The prompt as a rule judge sees it: its last user message."""
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


def question_text(prompt: list[Message]) -> str:
    """The prompt as an LLM judge sees it: the user's text, or a labelled transcript of a longer conversation."""
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


def verdict_from_scores(score_a: float | None, score_b: float | None) -> Verdict | None:
    if score_a is None or score_b is None:
        return None
    return "A" if score_a > score_b else "B" if score_b > score_a else "tie"


_SCORE_PATTERNS = (
    re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\]\]"),  # [[7]], [[7.5]], [[7/10]]
    re.compile(r"(?i:\b(?:rating|score)\b)\s*(?:(?i:is|of)\s*)?[:=]?\s*\**\s*\[?\s*(\d+(?:\.\d+)?)"),  # Rating: 7
    re.compile(r"(\d+(?:\.\d+)?)\s*(?:/|(?i:out of))\s*10\b"),  # 7/10, 7 out of 10
    re.compile(r"^\W*(\d+(?:\.\d+)?)\W*$"),  # a reply that is only the number
)

_VERDICT_PATTERNS = (
    re.compile(r"\[\[\s*([ABC]|(?i:tie))\s*\]\]"),  # [[A]], [[B]], [[C]] (tie), [[tie]]
    re.compile(r"^\W*([ABC]|(?i:tie))\W*$"),  # a reply that is only the letter
    re.compile(r"(?i:\b(?:verdict|winner)\b)\s*(?:(?i:is)\s*)?:\s*\**\s*\[*\s*(?:(?i:answer)\s+)?([ABC]|(?i:tie))\b"),
    re.compile(r"(?i:\b(?:answer|assistant))\s+([AB])\s+(?i:is\s+better)\b"),  # Answer A is better
)


def _first_agreeing(patterns: Sequence[re.Pattern[str]], reply: str) -> str | None:
    """The value the first matching pattern finds; None when none matches or its matches disagree."""
    for pattern in patterns:
        found = {m.group(1).upper() for m in pattern.finditer(reply.strip())}
        if len(found) == 1:
            return found.pop()
        if len(found) > 1:
            return None  # "[[3]] ... [[8]]": the judge contradicts itself
    return None


def parse_score(reply: str) -> float | None:
    """The 1-10 rating in an LLM judge's reply, or None when it has no single, in-range rating."""
    found = _first_agreeing(_SCORE_PATTERNS, reply)
    if found is None:
        return None
    value = float(found)
    return value if 1.0 <= value <= 10.0 else None


def parse_verdict(reply: str) -> Verdict | None:
    """ "A", "B" or "tie" from an LLM judge's pairwise reply, or None when it has no single verdict."""
    found = _first_agreeing(_VERDICT_PATTERNS, reply)
    if found is None:
        return None
    return {"A": "A", "B": "B", "C": "tie", "TIE": "tie"}[found]


class BaseJudge:
    """Counting of missing verdicts, and the single-item verbs in terms of the batched ones."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.failures = 0
        self.failure_reasons: Counter[str] = Counter()
        self._worked = False  # set once the judge has given one verdict; failures before that are fatal
        self._lock = threading.Lock()

    def _count_failure(self, reason: str, detail: str = "") -> None:
        with self._lock:
            self.failures += 1
            self.failure_reasons[reason] += 1
            number = self.failures
        if number <= LOGGED_FAILURES:
            more = " (further failures are only counted)" if number == LOGGED_FAILURES else ""
            log.warning("judge %s: no verdict, %s%s%s", self.spec, reason, f": {detail}" if detail else "", more)

    def score(self, prompt: list[Message], responses: list[str]) -> list[float | None]:
        return self.score_batch([prompt], [responses])[0]

    def compare(self, prompt: list[Message], answer_a: str, answer_b: str) -> Verdict | None:
        return self.compare_batch([(prompt, answer_a, answer_b)])[0]

    def score_batch(self, prompts: Sequence[list[Message]], responses: Sequence[list[str]]) -> list[list[float | None]]:
        raise NotImplementedError

    def compare_batch(self, items: Sequence[tuple[list[Message], str, str]]) -> list[Verdict | None]:
        raise NotImplementedError

    def check(self) -> None:
        return None  # local judges were loaded (and their files checked) when they were built

    def close(self) -> None:
        return None


class ScoringJudge(BaseJudge):
    """A judge that scores; it compares two answers by scoring both."""

    def compare_batch(self, items: Sequence[tuple[list[Message], str, str]]) -> list[Verdict | None]:
        scores = self.score_batch([prompt for prompt, _, _ in items], [[a, b] for _, a, b in items])
        return [verdict_from_scores(a, b) for a, b in scores]


def _regroup(flat: list[T], sizes: Sequence[int]) -> list[list[T]]:
    out, start = [], 0
    for size in sizes:
        out.append(flat[start : start + size])
        start += size
    return out


# --- python:module:function ---------------------------------------------------------------------------------------


class PythonJudge(ScoringJudge):
    """A user's function(prompt_text, response_text) -> float, higher is better, or None for no verdict."""

    def __init__(self, spec: str, function: Callable[[str, str], Any]) -> None:
        super().__init__(spec)
        self.function = function

    def score_batch(self, prompts: Sequence[list[Message]], responses: Sequence[list[str]]) -> list[list[float | None]]:
        return [[self._call(last_user_text(p), r) for r in rs] for p, rs in zip(prompts, responses, strict=True)]

    def _call(self, prompt_text: str, response: str) -> float | None:
        try:
            value = self.function(prompt_text, response)
        except Exception as e:
            message = " ".join(f"{type(e).__name__}: {e}".split())[:200]
            if not self._worked:
                raise UserError(
                    f"judge `{self.spec}` raised {message} on its first call; fix the function (--debug shows the "
                    "traceback) or return None where it has no verdict"
                ) from e
            self._count_failure("function raised", message)
            return None
        if value is None:
            self._count_failure("function returned None")
            return None
        if isinstance(value, str | bytes) or not hasattr(type(value), "__float__"):
            raise UserError(
                f"judge `{self.spec}` returned {type(value).__name__} {str(value)[:40]!r}; it must return a number, "
                "higher is better (or None for no verdict)"
            )
        try:
            score = float(value)
        except (TypeError, ValueError, RuntimeError) as e:  # e.g. a tensor of several numbers
            raise UserError(f"judge `{self.spec}` returned {type(value).__name__}, not one number: {e}") from e
        if not math.isfinite(score):
            self._count_failure("function returned a non-finite number", str(score))
            return None
        self._worked = True
        return score


def _python_judge(spec: str, rest: str, options: JudgeOptions) -> Judge:
    target, sep, name = rest.rpartition(":")
    if not sep or not target or not name:
        raise UserError(f"judge `{spec}`: write python:module:function or python:path/to/file.py:function")
    module = _import_target(spec, target)
    function = getattr(module, name, None)
    if function is None:
        raise UserError(f"judge `{spec}`: {target} has no function `{name}`")
    if not callable(function):
        raise UserError(f"judge `{spec}`: `{name}` in {target} is a {type(function).__name__}, not a function")
    return PythonJudge(spec, function)


def _import_target(spec: str, target: str) -> Any:
    """A module by dotted name from PYTHONPATH, or from a .py file (given as a path, or beside us as NAME.py)."""
    is_path = target.endswith(".py") or "/" in target or os.sep in target
    if not is_path:
        try:
            return importlib.import_module(target)
        except ModuleNotFoundError as e:
            if e.name is None or not (target == e.name or target.startswith(e.name + ".")):
                raise UserError(f"judge `{spec}`: importing {target} failed: {e}") from e
            fallback = Path(target.replace(".", "/") + ".py")
            if not fallback.is_file():
                raise UserError(
                    f"judge `{spec}`: no module `{target}` on PYTHONPATH and no file {fallback}; add its folder to "
                    "PYTHONPATH or give the file path, python:path/to/file.py:function"
                ) from e
            return _import_file(spec, fallback)
        except Exception as e:  # the user's module failed while importing; that is theirs to fix
            raise UserError(f"judge `{spec}`: importing {target} failed: {type(e).__name__}: {e}") from e
    path = Path(target).expanduser()
    if not path.is_file():
        raise UserError(f"judge `{spec}`: file {path} does not exist")
    return _import_file(spec, path)


def _import_file(spec: str, path: Path) -> Any:
    module_name = f"dpokit_judge_{path.stem}_{abs(hash(str(path.resolve()))):x}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"judge `{spec}`: {path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # before running it, so dataclasses and pickling inside it work
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise UserError(f"judge `{spec}`: importing {path} failed: {type(e).__name__}: {e}") from e
    return module


# --- reward-model:ID ----------------------------------------------------------------------------------------------


class RewardModelJudge(ScoringJudge):
    """A sequence-classification reward model: the score is its single output on prompt + response."""

    def __init__(self, spec: str, model_id: str, options: JudgeOptions) -> None:
        super().__init__(spec)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.options = options
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=options.trust_remote_code)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                model_id, trust_remote_code=options.trust_remote_code, use_safetensors=True
            )
        except (OSError, ValueError) as e:
            reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise UserError(
                f"judge `{spec}`: cannot load reward model `{model_id}` ({reason}); give a local folder with a "
                "sequence-classification model in safetensors, or a hub id while online"
            ) from e
        if self.model.config.num_labels != 1:
            raise UserError(
                f"judge `{spec}`: `{model_id}` has {self.model.config.num_labels} outputs; a reward model has one "
                "(num_labels=1)"
            )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # the model pools the last non-pad token of each row, so it must know the pad id to score in batches
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.truncation_side = "left"  # an over-long conversation keeps the response
        self.use_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.model.eval()

    def render(self, prompt: list[Message], response: str) -> str:
        """The text the model scores: the conversation through its chat template, else the plain turns."""
        if self.use_chat_template:
            conversation = [*prompt, {"role": "assistant", "content": response}]
            return self.tokenizer.apply_chat_template(conversation, tokenize=False)
        return "\n\n".join([*(m["content"] for m in prompt), response])

    def score_batch(self, prompts: Sequence[list[Message]], responses: Sequence[list[str]]) -> list[list[float | None]]:
        import torch

        texts = [self.render(p, r) for p, rs in zip(prompts, responses, strict=True) for r in rs]
        device = next(self.model.parameters()).device
        scores: list[float | None] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.options.batch_size):
                inputs = self.tokenizer(
                    texts[start : start + self.options.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.options.max_length,
                    return_tensors="pt",
                    add_special_tokens=not self.use_chat_template,  # the template already holds them
                ).to(device)
                logits = self.model(**inputs).logits[:, 0].float()  # (B,)
                scores.extend(logits.tolist())
        if scores:
            self._worked = True
        return _regroup(scores, [len(rs) for rs in responses])

    def close(self) -> None:
        self.model = None


# --- llm:MODEL ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairwiseRequest:
    """A pairwise question already written out for an LLM judge (by `compare`, in our words or MT-Bench's)."""

    messages: tuple[Message, ...]  # the chat sent to the judge: an optional system message, then the user's
    parse: Callable[[str], Verdict | None]  # reads the verdict in the judge's reply
    reply_start: str = ""  # a local judge's reply is started with it; an endpoint cannot be given one


class LLMJudge(BaseJudge):
    """A judge that reads `SCORE_PROMPT` / `PAIRWISE_PROMPT` and replies in words, parsed for the verdict."""

    REPLY_START = "[["  # the opening of the verdict our prompts ask for

    def chat(self, conversations: list[list[Message]], reply_start: str = "") -> list[str | None]:
        """One reply per conversation (None where none came); subclasses talk to their model."""
        raise NotImplementedError

    def ask(self, questions: list[str]) -> list[str | None]:
        """Replies to our own prompts, each sent as one user message."""
        return self.chat([[{"role": "user", "content": q}] for q in questions], self.REPLY_START)

    def score_batch(self, prompts: Sequence[list[Message]], responses: Sequence[list[str]]) -> list[list[float | None]]:
        questions = [
            SCORE_PROMPT.format(question=question_text(p), answer=r)
            for p, rs in zip(prompts, responses, strict=True)
            for r in rs
        ]
        scores = [self._parsed(reply, parse_score) for reply in self.ask(questions)]
        return _regroup(scores, [len(rs) for rs in responses])

    def compare_batch(self, items: Sequence[tuple[list[Message], str, str]]) -> list[Verdict | None]:
        questions = [PAIRWISE_PROMPT.format(question=question_text(p), answer_a=a, answer_b=b) for p, a, b in items]
        return [self._parsed(reply, parse_verdict) for reply in self.ask(questions)]

    def compare_requests(self, requests: Sequence[PairwiseRequest]) -> list[tuple[Verdict | None, str | None]]:
        """(verdict, the judge's reply) of each written-out question; the reply is None where the request failed.
        Requests that start their reply alike are asked together, so an endpoint judge overlaps all of them."""
        replies: list[str | None] = [None] * len(requests)
        for start in dict.fromkeys(r.reply_start for r in requests):
            group = [i for i, r in enumerate(requests) if r.reply_start == start]
            for i, reply in zip(group, self.chat([list(requests[i].messages) for i in group], start), strict=True):
                replies[i] = reply
        return [(self._parsed(reply, r.parse), reply) for r, reply in zip(requests, replies, strict=True)]

    def _parsed(self, reply: str | None, parse: Callable[[str], R | None]) -> R | None:
        if reply is None:
            return None  # the request failed and was counted where it failed
        value = parse(reply)
        if value is None:
            self._count_failure("unparseable reply", repr(reply[:80]))
        return value


class LocalLLMJudge(LLMJudge):
    """A local causal LM (hub id, folder or builtin:) asked greedily, in batches, through its chat template.

    Its reply is started for it with `[[`, the opening of the verdict the prompt asks for, so that even a small
    model answers in that form instead of restating the question.
    """

    def __init__(self, spec: str, model_name: str, options: JudgeOptions) -> None:
        super().__init__(spec)
        from dpokit.generation import SamplingSettings
        from dpokit.models import load_model, load_tokenizer

        self.tokenizer = load_tokenizer(model_name, trust_remote_code=options.trust_remote_code)
        self.model = load_model(model_name, trust_remote_code=options.trust_remote_code)
        self.settings = SamplingSettings(
            num_samples=1, temperature=0.0, max_new_tokens=options.max_tokens, batch_size=options.batch_size
        )

    def chat(self, conversations: list[list[Message]], reply_start: str = "") -> list[str | None]:
        from dpokit.generation import generate_responses

        replies = generate_responses(
            self.model, self.tokenizer, conversations, self.settings, answer_prefix=reply_start
        )
        return [reply_start + r[0] for r in replies]

    def close(self) -> None:
        self.model = None


# --- openai:MODEL@BASE_URL ----------------------------------------------------------------------------------------


def _openai_judge(spec: str, rest: str, options: JudgeOptions) -> Judge:
    model, _, base_url = rest.partition("@")
    if not model.strip():
        raise UserError(f"judge `{spec}`: name the model, as openai:MODEL@BASE_URL")
    if base_url and not re.match(r"https?://[^/]", base_url):
        raise UserError(
            f"judge `{spec}`: BASE_URL must be an http(s) address such as http://127.0.0.1:8000/v1, got {base_url!r}"
        )
    return OpenAIJudge(spec, model, base_url or None, options)


class OpenAIJudge(LLMJudge):
    """An OpenAI-compatible chat endpoint, asked in parallel threads through the `openai` client."""

    def __init__(self, spec: str, model: str, base_url: str | None, options: JudgeOptions) -> None:
        super().__init__(spec)
        import openai

        self.model = model
        self.options = options
        key = os.environ.get(options.api_key_env)
        if not key:
            if options.api_key_env != DEFAULT_API_KEY_ENV or base_url is None:
                raise UserError(
                    f"judge `{spec}`: environment variable {options.api_key_env} is not set; export the "
                    "endpoint's API key in it (dpokit reads keys only from the environment)"
                )
            key = "unused"  # vLLM, llama.cpp and Ollama accept any key when they were started without one
        self._secret = key if os.environ.get(options.api_key_env) else ""
        self._client = openai.OpenAI(
            api_key=key, base_url=base_url, timeout=options.timeout, max_retries=options.retries
        )
        self.base_url = str(self._client.base_url).rstrip("/")
        self._pool = ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix="dpokit-judge")
        self._failures_in_a_row = 0
        # httpx logs every request at INFO; that would bury the progress bar (it never logs the key)
        logging.getLogger("httpx").setLevel(logging.WARNING)

    def chat(self, conversations: list[list[Message]], reply_start: str = "") -> list[str | None]:
        """Replies in parallel threads; `reply_start` is not sent (the chat API has no way to start a reply)."""
        futures = [self._pool.submit(self._chat, c) for c in conversations]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()  # do not start queued requests once the run is stopping
            raise

    def check(self) -> None:
        """One pairwise question about two identical answers; its verdict is not counted, only that it came. A
        failure here is a first failure, so `_request_failed` makes it a one-line UserError."""
        if not self._worked:
            question = PAIRWISE_PROMPT.format(question="Say hello.", answer_a="Hello!", answer_b="Hello!")
            self._chat([{"role": "user", "content": question}])

    def _chat(self, messages: list[Message]) -> str | None:
        import openai

        try:
            completion = self._client.chat.completions.create(
                model=self.model,
                messages=messages,
                temperature=0.0,
                max_tokens=self.options.max_tokens,
            )
        except openai.APIError as e:
            return self._request_failed(*self._describe(e))
        except ValueError as e:  # a 200 answer whose body is not JSON
            return self._request_failed("malformed reply", f"the body is not JSON ({type(e).__name__})")
        text = _reply_text(completion)
        if text is None:
            return self._request_failed("malformed reply", f"not a chat completion: {str(completion)[:80]!r}")
        with self._lock:
            self._worked = True
            self._failures_in_a_row = 0
        return text

    def _describe(self, error: Exception) -> tuple[str, str]:
        """(reason, one-line detail) of a failed request; the detail never holds the key."""
        import openai

        tries = f"tried {self.options.retries + 1} time{'s' if self.options.retries else ''}"
        if isinstance(error, openai.APITimeoutError):
            return "timeout", f"no reply from {self.base_url} within {self.options.timeout:g} s ({tries})"
        if isinstance(error, openai.APIConnectionError):
            cause = error.__cause__ or error
            return "connection failed", f"cannot connect to {self.base_url} ({tries}): {self._redact(cause)}"
        if isinstance(error, openai.AuthenticationError | openai.PermissionDeniedError):
            raise UserError(
                f"judge `{self.spec}`: {self.base_url} refused the API key from ${self.options.api_key_env} "
                f"(HTTP {error.status_code})"
            ) from None
        if isinstance(error, openai.NotFoundError):
            raise UserError(
                f"judge `{self.spec}`: {self.base_url} answered 404 for model `{self.model}`; check the model name "
                "and that BASE_URL ends where /chat/completions starts (often /v1)"
            ) from None
        if isinstance(error, openai.APIStatusError):
            message = error.message
            body = error.body
            if isinstance(body, dict) and isinstance(body.get("detail"), str):  # FastAPI servers (transformers serve)
                message = f"{message}: {body['detail']}"
            return f"HTTP {error.status_code}", f"from {self.base_url}: {self._redact(message)[:240]}"
        return "malformed reply", self._redact(error)[:160]

    def _redact(self, value: object) -> str:
        text = " ".join(str(value).split())
        return text.replace(self._secret, "***") if self._secret else text

    def _request_failed(self, reason: str, detail: str) -> None:
        with self._lock:
            worked = self._worked
            self._failures_in_a_row += 1
            in_a_row = self._failures_in_a_row
        if not worked:
            raise UserError(f"judge `{self.spec}`: the first request failed: {detail}")
        if in_a_row >= self.options.max_consecutive_failures:
            raise UserError(
                f"judge `{self.spec}`: {in_a_row} requests in a row failed (last: {detail}); what was made so far "
                "is saved, rerun the same command once the endpoint answers"
            )
        self._count_failure(reason, detail)
        return None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()


def _reply_text(completion: Any) -> str | None:
    """The text of a chat completion, or None when the endpoint sent something else (HTML, a bare string, ...)."""
    choices = getattr(completion, "choices", None)
    if not isinstance(choices, list) or not choices:
        return None
    content = getattr(getattr(choices[0], "message", None), "content", None)
    return content if isinstance(content, str) else None
