"""Which bins the audit flags: p_wrong by Bayes from p_mismatch and the error rate, the error rate estimated from
the audit itself, and the review-budget, precision-target and threshold policies."""

from __future__ import annotations

import random

import pytest

from bincount.audit.flagging import Histogram, Policy, estimate_error_rate, flags, p_wrong

K = 5


def _audit(rate: float, n: int, seed: int = 0) -> tuple[list[float], list[bool]]:
    """Bins of a calibrated model: it names a count with confidence c (uniform in 0.3-0.95), right with probability
    c, the others (1 - c) / 4 each; a `rate` share of records carries a wrong expected quantity, any other count
    alike. Returns p_mismatch and whether the record is wrong."""
    rng = random.Random(seed)
    mismatch, wrong = [], []
    for _ in range(n):
        true, confidence = rng.randrange(K), rng.uniform(0.3, 0.95)
        guess = true if rng.random() < confidence else rng.choice([c for c in range(K) if c != true])
        probabilities = [confidence if c == guess else (1 - confidence) / (K - 1) for c in range(K)]
        bad = rng.random() < rate
        expected = rng.choice([c for c in range(K) if c != true]) if bad else true
        mismatch.append(1 - probabilities[expected])
        wrong.append(bad)
    return mismatch, wrong


def _fine(values: list[float]) -> Histogram:
    histogram = Histogram()
    for m in values:
        histogram.add(m)
    return histogram


def test_p_wrong_is_bayes_with_the_error_rate_as_prior():
    probabilities = [0.05, 0.1, 0.6, 0.2, 0.05]
    expected, rate = 2, 0.1
    right = (1 - rate) * probabilities[expected]
    other = rate * sum(p for c, p in enumerate(probabilities) if c != expected) / (K - 1)
    assert p_wrong(1 - probabilities[expected], rate, K) == pytest.approx(other / (other + right))
    # the model's doubt alone is no verdict: a record that is rarely wrong stays likely right at p_mismatch 0.8
    assert p_wrong(0.8, 0.02, K) < 0.03 and p_wrong(0.8, 0.5, K) == pytest.approx(0.5)
    assert p_wrong(1.0, 0.1, K) == 1.0 and p_wrong(0.0, 0.1, K) == 0.0


@pytest.mark.parametrize("rate", [0.05, 0.2])
def test_the_error_rate_is_estimated_from_the_audit_and_the_flags_keep_their_precision(rate):
    mismatch, wrong = _audit(rate, 20_000)
    fine = _fine(mismatch)
    estimate = estimate_error_rate(fine, K)
    assert estimate == pytest.approx(rate, abs=0.015)
    ranked = sorted(mismatch, reverse=True)

    target = flags(fine, ranked, Policy(precision=0.3), estimate, K)
    chosen = [w for m, w in zip(mismatch, wrong) if m >= target.from_p_mismatch]
    assert target.count == len(chosen) > 20 and target.precision >= 0.3
    assert sum(chosen) / len(chosen) == pytest.approx(target.precision, abs=0.05)        # as expected, so it is
    assert target.expected_wrong == pytest.approx(sum(chosen), rel=0.15)

    review = flags(fine, ranked, Policy(review=100), estimate, K)
    assert review.count == 100 and review.from_p_mismatch == ranked[99]
    assert review.expected_wrong == pytest.approx(sum(p_wrong(m, estimate, K) for m in ranked[:100]))

    threshold = flags(fine, ranked, Policy(threshold=0.5), estimate, K)
    assert threshold.count == sum(m >= 0.5 for m in mismatch)


def test_the_precision_target_flags_as_many_as_keep_it_and_no_more():
    mismatch = [0.999] * 10 + [0.98] * 40 + [0.4] * 950
    fine, rate = _fine(mismatch), 0.1
    top, middle, low = (p_wrong(m, rate, K) for m in (0.999, 0.98, 0.4))
    assert (10 * top + 40 * middle) / 50 >= 0.5 > (10 * top + 40 * middle + 950 * low) / 1000
    chosen = flags(fine, sorted(mismatch, reverse=True), Policy(precision=0.5), rate, K)
    assert chosen.count == 50 and chosen.precision == pytest.approx((10 * top + 40 * middle) / 50, rel=1e-3)
    assert flags(fine, [], Policy(precision=0.99), rate, K).count == 0         # none that sure: none flagged
