"""Bootstrap confidence intervals for rates measured on a few dozen judged prompts.

A win rate from 80 MT-Bench questions moves by several points from one sample of questions to the next, so every
rate dpokit reports comes with a percentile-bootstrap interval. Resampling is by cluster (a question with its
two turns is one cluster), because the turns of one question are not independent draws.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95


def bootstrap_mean_interval(
    values: Sequence[float],
    clusters: Sequence[Hashable] | None = None,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values`, resampling whole clusters with replacement.

    Without `clusters` every value is its own cluster (the plain bootstrap). Each resample draws as many
    clusters as there are and takes the mean over all values they hold, so a question with two turns weighs
    twice, as in the point estimate. The same `seed` gives the same interval.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("no values to bootstrap")
    keys = list(range(data.size)) if clusters is None else list(clusters)
    if len(keys) != data.size:
        raise ValueError(f"{len(keys)} cluster labels for {data.size} values")
    index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    cluster_of = np.array([index[k] for k in keys])
    sums = np.bincount(cluster_of, weights=data)  # (C,) total of each cluster
    counts = np.bincount(cluster_of).astype(np.float64)  # (C,) values in each cluster
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, sums.size, size=(n_resamples, sums.size))  # (R, C) clusters drawn per resample
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)  # (R,)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)
