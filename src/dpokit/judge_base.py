"""What every judge shares: the `Judge` protocol that `generate` and `compare` use, the judges' options, counting of
missing verdicts, and the LLM judge that asks our prompts and parses the replies (local and endpoint judges differ
only in how they `chat`).
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from dpokit.data import Message
from dpokit.errors import UserError
from dpokit.judge_prompts import (
    PAIRWISE_PROMPT,
    SCORE_PROMPT,
    Verdict,
    parse_score,
    parse_verdict,
    question_text,
    verdict_from_scores,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
LOGGED_FAILURES = 5  # failures logged one by one; the rest are only counted


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


def regroup(flat: list[T], sizes: Sequence[int]) -> list[list[T]]:
    """`flat` cut into consecutive lists of the given sizes: one list of scores per prompt."""
    out, start = [], 0
    for size in sizes:
        out.append(flat[start : start + size])
        start += size
    return out


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
        return regroup(scores, [len(rs) for rs in responses])

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
