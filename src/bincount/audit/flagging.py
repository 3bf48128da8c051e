"""Which bins a team should check, and how many wrong quantities those bins are expected to hold.

`p_mismatch = 1 − P(count = expected)` is the model's doubt about the count, not the probability that the
record is wrong: where the model is unsure (on real photos it names the right count about half the time),
p_mismatch is high for most bins although most records are right, and a fixed threshold flags nearly all of them.
The probability that a record is wrong also weighs how often records are wrong, the error rate π. By Bayes, with
the photo's likelihood under each count proportional to the model's probability of it (the model is trained on
balanced classes) and a wrong record's true count equally likely to be any other count:

    odds(wrong) = π / (1 − π) · (p_mismatch / (K − 1)) / (1 − p_mismatch)

π is given (`--error-rate`, e.g. from the last cycle count) or estimated from the audit itself by maximum
likelihood: a bin is (1 − π)(1 − m) + π · m / (K − 1) likely, and a fine histogram of p_mismatch is all the
estimate needs, so it streams like the rest of the report. p_wrong rises with p_mismatch: the ranking (and its
AUROC and precision@k) is p_mismatch's; what changes is how many bins to flag and what they are expected to hold.

Policies: `review` N flags the N bins most likely wrong (what a team can check in a shift); `precision` P flags
the most likely ones, as many as keep the flagged bins' expected precision (their mean p_wrong) at P or above;
`threshold` T flags p_mismatch ≥ T.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

FINE_BINS = 2000                # resolution of the p_mismatch histogram the estimate and the cut are read from
EM_ROUNDS = 2000
EM_TOLERANCE = 1e-9
ERROR_RATE_RANGE = (1e-4, 0.95)


@dataclass(frozen=True)
class Policy:
    review: int = 0             # >0: flag this many bins, the most likely wrong
    precision: float = 0.0      # >0: flag as many as keep the expected precision at this or above
    threshold: float = 0.0      # >0: flag p_mismatch ≥ this

    @classmethod
    def choose(cls, review: int, threshold: float, target_precision: float) -> "Policy":
        """A review budget if one is given, else a threshold if one is given, else the precision target."""
        if review:
            return cls(review=review)
        return cls(threshold=threshold) if threshold else cls(precision=target_precision)

    def describe(self) -> str:
        if self.review:
            return f"the {self.review} bins most likely wrong"
        if self.threshold:
            return f"p_mismatch ≥ {self.threshold}"
        return f"expected precision ≥ {100 * self.precision:g} %"


def p_wrong(p_mismatch: float, error_rate: float, classes: int) -> float:
    """The probability that the expected quantity is wrong, given the model's p_mismatch and the error rate."""
    if p_mismatch >= 1.0:
        return 1.0 if error_rate > 0 else 0.0
    wrong = error_rate * p_mismatch / (classes - 1)
    right = (1 - error_rate) * (1 - p_mismatch)
    return wrong / (wrong + right) if wrong + right > 0 else 0.0


class Histogram:
    """p_mismatch in FINE_BINS equal bins, each with its count and the sum of its values: the estimate and the cut
    read each bin at its own mean, exact for tied values, and memory does not grow with the bins audited."""

    def __init__(self, bins: int = FINE_BINS):
        self.counts = [0] * bins
        self.sums = [0.0] * bins

    def add(self, p_mismatch: float) -> None:
        i = min(int(p_mismatch * len(self.counts)), len(self.counts) - 1)
        self.counts[i] += 1
        self.sums[i] += p_mismatch

    def points(self, start: int = 0) -> list[tuple[int, int, float]]:
        """(bin, count, mean p_mismatch) of the non-empty bins from `start` up."""
        return [(i, n, self.sums[i] / n) for i, n in enumerate(self.counts) if n and i >= start]


def estimate_error_rate(histogram: Histogram, classes: int) -> float:
    """Maximum-likelihood π (EM on the two-component mixture): each bin is (1 − π)(1 − m) + π · m / (K − 1) likely."""
    points = [(n, 1 - m, m / (classes - 1)) for _, n, m in histogram.points()]
    total = sum(n for n, _, _ in points)
    if not total:
        return 0.0
    rate = 0.1
    for _ in range(EM_ROUNDS):
        updated = sum(n * rate * b / ((1 - rate) * a + rate * b) for n, a, b in points) / total
        updated = min(max(updated, ERROR_RATE_RANGE[0]), ERROR_RATE_RANGE[1])
        if abs(updated - rate) < EM_TOLERANCE:
            return updated
        rate = updated
    return rate


@dataclass
class Flags:
    """The flagged bins' count, the p_mismatch from which bins are flagged, and their expected wrong quantities."""

    count: int
    from_p_mismatch: float | None
    expected_wrong: float

    @property
    def precision(self) -> float | None:
        return self.expected_wrong / self.count if self.count else None


def flags(histogram: Histogram, ranked: Sequence[float], policy: Policy, error_rate: float, classes: int) -> Flags:
    """`ranked`: the highest p_mismatch values, highest first, at least `policy.review` of them where there are.
    A review budget is exact over them; a threshold or precision target is read off the histogram, whose bins are
    flagged whole (a precision target takes bins from the top while the flagged bins' mean p_wrong holds)."""
    if policy.review:
        chosen = ranked[:policy.review]
        return Flags(len(chosen), chosen[-1] if chosen else None,
                     sum(p_wrong(m, error_rate, classes) for m in chosen))
    bins = len(histogram.counts)
    if policy.threshold:
        start = min(int(policy.threshold * bins), bins - 1)
    else:
        flagged, expected, start = 0, 0.0, bins
        for i, n, m in reversed(histogram.points()):
            more = n * p_wrong(m, error_rate, classes)
            if (expected + more) / (flagged + n) < policy.precision:
                break
            flagged, expected, start = flagged + n, expected + more, i
    chosen_bins = histogram.points(start)
    return Flags(sum(n for _, n, _ in chosen_bins), start / bins if chosen_bins else None,
                 sum(n * p_wrong(m, error_rate, classes) for _, n, m in chosen_bins))
