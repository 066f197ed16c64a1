"""How much a pairwise judge's verdicts follow the answers' position and length rather than their quality.

- Position consistency (Zheng et al. 2023, https://arxiv.org/abs/2306.05685, section 3.3): the share of games, among
  those with a verdict in both orders, where the two orders agree (both name the same model, or both say tie).
- Length-controlled win rate, after AlpacaEval 2 (Dubois et al. 2024, https://arxiv.org/abs/2404.04475): a logistic
  fit of model B's game score (1 win, 0.5 tie, 0 loss) on the standardized length difference,
  P(B wins) = sigmoid(theta + phi * tanh((len_B - len_A) / std(len_B - len_A))), read at zero length difference:
  sigmoid(theta). The tanh bounds the pull of a few very long answers, as in AlpacaEval. A weak Gaussian prior on
  phi (`LENGTH_PRIOR_STD`) keeps the fit finite when length alone decides every game; theta is not penalized.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch

LENGTH_PRIOR_STD = 5.0  # prior standard deviation of phi: a length effect up to sigmoid(+-5 * tanh(1)) is left alone


def position_consistency(verdict_pairs: Sequence[tuple[str, str]]) -> float | None:
    """Share of (g1_winner, g2_winner) pairs that agree, both already mapped to model names; None when empty."""
    if not verdict_pairs:
        return None
    return sum(g1 == g2 for g1, g2 in verdict_pairs) / len(verdict_pairs)


def standardized_length_difference(length_differences: Sequence[float]) -> list[float]:
    """tanh(d / std(d)) of each length difference d; all 0 when the lengths never differ by a varying amount."""
    spread = statistics.pstdev(length_differences) if len(length_differences) > 1 else 0.0
    if spread == 0:
        return [0.0 for _ in length_differences]
    return [math.tanh(d / spread) for d in length_differences]


def fit_length_model(scores: Sequence[float], length_differences: Sequence[float]) -> tuple[float, float]:
    """(theta, phi) of the logistic fit above, by L-BFGS on the penalized log-likelihood in float64."""
    y = torch.tensor(scores, dtype=torch.float64)  # (N,) in [0, 1]
    z = torch.tensor(standardized_length_difference(length_differences), dtype=torch.float64)  # (N,)
    params = torch.zeros(2, dtype=torch.float64, requires_grad=True)  # theta, phi
    optimizer = torch.optim.LBFGS([params], lr=1.0, max_iter=200, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        logits = params[0] + params[1] * z
        nll = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
        value = nll + 0.5 * (params[1] / LENGTH_PRIOR_STD) ** 2
        value.backward()
        return value

    optimizer.step(loss)
    theta, phi = params.detach().tolist()
    return theta, phi


def length_controlled_win_rate(scores: Sequence[float], length_differences: Sequence[float]) -> float | None:
    """Model B's win rate at zero length difference (see the module docstring); None without games. When every game
    has the same score no logistic fit exists, and that score is the answer."""
    if len(scores) != len(length_differences):
        raise ValueError(f"{len(scores)} scores but {len(length_differences)} length differences")
    if not scores:
        return None
    if len(set(scores)) == 1 and scores[0] in (0.0, 1.0):
        return float(scores[0])
    theta, _ = fit_length_model(scores, length_differences)
    return 1.0 / (1.0 + math.exp(-theta))
