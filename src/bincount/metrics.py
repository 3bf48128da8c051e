"""Counting metrics from true and predicted counts, and calibration metrics from probabilities.

Counting is ordinal, so besides accuracy and balanced accuracy (the mean per-class recall, which a skewed
test set cannot flatter) the metrics say how far off a count is: MAE, RMSE and the share within one item.
Calibration says whether `probabilities` mean what they say: the negative log-likelihood and the expected
calibration error (how far the confidence of the predicted count is from its accuracy, over 10 bins).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

ECE_BINS = 10


def counting(truth: Sequence[int], predicted: Sequence[int], classes: Sequence[int]) -> dict:
    """All metrics from (true count, predicted count) pairs; per-class values for every class in `classes`."""
    n = len(truth)
    index = {c: i for i, c in enumerate(classes)}
    matrix = [[0] * len(classes) for _ in classes]
    for t, p in zip(truth, predicted):
        matrix[index[t]][index[p]] += 1
    per_class = {}
    for i, c in enumerate(classes):
        support = sum(matrix[i])
        predicted_as = sum(row[i] for row in matrix)
        precision = matrix[i][i] / predicted_as if predicted_as else 0.0
        recall = matrix[i][i] / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[str(c)] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    present = [v for v in per_class.values() if v["support"]]
    errors = [p - t for t, p in zip(truth, predicted)]
    return {
        "samples": n,
        "accuracy": sum(matrix[i][i] for i in range(len(classes))) / n,
        "balanced_accuracy": sum(v["recall"] for v in present) / len(present),
        "macro_f1": sum(v["f1"] for v in present) / len(present),
        "mae": sum(abs(e) for e in errors) / n,
        "rmse": math.sqrt(sum(e * e for e in errors) / n),
        "within_one_accuracy": sum(abs(e) <= 1 for e in errors) / n,
        "per_class": per_class,
        "confusion_matrix": matrix,
    }


def calibration(probabilities: torch.Tensor, targets: torch.Tensor) -> dict:
    """NLL and expected calibration error of class-index `targets` under `probabilities` [N, classes]."""
    targets = targets.long()
    nll = -probabilities.clamp_min(1e-12).log().gather(1, targets[:, None]).mean().item()
    confidence, predicted = probabilities.max(1)
    correct = (predicted == targets).float()
    ece = 0.0
    for i in range(ECE_BINS):
        chosen = (confidence > i / ECE_BINS) & (confidence <= (i + 1) / ECE_BINS)
        if chosen.any():
            ece += chosen.float().mean().item() * abs(confidence[chosen].mean().item() - correct[chosen].mean().item())
    return {"nll": nll, "ece": ece}
