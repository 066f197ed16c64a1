"""From judged answers to a preference pair: which answers count, which two make the pair, and the rows written.

The best answer is `chosen`; the worst (or a random lower-scored one) is `rejected`. Identical and empty answers
are set aside before judging; ties never make a pair, nor do pairs closer than `--min-margin`.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dpokit.data import Message
from dpokit.errors import UserError
from dpokit.judge_base import Judge
from dpokit.prompts import PromptItem

PAIRINGS = ("best-worst", "best-random")

# why a prompt gave no pair; the summary counts each
SKIP_IDENTICAL = "fewer than 2 distinct answers"
SKIP_TIED = "all answers tied"
SKIP_MARGIN = "margin below --min-margin"
SKIP_JUDGE = "judge scored fewer than 2 answers"  # not final: a rerun tries the prompt again


@dataclass(frozen=True)
class PairingSettings:
    pairing: str = "best-worst"
    """best-worst: the best answer against the worst; best-random: against a random lower-scored one."""
    min_margin: float = 0.0
    """least score gap between chosen and rejected; equal scores never make a pair."""

    def __post_init__(self) -> None:
        if self.pairing not in PAIRINGS:
            raise UserError(f"--pairing must be one of {', '.join(PAIRINGS)}, got {self.pairing!r}")
        if not self.min_margin >= 0:
            raise UserError(f"--min-margin must be zero or positive, got {self.min_margin}")


@dataclass(frozen=True)
class Choice:
    chosen: str
    rejected: str
    score_chosen: float
    score_rejected: float

    @property
    def margin(self) -> float:
        return self.score_chosen - self.score_rejected


def select_pair(scored: Sequence[tuple[str, float]], pairing: PairingSettings, rng: random.Random) -> Choice | str:
    """The pair to write from (answer, score) candidates, or the reason there is none.

    The best is the first answer with the top score; best-worst takes the first with the lowest score, best-random
    a random one among those scoring at least `min_margin` below the best (and strictly below it).
    """
    if len(scored) < 2:
        return SKIP_IDENTICAL
    best = max(scored, key=lambda item: item[1])
    lower = [item for item in scored if item[1] < best[1]]
    if not lower:
        return SKIP_TIED
    if pairing.pairing == "best-worst":
        worst = min(lower, key=lambda item: item[1])
        candidates = [worst] if best[1] - worst[1] >= pairing.min_margin else []
    else:
        candidates = [item for item in lower if best[1] - item[1] >= pairing.min_margin]
    if not candidates:
        return SKIP_MARGIN
    rejected = candidates[0] if len(candidates) == 1 else rng.choice(candidates)
    return Choice(best[0], rejected[0], best[1], rejected[1])


@dataclass
class Summary:
    """What a run did, for the final line: every prompt is in exactly one of these counts."""

    output: str
    prompts: int = 0
    already_done: int = 0
    duplicates: int = 0
    counts: Counter[str] = field(default_factory=Counter)  # "pairs written" and the SKIP_* reasons
    judge_failures: Counter[str] = field(default_factory=Counter)
    empty_answers: int = 0
    later_turns_unused: int = 0

    @property
    def pairs_written(self) -> int:
        return self.counts["pairs written"]

    def line(self) -> str:
        failures = sum(self.judge_failures.values())
        reasons = ", ".join(f"{n} {r}" for r, n in self.judge_failures.most_common())
        parts = [
            f"{self.pairs_written} pairs written to {self.output}",
            f"{self.counts[SKIP_TIED] + self.counts[SKIP_IDENTICAL]} prompts skipped because all answers tied "
            f"({self.counts[SKIP_IDENTICAL]} with identical answers)",
            f"{self.counts[SKIP_MARGIN]} below --min-margin",
            f"{self.counts[SKIP_JUDGE]} unranked (retried on rerun)",
            f"{failures} judge failures" + (f" ({reasons})" if reasons else ""),
            f"{self.already_done} already done",
        ]
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicate prompts")
        if self.empty_answers:
            parts.append(f"{self.empty_answers} empty answers set aside")
        return "generate: " + "; ".join(parts)

    def add(self, other: Summary) -> None:
        self.counts.update(other.counts)
        self.judge_failures.update(other.judge_failures)
        self.empty_answers += other.empty_answers


def distinct_answers(answers: Sequence[str]) -> tuple[list[str], int]:
    """(the distinct non-empty answers in order of first appearance, how many empty answers were set aside)."""
    seen: dict[str, None] = {}
    empty = 0
    for answer in answers:
        if not answer.strip():
            empty += 1
        else:
            seen.setdefault(answer, None)
    return list(seen), empty


def judge_batch(
    items: Sequence[PromptItem],
    answers: Sequence[Sequence[str]],
    judge: Judge,
    pairing: PairingSettings,
    seed: int,
    provenance: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Summary]:
    """Pair rows and skipped rows for a batch of prompts and their sampled answers."""
    summary = Summary(output="")
    distinct: list[list[str]] = []
    for texts in answers:
        unique, empty = distinct_answers(texts)
        distinct.append(unique)
        summary.empty_answers += empty
    to_judge = [i for i, unique in enumerate(distinct) if len(unique) >= 2]
    failures_before = Counter(judge.failure_reasons)
    scores: dict[int, list[float | None]] = {}
    if to_judge:
        judged = judge.score_batch([items[i].messages for i in to_judge], [distinct[i] for i in to_judge])
        scores = dict(zip(to_judge, judged, strict=True))
    summary.judge_failures = Counter(judge.failure_reasons) - failures_before
    rows, skipped = [], []
    for i, item in enumerate(items):
        item_scores = scores.get(i, [])
        scored = [(a, s) for a, s in zip(distinct[i], item_scores, strict=False) if s is not None]
        rng = random.Random(f"{seed}:{item.key}")  # str seeds hash stably, so a rerun picks the same partner
        if len(distinct[i]) >= 2 and len(scored) < 2:
            result: Choice | str = SKIP_JUDGE
        else:
            result = select_pair(scored, pairing, rng)
        if isinstance(result, Choice):
            rows.append(pair_row(item, result, provenance))
            summary.counts["pairs written"] += 1
        else:
            skipped.append(skipped_row(item, result, distinct[i], item_scores, provenance))
            summary.counts[result] += 1
    return rows, skipped, summary


def _assistant(text: str) -> list[Message]:
    return [{"role": "assistant", "content": text}]


def pair_row(item: PromptItem, choice: Choice, provenance: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "prompt": item.messages,
        "chosen": _assistant(choice.chosen),
        "rejected": _assistant(choice.rejected),
        "prompt_id": item.key,
    }
    if item.category:
        row["category"] = item.category
    row.update(score_chosen=choice.score_chosen, score_rejected=choice.score_rejected, margin=choice.margin)
    row.update(provenance)
    return row


def skipped_row(
    item: PromptItem, reason: str, answers: list[str], scores: list[float | None], provenance: dict[str, Any]
) -> dict[str, Any]:
    return {
        "prompt_id": item.key,
        "reason": reason,
        "prompt": item.messages,
        "answers": answers,
        "scores": scores,
        **provenance,
    }
