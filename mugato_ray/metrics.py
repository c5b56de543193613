"""Evaluation statistics: bootstrap confidence intervals, expert-normalized scores and the IQM.

Pure numpy, no Ray: the evaluation job feeds it per-episode returns.
"""

from __future__ import annotations

import math

import numpy as np


def bootstrap_ci(values, samples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (1-D). One value gives a zero-width interval."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D array, got shape {x.shape}")
    if x.size == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    idx_SxN = rng.integers(0, x.size, size=(samples, x.size))
    means_S = x[idx_SxN].mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means_S, [tail, 1.0 - tail])
    return float(lo), float(hi)


def normalized_score(score: float, expert: float | None, random: float | None) -> float | None:
    """(score - random) / (expert - random): 1.0 is the expert, 0.0 a random policy. None without references."""
    if expert is None or random is None or not math.isfinite(expert) or not math.isfinite(random):
        return None
    if math.isclose(expert, random):
        return None  # no spread between references: the score is undefined, not infinite
    return (score - random) / (expert - random)


def iqm(values) -> float | None:
    """Interquartile mean: the mean of the middle 50% (Agarwal et al., 2021). None for no values.

    Uses the fractional-weight definition, so it is exact for sizes that are not multiples of 4.
    """
    x = np.sort(np.asarray([v for v in values if v is not None], dtype=np.float64))
    n = x.size
    if n == 0:
        return None
    lo, hi = 0.25 * n, 0.75 * n
    # Weight of each sorted element = overlap of [i, i+1) with [lo, hi).
    i = np.arange(n)
    w = np.clip(np.minimum(i + 1, hi) - np.maximum(i, lo), 0.0, 1.0)
    return float((w * x).sum() / w.sum())
