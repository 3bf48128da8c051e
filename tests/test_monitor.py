"""The drift report: the real predictor (in this process) logs the photos it is sent; `bincount monitor` compares the
log with the reference split it was built on. A fresh sample of synthetic bins from the same generator is not
drift; the same photos darkened are, and exit with code 2. A corrupt log object is skipped and counted."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageEnhance

from bincount import cli
from bincount.config import MonitorConfig, PrepareConfig, ServeConfig, SyntheticConfig
from bincount.data.prepare import prepare
from bincount.data.synthetic import generate
from bincount.errors import ALERT_EXIT, ConfigError
from bincount.model.exported import ExportedModel, Inference, Preprocessing
from bincount.model.zoo import IMAGENET_MEAN, IMAGENET_STD, build_model
from bincount.rollout.imagestats import FEATURES
from bincount.rollout.monitor import monitor, window
from bincount.serve.predictor import BinCountModel
from bincount.store import open_store

SIZE = dict(width=(240, 320), height=(180, 240))


def darkened(data: bytes) -> bytes:
    out = io.BytesIO()
    ImageEnhance.Brightness(Image.open(io.BytesIO(data))).enhance(0.5).save(out, "JPEG", quality=90)
    return out.getvalue()


def serve(store: str, model: str, endpoint: str, photos: list[bytes]) -> None:
    """The predictor answers every photo and logs it, as `bincount serve --log-store` does."""
    server = BinCountModel(ServeConfig(model=model, version="r1", endpoint=endpoint, log_store=store, max_batch=4))
    server.load()

    async def ask() -> None:
        for photo in photos:
            await server({"instances": [{"image": {"b64": base64.b64encode(photo).decode()}}]})

    try:
        asyncio.run(ask())
    finally:
        server.stop()


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> str:
    """A reference dataset of 300 synthetic bins (seed 0); 150 fresh ones (seed 1) logged as endpoint `same` and
    the same 150 darkened as `dark`."""
    root = tmp_path_factory.mktemp("monitor")
    store = str(root / "store")
    generate(SyntheticConfig(dest=store, n=300, seed=0, workers=2, **SIZE))
    prepare(PrepareConfig(store=store, name="ref", workers=4))
    generate(SyntheticConfig(dest=str(root / "fresh"), n=150, seed=1, workers=2, **SIZE))
    fresh = [p.read_bytes() for p in sorted((root / "fresh" / "raw" / "bin-images").glob("*.jpg"))]
    torch.manual_seed(0)
    net, _ = build_model("resnet18", 5, "none")
    ExportedModel(net, "resnet18", [1, 2, 3, 4, 5], Preprocessing(48, IMAGENET_MEAN, IMAGENET_STD), Inference(),
                  {"config": {"run": "r1"}}).save(open_store(store), "models/r1")
    serve(store, f"{store}/models/r1", "same", fresh)
    serve(store, f"{store}/models/r1", "dark", [darkened(p) for p in fresh])
    return store


def test_a_fresh_sample_of_the_same_distribution_is_not_drift(logged):
    result = monitor(MonitorConfig(store=logged, endpoint="same", reference="ref"))
    assert result.records == 150 and result.versions == {"r1": 150}
    judged = {c.name: (c.psi, c.noise) for c in result.comparisons if c.threshold is not None}
    assert set(judged) == {*FEATURES}, result.comparisons
    assert result.drifted == [] and result.exit_code == 0, judged
    assert all(value < 0.8 * max(0.25, noise) for value, noise in judged.values()), judged   # with room to spare
    rows = {c.name: c for c in result.comparisons}
    assert rows["count r1"].note == "no evaluation of r1 in reports/r1/evaluation/ to compare with"
    assert rows["count vs labels"].threshold is None and rows["count vs labels"].psi is not None


def test_darkened_photos_are_drift_and_the_cli_exits_2(logged, capsys):
    assert cli.main(["monitor", "--store", logged, "--endpoint", "dark", "--reference", "ref"]) == ALERT_EXIT
    line = capsys.readouterr().out
    assert line.startswith("endpoint dark, ") and "150 prediction(s); DRIFT in " in line and "brightness (PSI" in line
    summary = json.loads(Path(line.rsplit("report: ", 1)[1].strip().replace("report.html", "summary.json"))
                         .read_text())
    brightness = next(c for c in summary["comparisons"] if c["name"] == "brightness")
    assert brightness["drifted"] and brightness["psi"] > 4 * brightness["threshold"]
    assert summary["exit_code"] == ALERT_EXIT and "brightness" in summary["drifted"]
    report = Path(line.rsplit("report: ", 1)[1].strip())
    html = report.read_text()
    assert html.count('src="data:image/png;base64,') == len(FEATURES) + 2 and "DRIFT" in html


def test_a_corrupt_log_object_is_skipped_and_counted_never_fatal(logged):
    s = open_store(logged)
    day = next(iter(s.list("predictions/same/"))).key.split("/")[2]
    s.put_text(f"predictions/same/{day}/999999.999999Z-broken-000001.jsonl", '{"header": {"records": 2}}\n{"time": ')
    try:
        result = monitor(MonitorConfig(store=logged, endpoint="same", reference="ref"))
    finally:
        s.delete(f"predictions/same/{day}/999999.999999Z-broken-000001.jsonl")
    assert result.records == 150 and len(result.log["skipped"]) == 1
    assert result.log["skipped"][0].startswith(f"predictions/same/{day}/999999.999999Z-broken-000001.jsonl: a line is "
                                               "not JSON")
    assert "1 log object(s) skipped as corrupt or partial" in result.line()


def test_too_few_predictions_are_reported_not_judged(logged):
    result = monitor(MonitorConfig(store=logged, endpoint="same", reference="ref", min_records=1000))
    assert result.drifted == [] and all(c.psi is None for c in result.comparisons)
    assert {c.note for c in result.comparisons if c.name in FEATURES} == {
        "150 logged value(s), fewer than min_records 1000"}


@pytest.mark.parametrize("since, until, message", [
    ("yesterday", "", "monitor: since 'yesterday' is not an ISO 8601 time like 2026-01-31T12:00:00Z nor an age like "
                      "30m, 24h or 7d"),
    ("2026-02-01T00:00:00Z", "2026-01-01T00:00:00Z", "monitor: the window is empty: since 2026-02-01T00:00:00Z is not "
                                                     "before until 2026-01-01T00:00:00Z"),
])
def test_a_bad_window_is_one_error(since, until, message):
    with pytest.raises(ConfigError) as e:
        window(since, until)
    assert str(e.value) == message
