"""Frozen-backbone fast path: backbone features computed once per image, kept in the store, heads trained on them.

With `freeze: backbone` every epoch of the slow path recomputes the same backbone forward for every image.
Here it runs once per (dataset split, architecture, starting weights, input size, precision); the features
land under `datasets/<name>/cache/features/`, so every later run and every Katib or optuna trial on any node
reuses them, and a head epoch costs milliseconds. Under DDP each rank computes a contiguous share.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from bincount.data.dataset import Item, map_in_order
from bincount.data.shards import rank_part
from bincount.store import Store
from bincount.train import distributed
from bincount.train.distributed import Dist
from bincount.model.zoo import head_name


def feature_key(dataset: str, split: str, items: Sequence[Item], arch: str, weights_id: str,
                image_size: int, precision: str) -> str:
    """Names everything the features depend on; the manifest's digest makes a re-prepared split a new entry."""
    manifest = "".join(f"{item.key}\t{item.label}\n" for item in items)
    digest = hashlib.sha256(manifest.encode()).hexdigest()[:16]
    weights = re.sub(r"[^A-Za-z0-9._-]+", "_", weights_id)
    return f"datasets/{dataset}/cache/features/{arch}/{weights}-{image_size}px-{precision}/{split}-{digest}.pt"


@torch.no_grad()
def extract(model: nn.Module, images: Dataset, batch_size: int, workers: int,
            autocast: Callable[[], contextlib.AbstractContextManager],
            to_input: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The input of the model's head for every image (uint8 batches made network inputs by `to_input`), as
    float32 on the CPU."""
    name = head_name(model)
    head = model.get_submodule(name)
    model.set_submodule(name, nn.Identity())
    model.eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast():
            return model(to_input(x)).float().cpu()

    try:
        out, _ = map_in_order(images, batch_size, workers, forward, "features")
    finally:
        model.set_submodule(name, head)
    return out if len(out) else torch.empty(0, head.in_features)


def load_or_compute(store: Store, key: str, targets: Sequence[int], compute: Callable[[Dataset], torch.Tensor],
                    images: Dataset | None, d: Dist, log: Callable[[str], None]) -> TensorDataset:
    """The cached features at `key`, or computed (each rank a contiguous share of `images`) and stored by rank 0.

    `images` is None where rank 0 found the features cached, which every rank learns by broadcast."""
    labels = torch.tensor(list(targets), dtype=torch.long)
    if images is None:
        with distributed.phase(d):
            blob = torch.load(io.BytesIO(store.get(key)), map_location="cpu", weights_only=True)
        log(f"features: {len(labels)} from {store.url(key)}")
        return TensorDataset(blob["features"], labels)
    start = time.perf_counter()
    with distributed.phase(d):
        part = compute(rank_part(images, d.rank, d.world))
    features = torch.cat(distributed.all_gather(d, part))
    with distributed.phase(d):
        if d.main:
            buf = io.BytesIO()
            torch.save({"features": features, "labels": labels}, buf)
            store.put(key, buf.getvalue())
    log(f"features: computed {len(labels)} in {time.perf_counter() - start:.1f} s → {store.url(key)}")
    return TensorDataset(features, labels)
