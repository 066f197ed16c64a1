"""Position consistency and the length-controlled win rate on hand-made games whose answers we know."""

from __future__ import annotations

import math
import statistics

import pytest

from dpokit.judge_bias import (
    fit_length_model,
    length_controlled_win_rate,
    position_consistency,
    standardized_length_difference,
)
from dpokit.verdicts import Game, summarize_games


def test_position_consistency_counts_agreeing_orders() -> None:
    pairs = [("model_2", "model_2"), ("tie", "tie"), ("model_1", "model_2"), ("model_2", "tie")]
    assert position_consistency(pairs) == 0.5  # two of four agree
    assert position_consistency([]) is None


def test_no_length_effect_gives_the_plain_rate() -> None:
    """At every length difference B wins 3 of 4 games: the fit finds no slope, and the rate is the plain 0.75."""
    differences, scores = [], []
    for d in (-200, -50, 30, 120, 400):
        differences += [d] * 4
        scores += [1.0, 1.0, 1.0, 0.0]
    assert length_controlled_win_rate(scores, differences) == pytest.approx(0.75, abs=1e-5)
    _, phi = fit_length_model(scores, differences)
    assert phi == pytest.approx(0.0, abs=1e-4)


def test_a_pure_length_effect_gives_about_one_half() -> None:
    """B is longer in three games of four, and its chance to win depends only on the length difference, the same
    on either side of zero: sigmoid(2 * tanh(d / std)). The plain rate rewards B's length; the controlled one is
    about 0.5. Counts per length are rounded from 1000 games, so the fit sees the model almost exactly."""
    values = [(-300, 1000), (-100, 1000), (100, 3000), (300, 3000)]  # (difference, games)
    all_differences = [d for d, n in values for _ in range(n)]
    spread = statistics.pstdev(all_differences)
    differences, scores = [], []
    for d, n in values:
        wins = round(n / (1 + math.exp(-2 * math.tanh(d / spread))))
        differences += [d] * n
        scores += [1.0] * wins + [0.0] * (n - wins)
    plain = sum(scores) / len(scores)
    controlled = length_controlled_win_rate(scores, differences)
    assert plain > 0.6
    assert controlled == pytest.approx(0.5, abs=0.01)
    theta, phi = fit_length_model(scores, differences)
    assert phi == pytest.approx(2.0, abs=0.1)


def test_ties_count_half_and_edge_cases() -> None:
    assert length_controlled_win_rate([0.5, 0.5, 0.5], [10, -10, 3]) == pytest.approx(0.5, abs=1e-6)
    assert length_controlled_win_rate([1.0, 1.0], [5, -5]) == 1.0  # no fit exists; every game was won
    assert length_controlled_win_rate([], []) is None
    assert standardized_length_difference([7, 7, 7]) == [0.0, 0.0, 0.0]  # the lengths tell nothing apart
    with pytest.raises(ValueError):
        length_controlled_win_rate([1.0], [])


def test_summary_reports_both_beside_the_plain_rate() -> None:
    """A judge that always prefers the longer answer, with B longer in 3 games of 4 (one question each)."""
    games = []
    for i, d in enumerate([40, 80, 120, -60] * 5):
        winner = "model_2" if d > 0 else "model_1"
        games.append(Game(i, 1, winner, winner, None, 100, 100 + d))
    games.append(Game(99, 1, "model_1", "model_2", None, 100, 100))  # position bias: a tie, the orders disagree
    games.append(Game(98, 1, "error", "model_2", None, 100, 100))  # a failure, out of both numbers
    summary = summarize_games(games)
    assert summary["win_rate"] == pytest.approx(15 / 21)
    assert summary["position_consistency"] == pytest.approx(20 / 21)
    assert summary["win_rate_length_controlled"] < summary["win_rate_adjusted"] - 0.05
