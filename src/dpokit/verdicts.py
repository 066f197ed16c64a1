"""Verdicts of a pairwise comparison: each (question, turn) judged twice with the answers' order swapped.

Model B wins only when both orders say so, likewise A; any other pair of verdicts is a tie (MT-Bench's rule). A
judge that gives no verdict in one order or both makes a *failure*: counted apart and left out of wins, ties, losses
and every rate, as MT-Bench's `show_result.py` drops "error" judgments, so a flaky judge cannot pose as a tie.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dpokit.data import Message
from dpokit.errors import UserError
from dpokit.questions import Question
from dpokit.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, bootstrap_mean_interval

MODEL_1, MODEL_2, TIE, ERROR = "model_1", "model_2", "tie", "error"  # MT-Bench's g1/g2_winner values
OUTCOMES = ("win", "tie", "loss", "failure")  # of model B (model_2) against model A (model_1)
SECOND_TURN_PROMPT = (
    "This conversation has {n} user turns. Judge the answer to the last one, given the earlier answers.\n\n{turns}"
)


@dataclass(frozen=True)
class Game:
    """One judged (question, turn): the verdicts of both orders as MT-Bench writes them."""

    question_id: int | str
    turn: int  # 1-based
    g1_winner: str  # answers shown as (A, B): model_1 | model_2 | tie | error
    g2_winner: str  # answers shown as (B, A), already mapped back to model names
    category: str | None = None
    length_1: int | None = None  # characters of the judged answers (this turn's), for the length-controlled rate
    length_2: int | None = None

    @property
    def outcome(self) -> str:
        """win / tie / loss of model_2, or failure when the judge gave no verdict in one order or both."""
        if ERROR in (self.g1_winner, self.g2_winner):
            return "failure"
        if self.g1_winner == self.g2_winner == MODEL_2:
            return "win"
        if self.g1_winner == self.g2_winner == MODEL_1:
            return "loss"
        return "tie"  # both said tie, or the orders disagree (position bias)

    @property
    def score(self) -> float:
        return {"win": 1.0, "tie": 0.5, "loss": 0.0}[self.outcome]


def mapped_verdict(verdict: str | None, first: str, second: str, judge_spec: str) -> str:
    """A judge's "A" / "B" / "tie" / None in presentation order -> the model it names (MT-Bench's g*_winner)."""
    mapping = {"A": first, "B": second, "tie": TIE, None: ERROR}
    if verdict not in mapping:
        raise UserError(f"judge {judge_spec} answered {verdict!r}; a verdict must be 'A', 'B', 'tie' or None")
    return mapping[verdict]


def judge_both_orders(judge: Any, prompt: list[Message], answer_1: str, answer_2: str) -> tuple[str, str]:
    """(g1_winner, g2_winner): model_1's answer shown first, then model_2's first."""
    g1 = mapped_verdict(judge.compare(prompt, answer_1, answer_2), MODEL_1, MODEL_2, judge.spec)
    g2 = mapped_verdict(judge.compare(prompt, answer_2, answer_1), MODEL_2, MODEL_1, judge.spec)
    return g1, g2


def summarize_games(
    games: Sequence[Game],
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Wins, ties, losses of model_2, MT-Bench's rates, and a bootstrap interval of the adjusted rate.

    `win_rate` = wins / total and `win_rate_adjusted` = (wins + ties / 2) / total, total = wins + ties + losses;
    failures count apart. The interval resamples questions (both turns of one question together). Beside them, the
    judge's position consistency and the length-controlled rate (`dpokit.judge_bias`), from the games that know
    their answers' lengths.
    """
    from dpokit.judge_bias import length_controlled_win_rate, position_consistency

    counted = [g for g in games if g.outcome != "failure"]
    measured = [g for g in counted if g.length_1 is not None and g.length_2 is not None]
    counts = {o: sum(g.outcome == o for g in games) for o in OUTCOMES}
    total = len(counted)
    summary: dict[str, Any] = {
        "wins": counts["win"],
        "ties": counts["tie"],
        "losses": counts["loss"],
        "judge_failures": counts["failure"],
        "total": total,
        "win_rate": counts["win"] / total if total else None,
        "win_rate_adjusted": (counts["win"] + counts["tie"] / 2) / total if total else None,
        "ci_low": None,
        "ci_high": None,
        "confidence": confidence,
        "position_consistency": position_consistency([(g.g1_winner, g.g2_winner) for g in counted]),
        "win_rate_length_controlled": length_controlled_win_rate(
            [g.score for g in measured], [g.length_2 - g.length_1 for g in measured]
        ),
    }
    if total:
        summary["ci_low"], summary["ci_high"] = bootstrap_mean_interval(
            [g.score for g in counted],
            [g.question_id for g in counted],
            confidence=confidence,
            n_resamples=n_resamples,
            seed=seed,
        )
    return summary


def summarize_by_category(games: Sequence[Game], seed: int = 0) -> dict[str, dict[str, Any]]:
    """`summarize_games` per category, for the games whose question has one."""
    categories = sorted({g.category for g in games if g.category is not None})
    return {c: summarize_games([g for g in games if g.category == c], seed=seed) for c in categories}


def judged_exchange(
    question: Question, turn: int, answers_1: Sequence[str], answers_2: Sequence[str]
) -> tuple[list[Message], str, str]:
    """(prompt, answer_1, answer_2) shown to the judge for turn `turn` (1-based).

    The first turn is the question and the two answers. For a later turn the two conversations differ before it
    (each holds its own model's earlier answers), so, as MT-Bench's multi-turn judge does, the judge sees every
    question and each side's whole conversation, and is asked about the last answer.
    """
    if turn == 1:
        return [*question.context, {"role": "user", "content": question.turns[0]}], answers_1[0], answers_2[0]
    questions = "\n\n".join(f"Question {i}: {t}" for i, t in enumerate(question.turns[:turn], 1))
    prompt = [*question.context, {"role": "user", "content": SECOND_TURN_PROMPT.format(n=turn, turns=questions)}]

    def conversation(answers: Sequence[str]) -> str:
        return "\n\n".join(f"Answer {i}: {a}" for i, a in enumerate(answers[:turn], 1))

    return prompt, conversation(answers_1), conversation(answers_2)


def print_comparison(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    a, b = summary["model_a"]["model_id"], summary["model_b"]["model_id"]
    table = Table(title=f"{b} (B) against {a} (A), judged by {summary['judge']}")
    for column in ("", "wins", "ties", "losses", "failures", "win rate", "adjusted", "95% CI"):
        table.add_column(column, justify="right" if column else "left")
    rows = [("all", summary)] + list(summary["per_category"].items())
    for name, s in rows:
        table.add_row(
            name,
            str(s["wins"]),
            str(s["ties"]),
            str(s["losses"]),
            str(s["judge_failures"]),
            _percent(s["win_rate"]),
            _percent(s["win_rate_adjusted"]),
            f"{_percent(s['ci_low'])} - {_percent(s['ci_high'])}",
        )
    console = Console()
    console.print(table)
    console.print(
        f"mean answer length: A {summary['mean_length_a']:.0f}, B {summary['mean_length_b']:.0f} characters; "
        f"length-controlled win rate {_percent(summary['win_rate_length_controlled'])}; judge position "
        f"consistency {_percent(summary['position_consistency'])} (both orders agree)",
        markup=False,
    )
    reasons = summary.get("judge_failure_reasons") or {}
    if reasons:
        shown = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
        console.print(f"judge gave no verdict {sum(reasons.values())} times: {shown}", markup=False)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
