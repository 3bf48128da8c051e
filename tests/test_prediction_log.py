"""The prediction log: batched objects in the store, off the request path. In-process for its accounting; the real
predictor (`bincount serve` in a subprocess) for what a client sees: every answer logged with its version, no
failed request when the store is down, and at most the unflushed records it reports lost when killed."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import signal
import time
from datetime import datetime, timedelta, timezone

import pytest
from serve_support import drawn_jpeg, export_model

from bincount.config import ServeConfig
from bincount.processes import free_port
from bincount.rollout.predlog import PredictionLog, parse_object, read_log, timestamp
from bincount.serve.local import start
from bincount.store import open_store

PHOTO = drawn_jpeg(5)
BODY = json.dumps({"instances": [{"image": {"b64": base64.b64encode(PHOTO).decode()}}]}).encode()
FAR = timedelta(days=1)


def record(i: int) -> dict:
    return {"time": timestamp(time.time()), "model_version": "r1", "request_id": str(i), "input": "ab" * 16,
            "width": 320, "height": 240, "brightness": 100.0, "contrast": 20.0, "sharpness": 50.0, "input_size": 64,
            "count": 1 + i % 5, "probabilities": {"1": 0.2, "2": 0.2, "3": 0.2, "4": 0.2, "5": 0.2},
            "latency_ms": 3.0}


def window() -> tuple[datetime, datetime]:
    now = datetime.now(timezone.utc)
    return now - FAR, now + FAR


def test_records_are_batched_into_objects_and_flushed_on_close(tmp_path):
    store = open_store(str(tmp_path))
    log = PredictionLog(store, "ep", batch=10, flush_s=3600)
    for i in range(25):
        log.record(record(i))
    assert log.close() == "prediction log of ep: 25 record(s) written in 3 object(s), 0 dropped"
    keys = [o.key for o in store.list("predictions/ep/")]
    assert len(keys) == 3 and keys == sorted(keys)
    assert all(re.fullmatch(r"predictions/ep/\d{4}-\d\d-\d\d/\d{6}\.\d{6}Z-[a-z0-9-]+-00000[123]\.jsonl", k) for k in keys)
    headers = [parse_object(store.get(k))[0] for k in keys]
    assert [h["records"] for h in headers] == [10, 10, 5] and [h["seq"] for h in headers] == [1, 2, 3]
    read = read_log(store, "ep", *window())
    assert [r["request_id"] for r in read.records] == [str(i) for i in range(25)] and read.skipped == []


def test_a_partial_batch_is_written_once_its_first_record_is_flush_s_old(tmp_path):
    store = open_store(str(tmp_path))
    log = PredictionLog(store, "ep", batch=100, flush_s=0.2)
    log.record(record(0))
    deadline = time.monotonic() + 10
    while log.written == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.written == 1 and log.pending() == 0
    log.close()


def test_a_store_that_is_down_costs_the_caller_nothing_and_every_record_is_counted(monkeypatch):
    """An S3 endpoint where nothing listens: the writer's retries take seconds, the caller's calls never wait."""
    monkeypatch.setenv("S3_ENDPOINT", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("S3_SECURE", "0")
    log = PredictionLog(open_store("s3://nowhere"), "ep", batch=5, flush_s=0.1, queue_size=20)
    longest = 0.0
    for i in range(200):
        t0 = time.perf_counter()
        log.record(record(i))
        longest = max(longest, time.perf_counter() - t0)
    assert longest < 0.05
    assert log.close(timeout_s=30).endswith("0 record(s) written in 0 object(s), 200 dropped")


def test_a_corrupt_or_partial_object_is_skipped_and_counted(tmp_path):
    store = open_store(str(tmp_path))
    log = PredictionLog(store, "ep", batch=3, flush_s=3600)
    for i in range(6):
        log.record(record(i))
    log.close()
    good, second = [o.key for o in store.list("predictions/ep/")]
    day = good.split("/")[2]
    text = store.get_text(good)
    store.put_text(f"predictions/ep/{day}/cut.jsonl", text[: len(text) - 40])          # cut mid-record
    store.put_text(f"predictions/ep/{day}/short.jsonl", text.rsplit("\n", 2)[0] + "\n")  # a whole line missing
    store.put_text(f"predictions/ep/{day}/headless.jsonl", text.split("\n", 1)[1])
    store.put_text(f"predictions/ep/{day}/typed.jsonl", text.replace('"count":1', '"count":"one"'))
    read = read_log(store, "ep", *window())
    assert len(read.records) == 6 and read.objects == 6
    reasons = sorted(s.split(": ", 1)[1] for s in read.skipped)
    assert len(reasons) == 4 and reasons[0].startswith("a line is not JSON")
    assert reasons[1:] == ["no header line", "record 1: count is 'one', not int",
                           "the header counts 3 records, the object holds 2"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return export_model(tmp_path_factory.mktemp("model"), [])


def predict(port: int, n: int) -> list[int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    statuses = []
    for _ in range(n):
        conn.request("POST", "/v1/models/bincount:predict", BODY, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        statuses.append(response.status)
    conn.close()
    return statuses


def log_metrics(port: int) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out = {}
    for name, outcome, value in re.findall(r'^bincount_prediction_log_(records_total|pending)\{endpoint="bincount"'
                                           r'(?:,outcome="(\w+)")?\} (\S+)$', text, re.M):
        out[outcome or name] = float(value)
    return out


def test_a_killed_endpoint_loses_at_most_the_unflushed_records_it_reports(model, tmp_path):
    store = tmp_path / "store"
    server = start(ServeConfig(model=model, port=0, version="r1", log_store=str(store), log_batch=10,
                               log_flush_s=3600), tmp_path / "serve")
    try:
        assert predict(server.port, 25) == [200] * 25
        deadline = time.monotonic() + 30
        while (reported := log_metrics(server.port)).get("written", 0) < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert reported == {"written": 20, "dropped": 0, "pending": 5}
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(30)
    finally:
        server.stop()
    read = read_log(open_store(str(store)), "bincount", *window())
    assert len(read.records) == 25 - reported["pending"] and read.skipped == []
    assert {r["model_version"] for r in read.records} == {"r1"}
    first = read.records[0]
    assert (first["width"], first["height"], first["input_size"]) == (320, 240, 64)
    assert first["input"] == hashlib.sha256(PHOTO).hexdigest()[:32]


def test_with_the_store_down_every_request_is_answered_and_the_drops_are_reported(model, tmp_path, monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("S3_SECURE", "0")
    server = start(ServeConfig(model=model, port=0, log_store="s3://nowhere", log_batch=5, log_flush_s=0.1,
                               log_queue=10), tmp_path / "serve")
    try:
        assert predict(server.port, 40) == [200] * 40
    finally:
        server.stop()
    log = server.log.read_text()
    assert "prediction log of bincount: 0 record(s) written in 0 object(s), 40 dropped\n" in log
    assert "prediction log of bincount: dropping records, the queue is full (the store is slow or down)" in log
