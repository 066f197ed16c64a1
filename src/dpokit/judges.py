"""Judges: who decides which answer is better, for `generate` (ranking samples) and `compare` (pairwise).

A judge is built from a spec string by `load_judge`:

- `python:module:function` or `python:path/to/file.py:function`: `function(prompt, response) -> float`, both as
  text (the prompt's last user message), higher is better.
- `reward-model:ID`: a sequence-classification reward model, scoring in batches.
- `llm:MODEL`: a local causal LM asked for a 1-10 score or an A/B verdict.
- `openai:MODEL@BASE_URL`: any OpenAI-compatible chat endpoint; the key comes from an environment variable.

Every judge offers both verbs. `score` returns one score per response, `None` where the judge gave no usable
verdict (counted, never guessed). `compare` returns "A", "B", "tie", or `None` for no verdict.
"""

from __future__ import annotations

from typing import Protocol

from dpokit.data import Message

Verdict = str  # "A" | "B" | "tie"


class Judge(Protocol):
    """What `generate` and `compare` need from a judge."""

    spec: str  # the spec it was built from, safe to write into outputs (never holds a key)

    def score(self, prompt: list[Message], responses: list[str]) -> list[float | None]:
        """One score per response to `prompt` (a conversation ending in a user turn); higher is better."""
        ...

    def compare(self, prompt: list[Message], answer_a: str, answer_b: str) -> Verdict | None:
        """Which answer to `prompt` is better, in this order of presentation."""
        ...
