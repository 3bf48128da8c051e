"""The drift report on real photos: does it flag changed cameras or lighting, and does it keep quiet otherwise?

The ABID sample (../shared/data/abid-sample, 407 photos) is prepared as a dataset whose train split is the
reference. `bincount serve` runs with its prediction log on (mobilenet_v3_small @224 with random weights, the
cheapest network that sees the photos at the served size: the judged features are the photos' own statistics,
which the model does not change; without an evaluation its answers are reported, not judged). Each of `--draws` seeded draws takes `--photos` photos from the whole sample with replacement (a fresh
sample of the same photos) and sends them five ways, each in its own time window:

    fresh        as they are                         should not be flagged: the false-alarm rate
    re-encoded   JPEG quality 90 again               a control: neither should this
    darkened     brightness × 0.6                    should be flagged
    blurred      Gaussian blur, radius 2 px          should be flagged
    cropped      the central 60 % of each side       should be flagged

`bincount monitor` then reads each window's log against the reference (default thresholds: PSI 0.25 and the
noise bound at significance 0.001) and the rates of flagged windows are printed, with the features that flagged
them and their median PSI.

    python benchmarks/drift_detection.py [--draws 20] [--photos 200]

Measured 2026-12-06 (defaults, 2 cores, 592 s): fresh 0/20 flagged (median PSI 0.05-0.07 per feature),
re-encoded 0/20, darkened 20/20 (brightness PSI 12.0, contrast, sharpness), blurred 20/20 (sharpness 7.7),
cropped 20/20 (size 9.0, contrast, sharpness; aspect in 16).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from bincount.config import MonitorConfig, PrepareConfig
from bincount.data.prepare import prepare
from bincount.rollout.monitor import monitor

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "abid-sample"
BATCH = 8                                       # photos per request


def reencoded(image: Image.Image) -> Image.Image:
    return image


def darkened(image: Image.Image) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance(0.6)


def blurred(image: Image.Image) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(2))


def cropped(image: Image.Image) -> Image.Image:
    w, h = image.size
    return image.crop((round(0.2 * w), round(0.2 * h), round(0.8 * w), round(0.8 * h)))


CHANGES = {"re-encoded": reencoded, "darkened": darkened, "blurred": blurred, "cropped": cropped}


def variant(data: bytes, change) -> bytes:
    out = io.BytesIO()
    with Image.open(io.BytesIO(data)) as image:
        change(image.convert("RGB")).save(out, "JPEG", quality=90)
    return out.getvalue()


def export_model(store: Path) -> str:
    from bincount.model.exported import ExportedModel, Inference, Preprocessing
    from bincount.model.zoo import IMAGENET_MEAN, IMAGENET_STD, build_model
    from bincount.store import open_store

    net, _ = build_model("mobilenet_v3_small", 5, "none")
    ExportedModel(net, "mobilenet_v3_small", [1, 2, 3, 4, 5], Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD),
                  Inference()).save(open_store(str(store)), "models/bench")
    return str(store / "models" / "bench")


def post(port: int, photos: list[bytes]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    for i in range(0, len(photos), BATCH):
        body = json.dumps({"instances": [{"image": {"b64": base64.b64encode(p).decode()}}
                                         for p in photos[i:i + BATCH]]}).encode()
        conn.request("POST", "/v1/models/bincount:predict", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            sys.exit(f"the server answered {response.status}")
    conn.close()


def pending(port: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("bincount_prediction_log_pending"))


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--photos", type=int, default=200, help="photos per draw")
    args = parser.parse_args()
    if not (SAMPLE / "bin-images").is_dir():
        sys.exit(f"the ABID sample is not at {SAMPLE}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serve_load import start

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        for part in ("bin-images", "metadata"):
            shutil.copytree(SAMPLE / part, store / "raw" / part)
        prepare(PrepareConfig(store=str(store), name="sample", balance="none", workers=8))
        model = export_model(store)
        server = start("ours", [sys.executable, "-m", "bincount.cli", "serve", "--model", model, "--version",
                                "bench", "--log-store", str(store), "--log-flush-seconds", "0.5"],
                       "/v2/health/ready", Path(tmp) / "serve.log", timeout_s=1800)
        keys = sorted(p.stem for p in (store / "raw" / "bin-images").glob("*.jpg"))
        raw = {k: (store / "raw" / "bin-images" / f"{k}.jpg").read_bytes() for k in keys}
        windows: dict[str, list[tuple[str, str]]] = {name: [] for name in ("fresh", *CHANGES)}
        started = time.monotonic()
        try:
            for draw in range(args.draws):
                chosen = np.random.default_rng(draw).choice(keys, args.photos, replace=True)
                sets = {"fresh": [raw[k] for k in chosen],
                        **{name: [variant(raw[k], change) for k in chosen] for name, change in CHANGES.items()}}
                for name, photos in sets.items():
                    t0 = time.time()
                    post(server.port, photos)
                    windows[name].append((iso(t0), iso(time.time())))
                print(f"  draw {draw + 1}/{args.draws} sent ({time.monotonic() - started:.0f} s)", flush=True)
            while pending(server.port):
                time.sleep(0.2)
        finally:
            server.stop()
        print(f"\n{args.draws} draws of {args.photos} photos (with replacement) from the {len(keys)}-photo sample; "
              "reference: the train split of the sample, PSI threshold 0.25, significance 0.001")
        rows = [("set", "flagged", "rate", "flagging features (draws)", "median PSI per feature")]
        for name, spans in windows.items():
            flagged, by_feature, values = 0, Counter(), {}
            for start_at, end_at in spans:
                result = monitor(MonitorConfig(store=str(store), endpoint="bincount", reference="sample",
                                               since=start_at, until=end_at, out=str(Path(tmp) / "report")))
                flagged += bool(result.drifted)
                by_feature.update(c.name for c in result.drifted)
                for c in result.comparisons:
                    if c.threshold is not None and c.psi is not None:
                        values.setdefault(c.name, []).append(c.psi)
            medians = ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in values.items())
            rows.append((name, f"{flagged}/{len(spans)}", f"{flagged / len(spans):.0%}",
                         ", ".join(f"{k} {n}" for k, n in by_feature.most_common()) or "-", medians))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows))
        print(f"({os.cpu_count()} CPU(s), {time.monotonic() - started:.0f} s; noise bound at these sizes: see "
              "report.md of any window)")


if __name__ == "__main__":
    main()
