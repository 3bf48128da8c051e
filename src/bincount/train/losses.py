"""Losses for ordered counts with noisy labels.

`ce`: cross-entropy, with optional label smoothing. `ordinal`: cross-entropy against soft ordinal targets (SORD,
Díaz and Marathe, CVPR 2019): a bin labelled k puts weight exp(-scale·(j-k)²) on count j, so calling a 5 a 4
costs less than calling it a 1, and a label that is off by one (ABID's quantities are known to be noisy) is not
punished as a plain miss. Both keep one softmax over the counts, so probabilities, test-time augmentation and
temperature calibration work the same for either. Class weights reweight each sample by its true class.

`same_bin_ranking` adds a pairwise term over photos of one bin (see `train/sampling.py`): of two photos of a bin
the one labelled with more items must have the higher expected count. It compares counts where appearance is
held fixed, and asks only for the order, which a noisy label rarely reverses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

LOSSES = ("ce", "ordinal")


class CountLoss(nn.Module):
    def __init__(self, kind: str, classes: Sequence[int], label_smoothing: float = 0.0, ordinal_scale: float = 1.0,
                 weights: torch.Tensor | None = None):
        super().__init__()
        values = torch.tensor(list(classes), dtype=torch.float32)
        if kind == "ordinal":
            targets = (-ordinal_scale * (values[None, :] - values[:, None]) ** 2).softmax(1)
        else:
            targets = torch.eye(len(classes)) * (1 - label_smoothing) + label_smoothing / len(classes)
        self.register_buffer("targets", targets)            # row k: the target distribution of class k
        self.register_buffer("values", values)              # the count of each class
        self.register_buffer("weights", weights if weights is not None else torch.ones(len(classes)))

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        per_sample = -(self.targets[y] * logits.float().log_softmax(1)).sum(1)
        w = self.weights[y]
        return (per_sample * w).sum() / w.sum()


def same_bin_ranking(logits: torch.Tensor, y: torch.Tensor, bins: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Mean logistic loss of the expected-count difference over the batch's same-bin pairs of different counts
    (in counts: a pair one item apart costs 0.31 when the model has them one item apart, 0.69 when even)."""
    expected = logits.float().softmax(1) @ values
    count = values[y]
    pairs = (bins[:, None] == bins[None, :]) & (bins[:, None] >= 0) & (count[:, None] > count[None, :])
    if not pairs.any():
        return expected.sum() * 0
    return nn.functional.softplus(expected[None, :] - expected[:, None])[pairs].mean()
