"""Questions to answer, for `compare`, `chat`, `vibe` and the demo: prompts read by `dpokit.prompts.load_prompts`,
each with its user turns, answered one after another in one conversation as MT-Bench does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dpokit.data import Message
from dpokit.devices import autocast_for
from dpokit.errors import UserError
from dpokit.generation import SamplingSettings, generate_responses
from dpokit.prompts import PromptItem, load_prompts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Question:
    """One prompt to answer: its user turns are answered one after another in the same conversation."""

    question_id: int | str
    turns: tuple[str, ...]
    category: str | None = None
    context: tuple[Message, ...] = ()  # messages before the first turn (a system prompt, an earlier exchange)

    def to_mt_bench(self) -> dict[str, Any]:
        row: dict[str, Any] = {"question_id": self.question_id, "category": self.category, "turns": list(self.turns)}
        if self.context:
            row["context"] = list(self.context)
        return row


def question_from_prompt(item: PromptItem) -> Question:
    """A prompt as a question: its last user message is the first turn, anything before it the context."""
    question_id = item.source_id if item.source_id is not None else item.key
    return Question(question_id, (item.text, *item.later_turns), item.category, tuple(item.messages[:-1]))


def load_questions(source: str, limit: int | None = None) -> list[Question]:
    """The first `limit` (default all) distinct questions of `source`: anything `load_prompts` reads, such as
    MT-Bench's question.jsonl, JSONL rows with a `prompt`, or a text file with one prompt per line. A prompt that
    appears twice is asked once, and the count of such repeats is logged."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    questions: dict[int | str, Question] = {}
    repeats = 0
    for item in load_prompts(source):
        question = question_from_prompt(item)
        if question.question_id in questions:
            repeats += 1  # load_prompts has checked that it is the same prompt
            continue
        questions[question.question_id] = question
    if repeats:
        log.warning("prompts %s: %d prompts appear more than once; each is asked once", source, repeats)
    return list(questions.values())[:limit]


def check_questions(
    tokenizer: Any,
    questions: Sequence[Question],
    source: str,
    system_message: str,
    rejected_dir: str | os.PathLike | None = None,
) -> None:
    """Stop with one line, before any answer, when the chat template refuses a question's conversation (each
    later turn rendered after a stand-in answer); the refused are written beside the output."""
    from dpokit.data.chat_template import check_conversations

    conversations = []
    for q in questions:
        messages: list[Message] = list(q.context)
        for turn, text in enumerate(q.turns):
            if turn:
                messages.append({"role": "assistant", "content": "(answer)"})
            messages.append({"role": "user", "content": text})
        conversations.append((f"{source}: question {q.question_id}", messages))
    check_conversations(tokenizer, conversations, source, system_message=system_message, rejected_dir=rejected_dir)


def answer_questions(
    model: Any,
    tokenizer: Any,
    questions: Sequence[Question],
    settings: SamplingSettings,
    bf16: bool | None = None,
    on_batch: Callable[[int], None] | None = None,
    system_message: str = "keep",
) -> list[list[str]]:
    """Each question's answers, one per turn; a later turn is asked in the conversation holding the earlier
    answers of the same model, as MT-Bench does. `on_batch(n)` reports n answers done."""
    device = next(model.parameters()).device
    conversations = [list(q.context) for q in questions]
    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(max(len(q.turns) for q in questions)):
        active = [i for i, q in enumerate(questions) if len(q.turns) > turn]
        for i in active:
            conversations[i].append({"role": "user", "content": questions[i].turns[turn]})
        with autocast_for(device, bf16):
            outputs = generate_responses(
                model, tokenizer, [conversations[i] for i in active], settings, on_batch, system_message=system_message
            )
        for i, samples in zip(active, outputs, strict=True):
            answers[i].append(samples[0])
            conversations[i].append({"role": "assistant", "content": samples[0]})
    return answers
