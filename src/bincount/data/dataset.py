"""A split manifest as a torch Dataset over a per-node local cache of the store's images.

Reading every JPEG from the store and decoding it at full size every epoch (the seed did) makes the network
and the decoder the bottleneck. The cache is filled once per node by a thread pool, with each image shrunk so
its shorter side is `short_side` (originals that are already small are kept byte for byte); every epoch then
decodes small local files. Keys are strings, file names too: `221` and `00221` stay different bins.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from bincount.data.abid import image_key
from bincount.data.prepare import dataset_key, read_manifest
from bincount.errors import BincountError
from bincount.store import KeyNotFoundError, LocalStore, Store


class DataError(BincountError):
    """A dataset that cannot be trained on as it is: missing, empty, malformed or with missing images."""


@dataclass(frozen=True)
class Item:
    key: str
    label: int


def load_split(store: Store, dataset: str, split: str, classes: Sequence[int]) -> list[Item]:
    """The split's (key, label) items, checked line by line so a bad manifest fails here, not mid-epoch."""
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
        if isinstance(label, bool) or not isinstance(label, int) or label not in classes:
            raise DataError(f"{where} line {n}: label {label!r} of key {key!r} is not one of the classes "
                            f"{', '.join(map(str, classes))}")
        items.append(Item(key, label))
    return items


def default_cache_root() -> Path:
    return Path(os.environ.get("BINCOUNT_CACHE") or Path.home() / ".cache" / "bincount")


class ImageCache:
    """Local copies of `raw/bin-images/<key>.jpg`, one directory per store and shorter-side size."""

    def __init__(self, store: Store, root: str | os.PathLike | None, short_side: int):
        self.store = store
        self.short_side = short_side
        store_id = hashlib.sha256(store.uri.encode()).hexdigest()[:12]
        size_dir = f"short{short_side}" if short_side else "original"
        self.local = LocalStore(Path(root or default_cache_root()) / store_id / size_dir)

    def path(self, key: str) -> Path:
        return self.local.root / f"{key}.jpg"

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
            self.local.put(f"{key}.jpg", self._shrink(data))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            return f"{image_key(key)} ({e})"
        return None

    def _shrink(self, data: bytes) -> bytes:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            scale = self.short_side / min(w, h) if self.short_side else 1.0
            if scale >= 1.0:
                img.load()
                return data
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            img.draft("RGB", size)
            out = io.BytesIO()
            img.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(out, "JPEG", quality=95)
            return out.getvalue()


class BinImages(Dataset):
    """(uint8 CHW image, class index) pairs; `classes[index]` is the item count."""

    def __init__(self, items: Sequence[Item], cache: ImageCache, transform: Callable, classes: Sequence[int]):
        self.paths = [str(cache.path(item.key)) for item in items]
        self.targets = [list(classes).index(item.label) for item in items]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[i]) as img:
            image = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()
        return self.transform(image), self.targets[i]
