"""The prediction log: every answer the predictor gives is a record (time, endpoint, model version, a digest of the
photo, its size and image statistics, the count, the probabilities, the latency), appended to the store in batched
JSON-lines objects, `predictions/<endpoint>/<YYYY-MM-DD>/<HHMMSS.ffffff>Z-<writer>-<seq>.jsonl`, off the request
path.

A request only appends its records to a bounded queue, never waiting: when the queue is full the record is dropped
and counted. One writer thread batches the records and writes an object once the batch holds `batch` records or its
first record is `flush_s` old (it looks every quarter second), and on close. A slow or unreachable store therefore costs requests nothing: the
writer waits on it, the queue fills, records are dropped and counted; a batch the store still refuses after its
own retries is dropped and counted as well. A killed server loses the records not yet written: at most one batch
and what waits behind it, which `/metrics` shows as `bincount_prediction_log_pending`.

Each object starts with a header line (writer, sequence number, records, and the writer's drops so far), so the
drift report can say what the log is missing; `read_log` skips an object that is corrupt or cut short, and counts it.
"""

from __future__ import annotations

import functools
import math
import os
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import orjson

from bincount.store import Store, StoreError

PREFIX = "predictions"
FORMAT = 1
WARN_EVERY_S = 60.0
RECORD_FIELDS = {"time": str, "model_version": str, "count": int, "probabilities": dict, "width": int, "height": int,
                 "brightness": float, "contrast": float, "sharpness": float, "input_size": int, "latency_ms": float}
POLL_S = 0.25                                   # how often the writer looks for a batch that is due


def timestamp(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def writer_name() -> str:
    """This process, as a key part: the host (a pod's name on a cluster) and the pid."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{socket.gethostname().lower()}-{os.getpid()}").strip("-")


def object_key(endpoint: str, first: str, writer: str, seq: int) -> str:
    """Under the date of the batch's first record (`first`, ISO 8601), named by its time: keys sort by time."""
    moment = datetime.fromisoformat(first).astimezone(timezone.utc)
    return f"{PREFIX}/{endpoint}/{moment:%Y-%m-%d}/{moment:%H%M%S.%f}Z-{writer}-{seq:06d}.jsonl"


@functools.cache
def _metrics():
    """Prometheus series on kserve's /metrics, made once per process."""
    from prometheus_client import Counter, Gauge

    return (Counter("bincount_prediction_log_records", "Prediction log records, by what became of them",
                    ["endpoint", "outcome"]),
            Gauge("bincount_prediction_log_pending", "Prediction log records not yet written to the store",
                  ["endpoint"]))


class PredictionLog:
    def __init__(self, store: Store, endpoint: str, batch: int = 500, flush_s: float = 10.0,
                 queue_size: int = 10_000, warn: Callable[[str], None] = print):
        if batch < 1 or queue_size < 1 or not flush_s > 0:
            raise ValueError(f"prediction log: batch ({batch}) and queue ({queue_size}) must be at least 1 and "
                             f"flush_s ({flush_s}) positive")
        self.store, self.endpoint, self.batch, self.flush_s = store, endpoint, batch, flush_s
        self.queue_size = queue_size
        self.writer = writer_name()
        self._warn = warn
        self._queue: deque[dict] = deque()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._lock = threading.Lock()
        self.written = self.dropped = self.objects = 0
        self._batched = 0
        self._seq = 0
        self._warned_at = -math.inf
        counter, gauge = _metrics()
        self._written_total = counter.labels(endpoint, "written")
        self._dropped_total = counter.labels(endpoint, "dropped")
        gauge.labels(endpoint).set_function(self.pending)
        self._thread = threading.Thread(target=self._run, name="bincount-prediction-log", daemon=True)
        self._thread.start()

    def record(self, record: dict) -> None:
        """Queues one record; never waits. The writer is woken only when a batch is full: waking it for every
        record would hand the GIL back and forth with the threads answering requests."""
        if len(self._queue) >= self.queue_size:
            self._drop(1, "the queue is full (the store is slow or down)")
            return
        self._queue.append(record)
        if len(self._queue) >= self.batch:
            self._wake.set()

    def pending(self) -> int:
        """Records queued or batched, not yet written: what a kill now would lose."""
        with self._lock:
            return len(self._queue) + self._batched

    def close(self, timeout_s: float = 30.0) -> str:
        """Writes what is queued (waiting at most `timeout_s`) and returns the log's account."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)
        lost = self.pending()
        if self._thread.is_alive() and lost:
            self._drop(lost, f"the store took over {timeout_s:g} s at shutdown")
        return (f"prediction log of {self.endpoint}: {self.written} record(s) written in {self.objects} object(s), "
                f"{self.dropped} dropped")

    def _drop(self, n: int, why: str) -> None:
        with self._lock:
            self.dropped += n
            warn = time.monotonic() - self._warned_at >= WARN_EVERY_S
            if warn:
                self._warned_at = time.monotonic()
        self._dropped_total.inc(n)
        if warn:
            self._warn(f"prediction log of {self.endpoint}: dropping records, {why} ({self.dropped} dropped so far)")

    def _run(self) -> None:
        """Wakes for a full batch, every POLL_S to see whether a partial batch is due, and to stop."""
        batch: list[dict] = []
        deadline = math.inf
        while True:
            self._wake.wait(min(POLL_S, max(0.0, deadline - time.monotonic())))
            self._wake.clear()
            stopping = self._stop.is_set()
            while self._queue:
                with self._lock:                # a record is always counted by pending(), queued or batched
                    batch.append(self._queue.popleft())
                    self._batched = len(batch)
                if len(batch) == 1:
                    deadline = time.monotonic() + self.flush_s
                if len(batch) >= self.batch:
                    self._write(batch)
                    batch, deadline = [], math.inf
            if batch and (stopping or time.monotonic() >= deadline):
                self._write(batch)
                batch, deadline = [], math.inf
            if stopping:
                return

    def _write(self, batch: list[dict]) -> None:
        self._seq += 1
        header = {"header": {"format": FORMAT, "endpoint": self.endpoint, "writer": self.writer, "seq": self._seq,
                             "records": len(batch), "first": batch[0]["time"], "last": batch[-1]["time"],
                             "dropped_total": self.dropped}}
        data = b"\n".join(orjson.dumps(line) for line in [header, *batch]) + b"\n"
        try:
            self.store.put(object_key(self.endpoint, batch[0]["time"], self.writer, self._seq), data)
        except (StoreError, OSError) as e:
            self._batched = 0
            self._drop(len(batch), f"the store refused a batch: {e}")
            return
        with self._lock:
            self._batched = 0
            self.written += len(batch)
            self.objects += 1
        self._written_total.inc(len(batch))


# ---- reading ------------------------------------------------------------------------------------------------

@dataclass
class LogRead:
    """The records of a window, and what the log could not give."""

    records: list[dict] = field(default_factory=list)
    objects: int = 0
    skipped: list[str] = field(default_factory=list)       # corrupt or partial objects, with why
    dropped: dict[str, int] = field(default_factory=dict)  # writer → records it dropped since it started


def read_log(store: Store, endpoint: str, start: datetime, end: datetime) -> LogRead:
    """Every record of `endpoint` with start ≤ time < end, oldest first. The date folders of the window are listed
    (a batch sits in its first record's date)."""
    out = LogRead()
    day = (start - timedelta(days=1)).date()
    while day <= end.date():
        for obj in store.list(f"{PREFIX}/{endpoint}/{day:%Y-%m-%d}/"):
            out.objects += 1
            try:
                header, records = parse_object(store.get(obj.key))
            except ValueError as e:
                out.skipped.append(f"{obj.key}: {e}")
                continue
            writer = str(header.get("writer"))
            out.dropped[writer] = max(out.dropped.get(writer, 0), int(header.get("dropped_total", 0)))
            out.records += [r for r in records if start <= r["_time"] < end]
        day += timedelta(days=1)
    out.records.sort(key=lambda r: r["_time"])
    return out


def parse_object(data: bytes) -> tuple[dict, list[dict]]:
    """(header, records) of one log object, each record with its time parsed as `_time`; a ValueError says why
    the object cannot be used."""
    lines = data.splitlines()
    try:
        rows = [orjson.loads(line) for line in lines if line.strip()]
    except orjson.JSONDecodeError as e:
        raise ValueError(f"a line is not JSON ({e})") from None
    if not rows or not isinstance(rows[0], dict) or not isinstance(rows[0].get("header"), dict):
        raise ValueError("no header line")
    header, records = rows[0]["header"], rows[1:]
    if header.get("records") != len(records):
        raise ValueError(f"the header counts {header.get('records')} records, the object holds {len(records)}")
    for i, record in enumerate(records, 1):
        problem = _problem(record)
        if problem:
            raise ValueError(f"record {i}: {problem}")
        record["_time"] = datetime.fromisoformat(record["time"])
    return header, records


def _problem(record: object) -> str | None:
    if not isinstance(record, dict):
        return "not an object"
    for name, kind in RECORD_FIELDS.items():
        value = record.get(name)
        if not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
            return f"{name} is {value!r}, not {kind.__name__}"
    try:
        if datetime.fromisoformat(record["time"]).tzinfo is None:
            return "time has no zone"
    except ValueError:
        return f"time {record['time']!r} is not ISO 8601"
    return None
