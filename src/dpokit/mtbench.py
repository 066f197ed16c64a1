"""MT-Bench's own pairwise judging, read from FastChat's files (https://github.com/lm-sys/FastChat, llm_judge).

- `judge_prompts.jsonl`: one judge prompt per line (`name`, `type`, `system_prompt`, `prompt_template`,
  `output_format`). `compare --judge-prompts FILE` uses `pair-v2` for a first turn and `pair-v2-multi-turn` for the
  second, and for the categories FastChat grades against a reference answer (math, reasoning, coding) `pair-math-v1`
  and `pair-math-v1-multi-turn`, with the reference from `--reference-answers` (FastChat's
  `reference_answer/gpt-4.jsonl`). Each prompt is filled in as FastChat's `run_judge_pair` does, sent as a system
  message and a user message, and the reply read as FastChat reads it: `[[A]]`, else `[[B]]`, else `[[C]]` (a tie).
- answer files (`model_answer/<model>.jsonl`, one row per question with `choices[0].turns`), both FastChat's and
  ours: `--answers-a` / `--answers-b` judge answers that were generated before, by FastChat or by dpokit.

MT-Bench's templates hold two turns; a later turn of a longer conversation is not judged with them (counted).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpokit.errors import UserError
from dpokit.judge_base import PairwiseRequest
from dpokit.judge_prompts import Verdict
from dpokit.questions import Question

log = logging.getLogger(__name__)

NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")  # FastChat's categories judged with a reference
GENERAL, GENERAL_MULTI_TURN = "pair-v2", "pair-v2-multi-turn"
REFERENCE, REFERENCE_MULTI_TURN = "pair-math-v1", "pair-math-v1-multi-turn"
MTBENCH_MAX_TOKENS = 2048  # FastChat's reply budget for a pairwise judgment: the verdict comes after the explanation
MTBENCH_TURNS = 2  # turns MT-Bench's templates can show


@dataclass(frozen=True)
class JudgePrompt:
    """One line of FastChat's judge_prompts.jsonl."""

    name: str
    system_prompt: str
    prompt_template: str
    output_format: str


def _jsonl_rows(path: str | Path, flag: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line; a line that is not a JSON object is a UserError."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{flag} {file}: no such file")
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{flag} {file} line {number} is not JSON ({e.msg}); fix or remove that line") from e
        if not isinstance(row, dict):
            raise UserError(f"{flag} {file} line {number} is not a JSON object")
        rows.append((number, row))
    return rows


def load_judge_prompts(path: str | Path) -> dict[str, JudgePrompt]:
    """The judge prompts of FastChat's judge_prompts.jsonl, by name; the two general pairwise ones must be there."""
    prompts: dict[str, JudgePrompt] = {}
    for number, row in _jsonl_rows(path, "--judge-prompts"):
        fields = ("name", "system_prompt", "prompt_template", "output_format")
        missing = [f for f in fields if not isinstance(row.get(f), str)]
        if missing:
            raise UserError(f"--judge-prompts {path} line {number} has no {', '.join(missing)} (FastChat's layout)")
        prompts[row["name"]] = JudgePrompt(*(row[f] for f in fields))
    absent = [n for n in (GENERAL, GENERAL_MULTI_TURN) if n not in prompts]
    if absent:
        raise UserError(f"--judge-prompts {path} has no {' or '.join(absent)}; give FastChat's judge_prompts.jsonl")
    return prompts


def load_answer_file(path: str | Path, flag: str) -> dict[str, list[str]]:
    """question_id (as text) -> the answer's turns, from a model_answer/<model>.jsonl of FastChat or dpokit (the
    first choice, as FastChat's judge reads it). A question answered twice keeps its last row, as FastChat does."""
    answers: dict[str, list[str]] = {}
    for number, row in _jsonl_rows(path, flag):
        try:
            turns = row["choices"][0]["turns"]
            question_id = row["question_id"]
        except (KeyError, IndexError, TypeError) as e:
            raise UserError(
                f"{flag} {path} line {number} has no question_id and choices[0].turns (MT-Bench's answer layout)"
            ) from e
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise UserError(f"{flag} {path} line {number}: choices[0].turns must be a list of strings")
        answers[str(question_id)] = turns
    return answers


def answers_for(answers: Mapping[str, list[str]], questions: Sequence[Question], flag: str) -> list[list[str]]:
    """Each question's answer turns from an answer file; a question it does not answer (every turn) is a UserError."""
    missing = [q.question_id for q in questions if len(answers.get(str(q.question_id), ())) < len(q.turns)]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise UserError(
            f"{flag} has no answer to every turn of {len(missing)} question(s) ({shown}); answer them, or give "
            "--prompts with only the questions it answers"
        )
    return [answers[str(q.question_id)][: len(q.turns)] for q in questions]


def fastchat_verdict(judgment: str) -> Verdict | None:
    """A pairwise judgment read as FastChat's run_judge_pair reads it (its order of tests, not a vote)."""
    for mark, verdict in (("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie")):
        if mark in judgment:
            return verdict
    return None


class MTBenchPrompts:
    """MT-Bench's pairwise judge prompts, filled in for one (question, turn) exactly as FastChat fills them."""

    def __init__(self, prompts: Mapping[str, JudgePrompt], references: Mapping[str, list[str]] | None = None):
        self.prompts = prompts
        self.references = references or {}

    def check(self, questions: Sequence[Question]) -> None:
        """Everything the questions need is here: the reference prompts and reference answers for the categories
        that need them. Warns about what MT-Bench's prompts cannot show (later turns, context messages)."""
        graded = [q for q in questions if q.category in NEED_REF_CATS]
        if graded:
            needed = [REFERENCE] + ([REFERENCE_MULTI_TURN] if any(len(q.turns) > 1 for q in graded) else [])
            absent = [n for n in needed if n not in self.prompts]
            if absent:
                raise UserError(
                    f"--judge-prompts has no {' or '.join(absent)}, needed for the {graded[0].category} "
                    "questions; give FastChat's judge_prompts.jsonl"
                )
            short = [
                q.question_id
                for q in graded
                if len(self.references.get(str(q.question_id), ())) < min(len(q.turns), MTBENCH_TURNS)
            ]
            if short:
                shown = ", ".join(map(str, short[:5])) + (", ..." if len(short) > 5 else "")
                raise UserError(
                    f"{len(short)} math/reasoning/coding question(s) ({shown}) have no reference answer; give "
                    "--reference-answers FILE (FastChat's reference_answer/gpt-4.jsonl) holding them"
                )
        for prompt in self.prompts.values():
            if prompt.name in (GENERAL, GENERAL_MULTI_TURN, REFERENCE, REFERENCE_MULTI_TURN) and (
                prompt.output_format != "[[A]]"
            ):
                raise UserError(f"--judge-prompts: {prompt.name} asks for {prompt.output_format}; dpokit reads [[A]]")
        longer = sum(len(q.turns) > MTBENCH_TURNS for q in questions)
        if longer:
            log.warning("%d questions have more than %d turns; MT-Bench's prompts judge the first two", longer, 2)
        if any(q.context for q in questions):
            log.warning("MT-Bench's prompts show no system or earlier messages; the judge sees only the turns")

    def judged_turns(self, question: Question) -> range:
        return range(1, min(len(question.turns), MTBENCH_TURNS) + 1)

    def prompt_name(self, question: Question, turn: int) -> str:
        if question.category in NEED_REF_CATS:
            return REFERENCE if turn == 1 else REFERENCE_MULTI_TURN
        return GENERAL if turn == 1 else GENERAL_MULTI_TURN

    def user_prompt(self, question: Question, turn: int, answers_a: Sequence[str], answers_b: Sequence[str]) -> str:
        """FastChat's `prompt_template.format(...)` for this turn (run_judge_pair in fastchat/llm_judge/common.py)."""
        template = self.prompts[self.prompt_name(question, turn)].prompt_template
        kwargs: dict[str, str] = {}
        reference = self.references.get(str(question.question_id)) if question.category in NEED_REF_CATS else None
        if reference is not None:
            kwargs["ref_answer_1"] = reference[0]
            if turn == 2:
                kwargs["ref_answer_2"] = reference[1]
        if turn == 2:
            return template.format(
                question_1=question.turns[0],
                question_2=question.turns[1],
                answer_a_1=answers_a[0],
                answer_b_1=answers_b[0],
                answer_a_2=answers_a[1],
                answer_b_2=answers_b[1],
                **kwargs,
            )
        return template.format(question=question.turns[0], answer_a=answers_a[0], answer_b=answers_b[0], **kwargs)

    def request(
        self, question: Question, turn: int, answers_a: Sequence[str], answers_b: Sequence[str]
    ) -> PairwiseRequest:
        system = self.prompts[self.prompt_name(question, turn)].system_prompt
        user = self.user_prompt(question, turn, answers_a, answers_b)
        messages = ({"role": "system", "content": system}, {"role": "user", "content": user})
        return PairwiseRequest(messages, fastchat_verdict)
