"""The statistics of the rollout: paired differences between two models with bootstrap intervals, McNemar's
exact test, and the population stability index of the drift report with the level sampling alone reaches.

The bootstrap resamples clusters, not photos: ABID photographs a bin before and after a pick, and two photos of
one bin are not two independent observations. Each resample draws clusters with replacement; its totals are the
clusters' totals weighted by how often each was drawn, one matrix product for all resamples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

PSI_FLOOR = 1e-4                                # share given to an empty bin, so a new bin costs ln(share / floor)


@dataclass(frozen=True)
class Difference:
    """challenger − champion of one metric: the point estimate and a percentile bootstrap interval."""

    metric: str
    champion: float
    challenger: float
    low: float
    high: float

    @property
    def delta(self) -> float:
        return self.challenger - self.champion


def paired_differences(truth: Sequence[int], champion: Sequence[int], challenger: Sequence[int],
                       clusters: Sequence[str], classes: Sequence[int], confidence: float, resamples: int,
                       seed: int) -> list[Difference]:
    """Accuracy, balanced accuracy and MAE of both models' counts of the same photos, and the interval of each
    difference. Balanced accuracy is the mean recall over the classes a resample holds."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    if resamples < 100:
        raise ValueError(f"bootstrap needs at least 100 resamples, got {resamples}")
    y, a, b = (np.asarray(v) for v in (truth, champion, challenger))
    names = {c: i for i, c in enumerate(dict.fromkeys(clusters))}
    group = np.array([names[c] for c in clusters])
    onehot = (y[:, None] == np.asarray(classes)[None, :]).astype(float)
    # per photo: n, right(a), right(b), |err|(a), |err|(b), then per class: n, right(a), right(b)
    columns = [np.ones(len(y)), (a == y), (b == y), abs(a - y), abs(b - y)]
    columns += [onehot[:, k] * w for k in range(len(classes)) for w in (1, a == y, b == y)]
    per_photo = np.stack(columns, 1).astype(float)
    per_cluster = np.zeros((len(names), per_photo.shape[1]))
    np.add.at(per_cluster, group, per_photo)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(names), np.full(len(names), 1 / len(names)), size=resamples)
    totals = np.vstack([per_cluster.sum(0, keepdims=True), draws @ per_cluster])
    metrics = _metrics(totals, len(classes))
    tail = (1 - confidence) / 2 * 100
    out = []
    for name, (first, second) in metrics.items():
        deltas = second[1:] - first[1:]
        low, high = np.percentile(deltas, [tail, 100 - tail])
        out.append(Difference(name, float(first[0]), float(second[0]), float(low), float(high)))
    return out


def _metrics(totals: np.ndarray, n_classes: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    n = totals[:, 0]
    per_class = totals[:, 5:].reshape(len(totals), n_classes, 3)
    present = per_class[:, :, 0] > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = per_class[:, :, 1:] / per_class[:, :, :1]
    recall = np.where(present[:, :, None], recall, 0.0)
    balanced = recall.sum(1) / present.sum(1, keepdims=True)
    return {"accuracy": (totals[:, 1] / n, totals[:, 2] / n),
            "balanced_accuracy": (balanced[:, 0], balanced[:, 1]),
            "mae": (totals[:, 3] / n, totals[:, 4] / n)}


@dataclass(frozen=True)
class McNemar:
    """Photos only the champion counted right, only the challenger did, and the exact two-sided p-value of
    their difference (a binomial test on the discordant photos)."""

    champion_only: int
    challenger_only: int
    both: int
    neither: int

    @property
    def p_value(self) -> float:
        n, k = self.champion_only + self.challenger_only, min(self.champion_only, self.challenger_only)
        if n == 0:
            return 1.0
        tail = sum(math.exp(_log_comb(n, i) - n * math.log(2)) for i in range(k + 1))
        return min(1.0, 2 * tail)


def mcnemar(truth: Sequence[int], champion: Sequence[int], challenger: Sequence[int]) -> McNemar:
    pairs = [(bool(a == t), bool(b == t)) for t, a, b in zip(truth, champion, challenger)]
    return McNemar(*(sum(pair == wanted for pair in pairs)
                     for wanted in ((True, False), (False, True), (True, True), (False, False))))


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def quantile_edges(reference: Sequence[float], bins: int) -> np.ndarray:
    """Edges of a continuous feature's bins: the reference's minimum, its inner quantiles and its maximum, once
    each. `binned` puts values below the minimum and above the maximum in bins of their own, so a shift out of
    the reference's range is seen even where the reference is one value."""
    values = np.asarray(reference, dtype=float)
    inner = np.quantile(values, np.linspace(0, 1, bins + 1)) if len(values) else np.empty(0)
    return np.unique(inner)


def binned(values: Sequence[float], edges: np.ndarray) -> np.ndarray:
    """Counts per bin: below the first edge, [e0, e1], (e1, e2], …, (e_k-1, e_k], above the last edge (with one
    edge the inner bin is that one value)."""
    x = np.asarray(values, dtype=float)
    inner = max(1, len(edges) - 1)
    index = np.maximum(1, np.searchsorted(edges, x, side="left"))
    index[x < edges[0]] = 0
    index[x > edges[-1]] = inner + 1
    return np.bincount(index, minlength=inner + 2)


def psi(reference_counts: Sequence[float], current_counts: Sequence[float]) -> float:
    """Population stability index Σ (q − p) ln(q / p) over bins, shares floored at `PSI_FLOOR`."""
    p = np.maximum(np.asarray(reference_counts, float) / max(1, sum(reference_counts)), PSI_FLOOR)
    q = np.maximum(np.asarray(current_counts, float) / max(1, sum(current_counts)), PSI_FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


def psi_noise(bins: int, current: int, reference: int, significance: float) -> float:
    """The PSI that two samples of one distribution exceed with probability `significance`. To second order the PSI
    is Pearson's statistic over (1/current + 1/reference), so it is a χ² with bins − 1 degrees of freedom scaled by
    that sum; the quantile is Wilson and Hilferty's. With a hundred values in ten bins it is about 0.3: a PSI
    threshold of 0.25 alone would call sampling drift."""
    k = max(1, bins - 1)
    z = NormalDist().inv_cdf(1 - significance)
    quantile = k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3
    return quantile * (1 / current + 1 / reference)
