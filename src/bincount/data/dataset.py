"""A split manifest as a torch Dataset over a per-node local cache of the model's input squares.

Reading every JPEG from the store and decoding it at full size every epoch (the seed did) makes the network
and the decoder the bottleneck. The cache is filled once per node by a thread pool; every epoch then reads
small local arrays. Keys are strings, file names too: `221` and `00221` stay different bins.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from bincount.data.abid import image_key
from bincount.data.prepare import dataset_key, read_manifest
from bincount.errors import BincountError
from bincount.model.preprocess import ImageError, read_image
from bincount.store import KeyNotFoundError, LocalStore, Store


class DataError(BincountError):
    """A dataset that cannot be trained on as it is: missing, empty, malformed or with missing images."""


@dataclass(frozen=True)
class Item:
    key: str
    label: int
    bin: str = ""       # prepare's id of the bin photographed in several photos (before and after a pick); "" alone


def load_split(store: Store, dataset: str, split: str, classes: Sequence[int] | None) -> list[Item]:
    """The split's (key, label) items, checked line by line so a bad manifest fails here, not mid-epoch;
    `classes` None takes any integer label."""
    where = store.url(dataset_key(dataset, f"{split}.jsonl"))
    try:
        records = read_manifest(store, dataset, split)
    except ValueError as e:
        raise DataError(f"{where} is not JSON lines: {e}") from None
    if not records:
        raise DataError(f"split {split!r} of dataset {dataset!r} is empty ({where}); "
                        "prepare the dataset with more images or other split fractions")
    items = []
    for n, record in enumerate(records, 1):
        key = record.get("key") if isinstance(record, dict) else None
        label = record.get("label") if isinstance(record, dict) else None
        if not isinstance(key, str) or not key or key in (".", "..") or "/" in key or "\\" in key:
            raise DataError(f"{where} line {n}: {record!r} has no valid string key")
        if isinstance(label, bool) or not isinstance(label, int) or (classes is not None and label not in classes):
            raise DataError(f"{where} line {n}: label {label!r} of key {key!r} is not one of the classes "
                            f"{', '.join(map(str, classes or ()))}")
        bin_id = record.get("bin", "")
        if not isinstance(bin_id, str):
            raise DataError(f"{where} line {n}: bin {bin_id!r} of key {key!r} is not a string")
        items.append(Item(key, label, bin_id))
    return items


def default_cache_root() -> Path:
    return Path(os.environ.get("BINCOUNT_CACHE") or Path.home() / ".cache" / "bincount")


class ImageCache:
    """The model's input squares of `raw/bin-images/<key>.jpg`, one directory per store and input size.

    Each photo is decoded and resized once, by the exported model's own preprocessing (`read_image`), and kept as
    raw uint8, so every epoch of training, evaluate and the audit feed the network exactly the tensor that the
    server computes from the same photo: no second resize, no JPEG re-encoding between them.
    """

    def __init__(self, store: Store, root: str | os.PathLike | None, size: int):
        self.store = store
        self.size = size
        store_id = hashlib.sha256(store.uri.encode()).hexdigest()[:12]
        self.local = LocalStore(Path(root or default_cache_root()) / store_id / f"square{size}")

    def path(self, key: str) -> Path:
        return self.local.root / f"{key}.npy"

    def fill(self, keys: Iterable[str], workers: int) -> int:
        """Fetch every key not cached yet; returns how many were fetched. All failures are reported at once."""
        todo = sorted({k for k in keys if not self.path(k).is_file()})
        if not todo:
            return 0
        with ThreadPoolExecutor(max(1, workers)) as pool:
            problems = [p for p in pool.map(self._fetch, todo) if p]
        if problems:
            missing = [p for p in problems if p.startswith("missing")]
            broken = [p for p in problems if not p.startswith("missing")]
            parts = []
            if missing:
                parts.append(f"{len(missing)} image(s) missing from {self.store.uri}: "
                             + ", ".join(image_key(p.split(" ", 1)[1]) for p in missing[:5])
                             + (" …" if len(missing) > 5 else ""))
            if broken:
                parts.append(f"{len(broken)} image(s) unreadable: " + "; ".join(broken[:3]))
            raise DataError("; ".join(parts))
        return len(todo)

    def _fetch(self, key: str) -> str | None:
        try:
            data = self.store.get(image_key(key))
        except KeyNotFoundError:
            return f"missing {key}"
        try:
            square = read_image(data, self.size)
        except ImageError as e:
            return f"{image_key(key)} ({e})"
        buf = io.BytesIO()
        np.save(buf, square.numpy(), allow_pickle=False)
        self.local.put(f"{key}.npy", buf.getvalue())
        return None


class BinImages(Dataset):
    """(uint8 CHW model input, class index) pairs; `classes[index]` is the item count."""

    def __init__(self, items: Sequence[Item], cache: ImageCache, classes: Sequence[int],
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.keys = [item.key for item in items]
        self.paths = [str(cache.path(key)) for key in self.keys]
        self.targets = [list(classes).index(item.label) for item in items]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(np.load(self.paths[i], allow_pickle=False))
        return (self.transform(image) if self.transform else image), self.targets[i]


def rank_range(n: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous share of n evaluation samples: the shares in rank order are all n, once."""
    per = -(-n // world)
    first = min(rank * per, n)
    return range(first, min(first + per, n))


def map_in_order(images: Dataset, batch_size: int, workers: int, fn: Callable[[torch.Tensor], torch.Tensor],
                 desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`fn` of every batch of inputs, and the class indices, in the dataset's order: also for an ordered shard
    stream, whose DataLoader workers interleave their batches and so tag each sample with its position. A pass
    that lasts over 5 s shows its progress (scoring a test split with TTA is minutes on a CPU)."""
    outs, targets, positions = [], [], []
    with tqdm(total=len(images), unit="img", desc=desc, file=sys.stderr, delay=5) as bar:
        for batch in DataLoader(images, batch_size=batch_size, num_workers=workers):
            outs.append(fn(batch[0]))
            targets.append(batch[1])
            if len(batch) == 3:
                positions.append(batch[2])
            bar.update(len(batch[1]))
    if not outs:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    out, y = torch.cat(outs), torch.cat(targets)
    if positions:
        order = torch.cat(positions).argsort()
        out, y = out[order], y[order]
    return out, y
