"""ABID ingest: copy verified image+metadata pairs from the public bucket (or a mirror) into `raw/`.

Candidates are processed in chunks: workers fetch and verify in parallel, then the main thread accepts them in
candidate order (so `--limit` / `--per-class` pick the same pairs whatever the worker count) and workers write
the accepted ones. A pair is written image first, metadata last: readers take a pair as present only when its
metadata is, and a rerun re-copies a pair whose metadata is missing. Pairs already present with the source's
sizes are skipped, which makes an interrupted run resumable.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from bincount.config import DownloadConfig
from bincount.errors import ConfigError
from bincount.store import KeyNotFoundError, S3Settings, S3Store, Store, StoreError, open_store

IMAGES = "bin-images"
METADATA = "metadata"
RAW = "raw"


def image_key(key: str) -> str:
    return f"{RAW}/{IMAGES}/{key}.jpg"


def metadata_key(key: str) -> str:
    return f"{RAW}/{METADATA}/{key}.json"


class RejectedPair(Exception):
    """A pair that is not a valid ABID sample; `reason` is the short label counted in the summary."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def parse_metadata(data: bytes) -> tuple[dict, int]:
    """The metadata object and its EXPECTED_QUANTITY, or RejectedPair saying what is wrong."""
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RejectedPair("metadata is not JSON", str(e)) from None
    if not isinstance(meta, dict):
        raise RejectedPair("metadata is not a JSON object")
    quantity = meta.get("EXPECTED_QUANTITY")
    if quantity is None:
        raise RejectedPair("no EXPECTED_QUANTITY")
    if isinstance(quantity, bool) or not isinstance(quantity, int) or quantity < 0:
        raise RejectedPair("EXPECTED_QUANTITY is not a count", repr(quantity))
    return meta, quantity


def verify_jpeg(data: bytes) -> None:
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG":
                raise RejectedPair("image is not a JPEG", str(im.format))
            im.load()
    except RejectedPair:
        raise
    except Exception as e:
        raise RejectedPair("image does not decode", str(e)) from None


@dataclass
class _Candidate:
    key: str
    status: str = ""
    label: int | None = None
    image: bytes | None = None
    metadata: bytes | None = None
    reason: str = ""
    detail: str = ""


@dataclass
class DownloadSummary:
    selected: int = 0
    downloaded: int = 0
    skipped: int = 0
    rejected: dict[str, list[str]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    labels: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    dest: str = ""

    @property
    def failed(self) -> int:
        return len(self.failures)

    def report(self) -> str:
        n_rejected = sum(len(v) for v in self.rejected.values())
        lines = [f"{self.selected} pairs selected → downloaded {self.downloaded}, skipped {self.skipped} (already "
                 f"present), rejected {n_rejected}, failed {self.failed} in {self.seconds:.1f} s into {self.dest}"]
        if self.labels:
            lines.append("  by EXPECTED_QUANTITY: " + ", ".join(f"{q}: {n}" for q, n in sorted(self.labels.items())))
        for reason, keys in sorted(self.rejected.items()):
            shown = ", ".join(keys[:10]) + (f", … ({len(keys) - 10} more)" if len(keys) > 10 else "")
            lines.append(f"  rejected, {reason}: {len(keys)} ({shown})")
        for key, error in list(self.failures.items())[:10]:
            lines.append(f"  failed {key}: {error}")
        return "\n".join(lines)


def read_file_list(location: str) -> list[tuple[str, str]]:
    """(class, key) pairs from the common file_list.json ({"1": ["data/metadata/00004.json", ...], ...})."""
    try:
        if location.startswith("s3://"):
            bucket_uri, _, name = location.rpartition("/")
            text = open_store(bucket_uri).get_text(name)
        else:
            text = Path(location).read_text()
    except (OSError, KeyNotFoundError) as e:
        raise ConfigError(f"cannot read file list {location}: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"file list {location} is not JSON: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ConfigError(f"file list {location} must map each class to a list of metadata paths")
    return [(cls, Path(str(entry)).stem) for cls, entries in data.items() for entry in entries]


def _source(cfg: DownloadConfig) -> S3Store:
    secure = cfg.source_secure if cfg.source_secure is not None else cfg.source_endpoint.endswith("amazonaws.com")
    settings = S3Settings(
        endpoint=cfg.source_endpoint,
        access_key=os.environ.get("SOURCE_AWS_ACCESS_KEY_ID") or None,
        secret_key=os.environ.get("SOURCE_AWS_SECRET_ACCESS_KEY") or None,
        secure=secure,
        region=cfg.source_region,
    )
    return S3Store(cfg.source_bucket, cfg.source_prefix, settings)


def _validate(cfg: DownloadConfig) -> None:
    modes = [m for m, on in (("--file-list", cfg.file_list), ("--ids", cfg.ids), ("--quantities", cfg.quantities))
             if on]
    if len(modes) != 1:
        raise ConfigError("choose exactly one selection: --file-list FILE, --ids ID..., or --quantities LO-HI"
                          + (f" (got {', '.join(modes)})" if modes else ""))
    for name in ("limit", "per_class"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if cfg.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {cfg.workers}")
    if cfg.quantities and cfg.quantities[0] > cfg.quantities[1]:
        raise ConfigError(f"--quantities range is empty: {cfg.quantities[0]}-{cfg.quantities[1]}")


def _requested_keys(cfg: DownloadConfig) -> list[str]:
    """Keys named by --file-list or --ids, first occurrence kept, in the order given."""
    if cfg.file_list:
        return list(dict.fromkeys(key for _, key in read_file_list(cfg.file_list)))
    return list(dict.fromkeys(cfg.ids))


def _scanned_keys(source: Store) -> Iterator[str]:
    """Every key with metadata in the source, in listing order, streamed (the real bucket lists 500k+)."""
    for obj in source.list(f"{METADATA}/"):
        name = obj.key.rsplit("/", 1)[-1]
        if name.endswith(".json"):
            yield name[: -len(".json")]


def _fetch(cand: _Candidate, source: Store, dest: Store, quantities: tuple[int, int] | None) -> _Candidate:
    """Worker: metadata, range check, skip check, image, verification. Never writes."""
    try:
        try:
            cand.metadata = source.get(f"{METADATA}/{cand.key}.json")
        except KeyNotFoundError:
            raise RejectedPair("not in source", f"{METADATA}/{cand.key}.json") from None
        _, cand.label = parse_metadata(cand.metadata)
        if quantities and not quantities[0] <= cand.label <= quantities[1]:
            cand.status = "out of range"
            return cand
        try:
            image_size = source.stat(f"{IMAGES}/{cand.key}.jpg").size
        except KeyNotFoundError:
            raise RejectedPair("image not in source", f"{IMAGES}/{cand.key}.jpg") from None
        if _present(dest, cand.key, image_size, len(cand.metadata)):
            cand.status = "skipped"
            return cand
        cand.image = source.get(f"{IMAGES}/{cand.key}.jpg")
        verify_jpeg(cand.image)
        cand.status = "fetched"
    except RejectedPair as e:
        cand.status, cand.reason, cand.detail = "rejected", e.reason, e.detail
    except StoreError as e:
        cand.status, cand.detail = "failed", str(e)
    return cand


def _present(dest: Store, key: str, image_size: int, metadata_size: int) -> bool:
    try:
        return (dest.stat(metadata_key(key)).size == metadata_size
                and dest.stat(image_key(key)).size == image_size)
    except KeyNotFoundError:
        return False


def _write(cand: _Candidate, dest: Store) -> _Candidate:
    try:
        dest.put(image_key(cand.key), cand.image)
        dest.put(metadata_key(cand.key), cand.metadata)
        cand.status = "downloaded"
    except StoreError as e:
        cand.status, cand.detail = "failed", str(e)
    cand.image = cand.metadata = None
    return cand


class _Quota:
    """--limit and --per-class, counted over pairs that end up in the store (downloaded or skipped)."""

    def __init__(self, limit: int | None, per_class: int | None):
        self.limit, self.per_class = limit, per_class
        self.total = 0
        self.by_class: Counter = Counter()

    def full(self) -> bool:
        return self.limit is not None and self.total >= self.limit

    def admits(self, label: int) -> bool:
        return not self.full() and (self.per_class is None or self.by_class[label] < self.per_class)

    def take(self, label: int) -> None:
        self.total += 1
        self.by_class[label] += 1

    def saturated(self, quantities: tuple[int, int] | None) -> bool:
        """Nothing more can be accepted: stop reading candidates early."""
        if self.full():
            return True
        if self.per_class is None or quantities is None:
            return False
        return all(self.by_class[q] >= self.per_class for q in range(quantities[0], quantities[1] + 1))


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def download(cfg: DownloadConfig) -> DownloadSummary:
    _validate(cfg)
    requested = None if cfg.quantities else _requested_keys(cfg)
    source, dest = _source(cfg), open_store(cfg.dest)
    source.check()
    dest.check(write=True)
    dest.remove_stale_parts(RAW)

    summary = DownloadSummary(dest=dest.url(RAW))
    quota = _Quota(cfg.limit, cfg.per_class)
    keys = _scanned_keys(source) if requested is None else requested
    total = cfg.limit if requested is None else min(len(requested), cfg.limit or len(requested))
    start = time.monotonic()
    with ThreadPoolExecutor(cfg.workers) as pool, tqdm(total=total, unit="pair", desc="download",
                                                       disable=None, leave=False) as bar:
        for chunk in _chunks(keys, cfg.workers * 4):
            fetched = list(pool.map(lambda k: _fetch(_Candidate(k), source, dest, cfg.quantities), chunk))
            accepted = []
            for cand in fetched:
                if quota.full():
                    break
                if cand.status in ("skipped", "fetched") and not quota.admits(cand.label):
                    continue
                if cand.status == "out of range":
                    continue
                summary.selected += 1
                bar.update(1)
                if cand.status == "fetched":
                    quota.take(cand.label)
                    accepted.append(cand)
                elif cand.status == "skipped":
                    quota.take(cand.label)
                    summary.skipped += 1
                    summary.labels[cand.label] += 1
                elif cand.status == "rejected":
                    summary.rejected.setdefault(cand.reason, []).append(cand.key)
                else:
                    summary.failures[cand.key] = cand.detail
            for cand in pool.map(lambda c: _write(c, dest), accepted):
                if cand.status == "downloaded":
                    summary.downloaded += 1
                    summary.labels[cand.label] += 1
                else:
                    summary.failures[cand.key] = cand.detail
            if quota.saturated(cfg.quantities):
                break
    summary.seconds = time.monotonic() - start
    return summary
