"""A prepared dataset as webdataset tar shards in the store, streamed straight to every DDP rank and worker.

The image cache costs one GET per image per node before the first step and the whole dataset on each node's
disk; shards cost one ranged GET per worker per shard and no disk. Each split becomes tar shards of the model's
input squares (what `read_image` makes of the photo at the training size): sample i of a shard is the one
member `{i:08d}-{tag}.jpg|png`, where tag is the CRC-32 of its bin key and label (both kept in the index: one
tar header per sample, not three, halves the reading cost of small squares), written with webdataset's
TarWriter and read back with its tar expander and shuffle buffer. A bin photographed several times (prepare's
`bin`) is packed side by side in one shard and shuffled as one unit, so the same-bin ranking finds its photos in
one batch as it does from the cache. The train split is JPEG (quality
by measurement, see `ShardConfig`); val and test are lossless PNG by default, so evaluation and calibration see
exactly the tensor the server computes from the same photo.

`shards/<split>/index.json` holds the packing parameters, the digest of the split's manifest (a re-prepared
split makes its shards stale), and per shard its size, sha256, keys, labels, bins and each sample's byte offset: a
reader can start at any sample, and an epoch is partitioned exactly (`epoch_slices`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import random
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, IterableDataset, Subset, get_worker_info
from tqdm import tqdm
from webdataset.tariterators import tar_file_expander

from bincount.config import ShardConfig
from bincount.data.abid import image_key
from bincount.data.dataset import DataError, Item, load_split, rank_range
from bincount.data.prepare import SPLITS, dataset_key
from bincount.errors import ConfigError
from bincount.model.preprocess import CORRUPT, ImageError, read_image
from bincount.store import KeyNotFoundError, Store, open_store

FORMAT = "webdataset"
VERSION = 3                     # 3: bins recorded and packed side by side
INDEX = "index.json"
ENCODINGS = ("jpeg", "png")
DATA_MODES = ("auto", "shards", "cache")
SUFFIX = {"jpeg": "jpg", "png": "png"}
MTIME = 0.0                     # fixed member times: the same inputs give byte-identical shards


class ShardError(DataError):
    """A shard that is not what its index says: missing, truncated, altered, or out of step with the index."""


@dataclass(frozen=True)
class Shard:
    name: str
    bytes: int
    sha256: str
    keys: tuple[str, ...]
    labels: tuple[int, ...]
    offsets: tuple[int, ...]    # where each sample's first member starts, then where the last one ends
    bins: tuple[str, ...]       # each sample's bin ("" for a photo alone)

    @property
    def samples(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class ShardIndex:
    dataset: str
    split: str
    image_size: int
    encoding: str
    quality: int                # JPEG quality; 0 for PNG
    seed: int
    shard_samples: int
    manifest_sha256: str
    shards: tuple[Shard, ...]
    skipped: tuple[dict, ...] = ()      # {"key", "reason"}: photos that could not be packed

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def items(self) -> list[Item]:
        """The samples in shard order, the order every ordered read yields them in."""
        return [Item(k, label, b) for s in self.shards for k, label, b in zip(s.keys, s.labels, s.bins)]

    def params(self) -> dict:
        return {k: getattr(self, k) for k in ("image_size", "encoding", "quality", "seed", "shard_samples",
                                              "manifest_sha256")}

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, **dataclasses.asdict(self)}) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> ShardIndex:
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT or raw.get("version") != VERSION:
                raise ValueError(f"format {raw.get('format')!r} version {raw.get('version')!r}, expected "
                                 f"{FORMAT!r} version {VERSION}")
            shards = tuple(Shard(s["name"], int(s["bytes"]), s["sha256"], tuple(map(str, s["keys"])),
                                 tuple(map(int, s["labels"])), tuple(map(int, s["offsets"])),
                                 tuple(map(str, s["bins"]))) for s in raw["shards"])
            for s in shards:
                if (not (len(s.keys) == len(s.labels) == len(s.bins) == len(s.offsets) - 1)
                        or s.offsets[-1] > s.bytes):
                    raise ValueError(f"shard {s.name}: keys, labels, bins and offsets do not line up")
            fields = {f.name for f in dataclasses.fields(cls)} - {"shards", "skipped"}
            return cls(**{k: raw[k] for k in fields}, shards=shards, skipped=tuple(raw.get("skipped", ())))
        except (ValueError, KeyError, TypeError) as e:
            raise ShardError(f"shard index {where} is malformed: {e}; rerun `bincount data shard`") from None


def prefix(dataset: str, split: str) -> str:
    return dataset_key(dataset, f"shards/{split}")


def manifest_digest(items: Sequence[Item]) -> str:
    return hashlib.sha256("".join(f"{i.key}\t{i.label}\n" for i in items).encode()).hexdigest()


def read_index(store: Store, dataset: str, split: str) -> ShardIndex | None:
    key = f"{prefix(dataset, split)}/{INDEX}"
    try:
        text = store.get_text(key)
    except KeyNotFoundError:
        return None
    return ShardIndex.from_json(text, store.url(key))


# ---- packing

@dataclass
class SplitResult:
    split: str
    index_uri: str
    shards: int
    samples: int
    bytes: int
    written: int
    skipped: int
    seconds: float

    def line(self) -> str:
        state = f"{self.written} shard(s) written" if self.written else "up to date, nothing written"
        skipped = f", {self.skipped} photo(s) skipped (see the index)" if self.skipped else ""
        return (f"  {self.split}: {self.samples} sample(s) in {self.shards} shard(s), {self.bytes / 2**20:.1f} MiB; "
                f"{state}{skipped} ({self.seconds:.1f} s) → {self.index_uri}")


@dataclass
class ShardResult:
    dataset: str
    splits: list[SplitResult] = field(default_factory=list)

    def summary(self) -> str:
        return "\n".join([f"shards of dataset {self.dataset}:", *(s.line() for s in self.splits)])


def validate(cfg: ShardConfig) -> None:
    problems = []
    if cfg.eval_encoding not in ENCODINGS:
        problems.append(f"eval_encoding must be one of {', '.join(ENCODINGS)}, got {cfg.eval_encoding!r}")
    if not 1 <= cfg.quality <= 100:
        problems.append(f"quality must be 1-100, got {cfg.quality}")
    for name, low in (("image_size", 16), ("shard_samples", 1), ("workers", 1)):
        if getattr(cfg, name) < low:
            problems.append(f"{name} must be at least {low}, got {getattr(cfg, name)}")
    unknown = [s for s in cfg.splits if s not in SPLITS]
    if unknown:
        problems.append(f"unknown split(s) {unknown}; valid: {', '.join(SPLITS)}")
    if problems:
        raise ConfigError("data shard: " + "; ".join(problems))


def pack(cfg: ShardConfig) -> ShardResult:
    """Every split of `cfg.name` as shards; a split whose shards already match its manifest is left alone."""
    validate(cfg)
    store = open_store(cfg.store)
    store.check(write=True)
    result = ShardResult(cfg.name)
    for split in cfg.splits:
        try:
            items = load_split(store, cfg.name, split, None)
        except DataError:
            if split == "train":
                raise
            continue                                    # an empty val or test split has nothing to pack
        result.splits.append(pack_split(store, cfg, split, items))
    return result


def pack_split(store: Store, cfg: ShardConfig, split: str, items: Sequence[Item]) -> SplitResult:
    start = time.perf_counter()
    encoding = "jpeg" if split == "train" else cfg.eval_encoding
    wanted = {"image_size": cfg.image_size, "encoding": encoding, "quality": cfg.quality if encoding == "jpeg" else 0,
              "seed": cfg.seed, "shard_samples": cfg.shard_samples, "manifest_sha256": manifest_digest(items)}
    where = prefix(cfg.name, split)
    try:
        old = read_index(store, cfg.name, split)
    except ShardError:
        old = None                                      # a malformed index is rewritten, not trusted
    if old is not None and old.params() == wanted and all(_size(store, f"{where}/{s.name}") == s.bytes
                                                          for s in old.shards):
        return SplitResult(split, store.url(f"{where}/{INDEX}"), len(old.shards), old.samples, old.bytes, 0,
                           len(old.skipped), time.perf_counter() - start)
    shards: list[Shard] = []
    skipped: list[dict] = []

    def encode(item: Item) -> bytes | str:
        try:
            square = read_image(store.get(image_key(item.key)), cfg.image_size)
        except KeyNotFoundError:
            return "missing"
        except ImageError as e:
            return e.reason
        return _encode(square, encoding, cfg.quality)

    with ThreadPoolExecutor(cfg.workers) as pool, ThreadPoolExecutor(1) as uploads, \
            tqdm(total=len(items), unit="img", desc=f"shard {cfg.name}/{split}", file=sys.stderr,
                 disable=None) as bar:
        pending = []
        for chunk in chunks(items, cfg.shard_samples, random.Random(f"{cfg.seed}:{split}")):
            samples = []
            for item, data in zip(chunk, pool.map(encode, chunk)):
                if isinstance(data, str):
                    skipped.append({"key": item.key, "reason": data})
                else:
                    samples.append((item, data))
                bar.update()
            if samples:
                name = f"{split}-{len(shards):06d}.tar"
                tmp = tempfile.NamedTemporaryFile(prefix="bincount-shard-", suffix=".tar")
                shards.append(_write_tar(tmp, name, samples, SUFFIX[encoding]))
                pending.append(uploads.submit(_upload, store, f"{where}/{name}", tmp))
                while len(pending) > 2:                 # a few shards on local disk at most
                    pending.pop(0).result()
        for upload in pending:
            upload.result()
    index = ShardIndex(cfg.name, split, shards=tuple(shards), skipped=tuple(skipped), **wanted)
    store.put_text(f"{where}/{INDEX}", index.to_json())        # last: readers never see shards still missing
    return SplitResult(split, store.url(f"{where}/{INDEX}"), len(shards), index.samples, index.bytes, len(shards),
                       len(skipped), time.perf_counter() - start)


def chunks(items: Sequence[Item], size: int, rng: random.Random) -> Iterator[list[Item]]:
    """The split shuffled (mixed classes in every shard, the same for a seed) in units of a bin's photos, cut into
    shards of at most `size` samples between units (a bin larger than a shard gets one of its own)."""
    units: dict[str, list[Item]] = {}
    for item in items:
        units.setdefault(item.bin or f"\0{item.key}", []).append(item)
    order = list(units.values())
    rng.shuffle(order)
    chunk: list[Item] = []
    for unit in order:
        if chunk and len(chunk) + len(unit) > size:
            yield chunk
            chunk = []
        chunk.extend(unit)
    if chunk:
        yield chunk


def _size(store: Store, key: str) -> int:
    try:
        return store.stat(key).size
    except KeyNotFoundError:
        return -1


def _encode(square: torch.Tensor, encoding: str, quality: int) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(square.permute(1, 2, 0).numpy())
    if encoding == "jpeg":
        image.save(buf, "JPEG", quality=quality)
    else:
        image.save(buf, "PNG", compress_level=1)       # measured: level 6 is 5x slower to write for 12 % less
    return buf.getvalue()


def _write_tar(f: BinaryIO, name: str, samples: Sequence[tuple[Item, bytes]], suffix: str) -> Shard:
    writer = wds.TarWriter(f, encoder=False, mtime=MTIME, user="bincount", group="bincount")
    offsets = []
    for i, (item, data) in enumerate(samples):
        offsets.append(writer.tarstream.offset)
        writer.write({"__key__": member(i, item.key, item.label), suffix: data})
    offsets.append(writer.tarstream.offset)
    writer.close()
    f.flush()
    f.seek(0)
    digest = hashlib.sha256()
    size = 0
    while chunk := f.read(1 << 20):
        digest.update(chunk)
        size += len(chunk)
    return Shard(name, size, digest.hexdigest(), tuple(i.key for i, _ in samples),
                 tuple(i.label for i, _ in samples), tuple(offsets), tuple(i.bin for i, _ in samples))


def member(i: int, key: str, label: int) -> str:
    """Sample i's name in its shard: the tag ties the bytes to the index's key and label for that position."""
    tag = zlib.crc32(f"{key}\t{label}".encode())
    return f"{i:08d}-{tag:08x}"


def _upload(store: Store, key: str, tmp) -> None:
    with tmp:
        store.put_file(key, tmp.name)


# ---- choosing shards or the cache

def choose(store: Store, dataset: str, split: str, items: Sequence[Item], image_size: int,
           mode: str) -> tuple[ShardIndex | None, str]:
    """The index to stream `split` from, or None with the reason its shards cannot be used (none where it has
    none). `shards` (forced) turns every reason into an error."""
    if mode not in DATA_MODES:
        raise ConfigError(f"unknown data {mode!r}; valid: {', '.join(DATA_MODES)}")
    if mode == "cache":
        return None, "data: cache"
    index = read_index(store, dataset, split)
    if index is None:
        if mode == "auto":
            return None, ""                         # nothing packed: nothing to explain
        reason = f"dataset {dataset!r} has no shards of its {split} split ({store.url(prefix(dataset, split))})"
    elif index.image_size != image_size:
        reason = f"the {split} shards hold {index.image_size} px squares, the model needs {image_size} px"
    elif index.manifest_sha256 != manifest_digest(items):
        reason = f"the {split} shards are stale: the split was prepared again after they were packed"
    else:
        return index, ""
    if mode == "shards":
        raise ShardError(f"data: shards, but {reason}; run `bincount data shard --store {store.uri} --name "
                         f"{dataset} --image-size {image_size}`")
    return None, reason


# ---- reading

def epoch_slices(index: ShardIndex, *, rank: int, world: int, worker: int, workers: int, batch_size: int,
                 seed: int, epoch: int, shuffle: bool, drop_last: bool) -> list[tuple[int, int, int]]:
    """(shard, first, stop) pieces that worker `worker` of rank `rank` reads this epoch, in order.

    The shards are shuffled for (seed, epoch) and read as one sequence; rank r reads the r-th of `world` equal
    contiguous parts (with `drop_last`, whole batches: the ragged tail, fewer than world × batch_size samples,
    is the last shard's and so differs every epoch), and its workers split that part at batch boundaries. So
    every rank gets the same number of samples and of batches, and no sample is read twice in an epoch."""
    order = list(range(len(index.shards)))
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    if drop_last:
        per_rank = index.samples // world
        per_rank -= per_rank % batch_size if per_rank >= batch_size else 0
        lo, hi = rank * per_rank, (rank + 1) * per_rank
    else:
        share = rank_range(index.samples, rank, world)
        lo, hi = share.start, share.stop
    batches = -(-(hi - lo) // batch_size)
    first = lo + worker * batches // workers * batch_size
    stop = min(lo + (worker + 1) * batches // workers * batch_size, hi)
    pieces, at = [], 0
    for s in order:
        n = index.shards[s].samples
        a, b = max(first, at), min(stop, at + n)
        if a < b:
            pieces.append((s, a - at, b - at))
        at += n
    return pieces


def rank_samples(index: ShardIndex, rank: int, world: int, drop_last: bool, batch_size: int) -> int:
    return sum(b - a for _, a, b in epoch_slices(index, rank=rank, world=world, worker=0, workers=1,
                                                 batch_size=batch_size, seed=0, epoch=0, shuffle=False,
                                                 drop_last=drop_last))


class ShardStream(IterableDataset):
    """One rank's part of a split, streamed from its shards: (uint8 CHW square, class index), or with `ordered`
    (evaluation) (square, class index, position in the index order) so that callers can restore that order
    across DataLoader workers, or with `bins` (a number per index position, -1 for a photo alone: the same-bin
    ranking's) (square, class index, bin number). Training shuffles shards per epoch and samples in a buffer of
    `buffer`, a bin's adjacent photos as one unit."""

    def __init__(self, store_uri: str, index: ShardIndex, classes: Sequence[int], *, rank: int = 0, world: int = 1,
                 batch_size: int = 1, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 shuffle: bool = False, drop_last: bool = False, seed: int = 0, buffer: int = 1000,
                 ordered: bool = False, bins: Sequence[int] | None = None):
        if bins is not None and (ordered or len(bins) != index.samples):
            raise ValueError("bins: one per sample of the index, and not with ordered")
        self.store_uri, self.index, self.classes = store_uri, index, list(classes)
        self.rank, self.world, self.batch_size = rank, world, batch_size
        self.transform, self.shuffle, self.drop_last, self.seed = transform, shuffle, drop_last, seed
        self.buffer, self.ordered, self.bins, self.epoch = buffer, ordered, bins, 0
        self.where = prefix(index.dataset, index.split)
        strange = sorted({label for s in index.shards for label in s.labels} - set(self.classes))
        if strange:
            raise DataError(f"the {index.split} shards of {index.dataset!r} hold label(s) {strange}, not among the "
                            f"classes {self.classes}")
        starts = np.cumsum([0] + [s.samples for s in index.shards])
        self.first = starts[:-1].tolist()       # index position of each shard's first sample

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def part(self, rank: int, world: int) -> ShardStream:
        """The same stream for rank `rank` of `world`."""
        other = copy.copy(self)
        other.rank, other.world = rank, world
        return other

    def __len__(self) -> int:
        return rank_samples(self.index, self.rank, self.world, self.drop_last, self.batch_size)

    @property
    def targets(self) -> list[int]:
        """Class index of every sample of the split in index order (all ranks)."""
        return [self.classes.index(label) for s in self.index.shards for label in s.labels]

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        pieces = epoch_slices(self.index, rank=self.rank, world=self.world, worker=worker, workers=workers,
                              batch_size=self.batch_size, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle,
                              drop_last=self.drop_last)
        store = open_store(self.store_uri)          # per worker: connections do not survive a fork
        samples = (sample for piece in pieces for sample in self._read(store, *piece))
        if self.shuffle:
            rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}")
            units = _units(samples, self.bins) if self.bins is not None else ([s] for s in samples)
            samples = (s for unit in wds.filters.shuffle(self.buffer, min(self.buffer, 100), rng=rng)(units)
                       for s in unit)
        skipped = 0
        for position, label, shard, key, data in samples:
            try:
                image = _decode(data, self.index.image_size)
            except ImageError as e:
                skipped += 1
                print(f"bincount: warning: skipped the corrupt image of bin {key} in shard {shard} ({e}); "
                      f"{skipped} skipped by this reader this epoch", file=sys.stderr, flush=True)
                continue
            if self.transform is not None:
                image = self.transform(image)
            target = self.classes.index(label)
            if self.ordered:
                yield image, target, position
            elif self.bins is not None:
                yield image, target, self.bins[position]
            else:
                yield image, target

    def _read(self, store: Store, s: int, a: int, b: int) -> Iterator[tuple[int, int, str, str, bytes]]:
        """Samples a..b-1 of shard s, checked against the index: whole reads against its sha256 too."""
        shard = self.index.shards[s]
        key = f"{self.where}/{shard.name}"
        whole = a == 0 and b == shard.samples
        lo, length = shard.offsets[a], (shard.bytes - shard.offsets[a] if whole
                                        else shard.offsets[b] - shard.offsets[a])
        suffix = SUFFIX[self.index.encoding]
        where = store.url(key)
        stream = None
        try:
            with store.open(key, lo, length) as raw:
                stream = _Checked(raw, length, shard.sha256 if whole else None, where)
                n = a
                for entry in tar_file_expander([{"url": key, "stream": stream}], eof_value=None):
                    if n >= b or entry["fname"] != f"{member(n, shard.keys[n], shard.labels[n])}.{suffix}":
                        raise ShardError(f"shard {where} disagrees with its index at sample {n}; rerun "
                                         "`bincount data shard`")
                    yield self.first[s] + n, shard.labels[n], shard.name, shard.keys[n], entry["data"]
                    n += 1
                if whole:
                    stream.finish()
                if stream.error is None and n < b:
                    raise ShardError(f"shard {where} is damaged: it held {n - a} of the {b - a} sample(s) its "
                                     f"index lists from sample {a}")
        except KeyNotFoundError:
            raise ShardError(f"shard {where} is missing (listed in {self.where}/{INDEX}); rerun "
                             "`bincount data shard`") from None
        except ShardError:
            raise
        except Exception as e:                      # tarfile and webdataset on a damaged archive
            if stream is None or stream.error is None:
                raise ShardError(f"shard {where} is damaged: {str(e.args[0] if e.args else e).split(' @ ')[0]}"
                                 ) from None
        if stream.error is not None:
            raise stream.error


def _units(samples: Iterator[tuple], bins: Sequence[int]) -> Iterator[list[tuple]]:
    """Runs of adjacent samples (position first) of one bin; a photo alone is a unit of its own."""
    unit: list[tuple] = []
    for sample in samples:
        b = bins[sample[0]]
        if unit and (b < 0 or b != bins[unit[-1][0]]):
            yield unit
            unit = []
        unit.append(sample)
    if unit:
        yield unit


class _Checked(io.RawIOBase):
    """The bytes of a (ranged) shard read: a short read is an error; a whole read must match the sha256."""

    def __init__(self, raw: BinaryIO, length: int, sha256: str | None, where: str):
        self.raw, self.length, self.sha256, self.where = raw, length, sha256, where
        self.seen = 0
        self.hash = hashlib.sha256() if sha256 else None
        self.error: ShardError | None = None     # kept, not raised: tarfile would swallow or reword it

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.seen >= self.length or self.error is not None:
            return 0
        try:
            data = self.raw.read(min(len(buf), self.length - self.seen))
        except Exception as e:
            self.error = ShardError(f"shard {self.where}: the read failed after {self.seen} bytes ({e})")
            return 0
        if not data:
            self.error = ShardError(f"shard {self.where} is truncated: it ended after {self.seen} of its "
                                    f"{self.length} bytes")
            return 0
        buf[:len(data)] = data
        self.seen += len(data)
        if self.hash is not None:
            self.hash.update(data)
        return len(data)

    def finish(self) -> None:
        """Read past the archive's end blocks, then check the checksum."""
        while self.read(1 << 16):
            pass
        if self.error is None and self.hash is not None and self.hash.hexdigest() != self.sha256:
            raise ShardError(f"shard {self.where} fails its checksum (sha256 {self.hash.hexdigest()[:12]}…, the "
                             f"index says {self.sha256[:12]}…); rerun `bincount data shard`")



def rank_part(images: Dataset, rank: int, world: int) -> Dataset:
    """Rank `rank`'s contiguous share of an evaluation split, read from shards or from the cache."""
    if isinstance(images, ShardStream):
        return images.part(rank, world)
    return Subset(images, rank_range(len(images), rank, world))


def _decode(data: bytes, size: int) -> torch.Tensor:
    """A packed square back to uint8 CHW: the pixels `read_image` made, without its guards for photos from
    outside (they cost more than the decoding of a small square)."""
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG", "PNG")) as image:
            image.load()
            if image.size != (size, size) or image.mode != "RGB":
                raise ImageError("corrupt", f"a {image.mode} {image.size} image in {size} px RGB shards")
            rgb = np.asarray(image).copy()
    except (UnidentifiedImageError, *CORRUPT) as e:
        raise ImageError("corrupt", f"the packed image does not decode ({e})") from None
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
