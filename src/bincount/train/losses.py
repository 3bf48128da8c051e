"""Losses for ordered counts with noisy labels.

`ce`: cross-entropy, with optional label smoothing. `ordinal`: cross-entropy against soft ordinal targets (SORD,
Díaz and Marathe, CVPR 2019): a bin labelled k puts weight exp(-scale·(j-k)²) on count j, so calling a 5 a 4
costs less than calling it a 1, and a label that is off by one (ABID's quantities are known to be noisy) is not
punished as a plain miss. `corn`: CORN's loss (with `head: corn`, the CORN method): for each k, among the bins
with at least k items, a binary cross-entropy of "more than k" on the conditional probability the head gives it;
computed from the K log-probabilities, so it takes any head. All keep one distribution over the counts, so
probabilities, test-time augmentation and temperature calibration work the same for each. Class weights reweight
each sample by its true class.

`same_bin_ranking` adds a pairwise term over photos of one bin (see `train/sampling.py`): of two photos of a bin
the one labelled with more items must have the higher expected count. It compares counts where appearance is
held fixed, and asks only for the order, which a noisy label rarely reverses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

LOSSES = ("ce", "ordinal", "corn")


class CountLoss(nn.Module):
    def __init__(self, kind: str, classes: Sequence[int], label_smoothing: float = 0.0, ordinal_scale: float = 1.0,
                 weights: torch.Tensor | None = None):
        super().__init__()
        self.kind = kind
        values = torch.tensor(list(classes), dtype=torch.float32)
        if kind == "ordinal":
            targets = (-ordinal_scale * (values[None, :] - values[:, None]) ** 2).softmax(1)
        else:
            targets = torch.eye(len(classes)) * (1 - label_smoothing) + label_smoothing / len(classes)
        self.register_buffer("targets", targets)            # row k: the target distribution of class k
        self.register_buffer("values", values)              # the count of each class
        self.register_buffer("weights", weights if weights is not None else torch.ones(len(classes)))

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "corn":
            return corn(logits, y, self.weights)
        per_sample = -(self.targets[y] * logits.float().log_softmax(1)).sum(1)
        w = self.weights[y]
        return (per_sample * w).sum() / w.sum()


def corn(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """CORN's conditional binary tasks from log-probabilities: task k (k = 0 … K − 2) sees the bins whose class
    is k or above and asks whether it is above k, with P(> k | ≥ k) = P(≥ k + 1) / P(≥ k)."""
    log_p = logits.float().log_softmax(1)
    at_least = torch.logcumsumexp(log_p.flip(1), 1).flip(1)                # log P(class ≥ k)
    more = (at_least[:, 1:] - at_least[:, :-1]).clamp(max=0)                 # log P(> k | ≥ k)
    less = torch.where(more > -0.6931, torch.log(-torch.expm1(more)), torch.log1p(-torch.exp(more)))
    tasks = torch.arange(log_p.shape[1] - 1, device=y.device)
    above = (y[:, None] > tasks).float()
    seen = (y[:, None] >= tasks).float() * weights[y][:, None]
    nll = -(above * more + (1 - above) * less.clamp(min=-100))
    return (nll * seen).sum() / seen.sum()


def same_bin_ranking(logits: torch.Tensor, y: torch.Tensor, bins: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Mean logistic loss of the expected-count difference over the batch's same-bin pairs of different counts
    (in counts: a pair one item apart costs 0.31 when the model has them one item apart, 0.69 when even)."""
    expected = logits.float().softmax(1) @ values
    count = values[y]
    pairs = (bins[:, None] == bins[None, :]) & (bins[:, None] >= 0) & (count[:, None] > count[None, :])
    if not pairs.any():
        return expected.sum() * 0
    return nn.functional.softplus(expected[None, :] - expected[:, None])[pairs].mean()
