"""What an LLM judge is asked and how its reply is read: the score and pairwise prompts, the question as the judge
sees it, and the parsers that find a verdict in a free-text reply (None when there is no single one).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from dpokit.data import Message

Verdict = str  # "A" | "B" | "tie"

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
