"""Training batches that hold a bin's photos together, for the same-bin ranking loss.

ABID photographs a bin again after each pick or stow, so the training split holds pairs of photos of one bin,
with the same products in the same place and known, different counts. Compared within such a pair, only the
count differs: the one signal that appearance cannot explain. A shuffled sampler almost never puts both
photos in one batch (~batch/N of pairs); this one shuffles whole bins and keeps their photos adjacent.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from bincount.data.dataset import Item


def bin_ids(items: Sequence[Item]) -> list[int]:
    """A small integer per bin of several photos in the split, -1 for a photo alone."""
    sizes: dict[str, int] = {}
    for item in items:
        if item.bin:
            sizes[item.bin] = sizes.get(item.bin, 0) + 1
    numbers = {b: i for i, b in enumerate(sorted(b for b, n in sizes.items() if n > 1))}
    return [numbers.get(item.bin, -1) for item in items]


class SameBinSampler(Sampler[int]):
    """DistributedSampler's contract (each rank ceil(n / world) indices a epoch, a function of seed and epoch,
    padded by wrapping), but shuffling bins, not photos: a bin's photos follow each other, in shuffled order."""

    def __init__(self, bins: Sequence[int], num_replicas: int, rank: int, seed: int):
        self.units: list[list[int]] = []
        members: dict[int, list[int]] = {}
        for i, b in enumerate(bins):
            if b < 0:
                self.units.append([i])
            else:
                members.setdefault(b, [])
                if not members[b]:
                    self.units.append(members[b])
                members[b].append(i)
        self.n, self.world, self.rank, self.seed, self.epoch = len(bins), num_replicas, rank, seed, 0
        self.num_samples = -(-self.n // num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = []
        for u in torch.randperm(len(self.units), generator=g).tolist():
            unit = self.units[u]
            order.extend(unit[j] for j in torch.randperm(len(unit), generator=g).tolist())
        total = self.num_samples * self.world
        order = (order * -(-total // len(order)))[:total] if order else []
        return iter(order[self.rank * self.num_samples:(self.rank + 1) * self.num_samples])


class WithBins(Dataset):
    """(input, class index, bin id) triples: the bin id tells the loss which photos of a batch to compare."""

    def __init__(self, images: Dataset, bins: Sequence[int]):
        self.images, self.bins = images, list(bins)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image, target = self.images[i]
        return image, target, self.bins[i]
