"""Audit throughput: `bincount audit` against one sequential HTTP request per photo to a running `bincount serve`.

The same exported model (resnet18 at 224 px, random weights: speed does not depend on them) and the same photos
(the real ABID sample where ../shared is present, else drawn ones, repeated to `--n`) in a local store. The audit
runs as the command a user runs (a subprocess: plan, decode threads, batched inference, shards, report); the
baseline is what a script around the endpoint does: read each photo, POST it as a V1 request, wait for the
answer, next. Both compute in the precision `auto` picks (bf16 where the CPU has it natively).

Printed: images/s of each and their ratio, and CPU seconds per image — the audit's whole process tree, and the
server's plus the client's — the figure other load on a shared machine disturbs least. The server is started and
warmed up before its clock starts; the audit's clock covers the whole command, so its fixed cost (interpreter,
model load, plan, report) is measured on a one-photo audit and also shown subtracted.

    python benchmarks/audit_throughput.py [--n 800] [--workers 1]

Measured 2026-12-05 (2 CPU cores with AVX512-BF16, shared with another engineer's full test suite: load average
11-14, so the rates are a fraction of an idle machine's), --n 2000 real photos: serve 5.7 images/s, 32.4 CPU
ms/image; audit 7.9 images/s, 22.5 CPU ms/image for the whole command, 9.1 images/s, 20.0 CPU ms/image less its
fixed cost (a one-photo audit: 4.9 CPU s): 1.38x (1.59x) the rate, 1.44x (1.62x) less CPU per image. Before the
single-threaded side-by-side batches and the kept heap (2026-12-03, a lighter load): 1.20x (1.46x). The ceiling
is near: the bf16 forward pass is ~17-19 of the audit's ~20 CPU ms per image (read, decode and resize ~2) and
runs near this CPU's bf16 peak; batch 1 costs only ~25 % more per image than batch 32, so no batching reaches 5x
here. The endpoint loses that and the barrier spin of its two-thread passes on a busy machine, not much else.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bincount.config import ServeConfig
from bincount.serve.local import start

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "abid-sample"


def export_model(root: Path) -> None:
    from bincount.model.exported import ExportedModel, Inference, Preprocessing
    from bincount.model.zoo import IMAGENET_MEAN, IMAGENET_STD, build_model
    from bincount.store import open_store

    model, _ = build_model("resnet18", 5, "none")
    ExportedModel(model, "resnet18", [1, 2, 3, 4, 5], Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD),
                  Inference()).save(open_store(str(root)), "models/bench")


def fill(store: Path, n: int) -> str:
    """`n` bins under raw/: the sample's pairs, repeated under new keys; or drawn photos without metadata."""
    images, metadata = store / "raw" / "bin-images", store / "raw" / "metadata"
    images.mkdir(parents=True)
    metadata.mkdir(parents=True)
    if (SAMPLE / "bin-images").is_dir():
        keys = sorted(p.stem for p in (SAMPLE / "metadata").glob("*.json"))
        for i in range(n):
            key = keys[i % len(keys)]
            shutil.copyfile(SAMPLE / "bin-images" / f"{key}.jpg", images / f"{i:06d}.jpg")
            shutil.copyfile(SAMPLE / "metadata" / f"{key}.json", metadata / f"{i:06d}.json")
        return f"{n} real ABID photos ({len(keys)} distinct)"
    from PIL import Image, ImageDraw

    for i in range(n):
        image = Image.new("RGB", (480, 400), (200, 190, 170))
        ImageDraw.Draw(image).rectangle([20 + i % 200, 30, 120 + i % 200, 160], fill=(i % 255, 90, 40))
        image.save(images / f"{i:06d}.jpg", "JPEG", quality=90)
        (metadata / f"{i:06d}.json").write_text(json.dumps({"EXPECTED_QUANTITY": 1 + i % 5}))
    return f"{n} drawn photos (../shared is absent)"


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_audit(store: Path, name: str, selection: list[str], workers: int) -> tuple[float, float]:
    cpu, start = children_cpu(), time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bincount.cli", "audit", "--store", str(store), "--model", "bench",
                           *selection, "--name", name, "--workers", str(workers)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"audit failed: {done.stderr[-2000:]}")
    print(f"  audit said: {done.stdout.strip()}")
    return time.perf_counter() - start, children_cpu() - cpu


def run_requests(store: Path, workdir: Path) -> tuple[float, float, float]:
    server = start(ServeConfig(model=str(store / "models" / "bench"), port=0), workdir)
    try:
        photos = sorted((store / "raw" / "bin-images").glob("*.jpg"))
        server_cpu, client_cpu, start_time = process_cpu(server.proc.pid), own_cpu(), time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        for path in photos:
            body = json.dumps({"instances": [{"image": {"b64": base64.b64encode(path.read_bytes()).decode()}}]})
            conn.request("POST", "/v1/models/bincount:predict", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            answer = response.read()
            if response.status != 200:
                raise SystemExit(f"the server answered {response.status}: {answer[:200]!r}")
        wall = time.perf_counter() - start_time
        return wall, process_cpu(server.proc.pid) - server_cpu, own_cpu() - client_cpu
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=800)
    parser.add_argument("--workers", type=int, default=1, help="audit worker processes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bincount-audit-throughput-") as tmp:
        store = Path(tmp) / "store"
        what = fill(store, args.n)
        export_model(store)
        print(f"{what}; resnet18 at 224 px; {os.cpu_count()} CPU(s)")
        serve_wall, server_cpu, client_cpu = run_requests(store, Path(tmp) / "serve")
        fixed_wall, fixed_cpu = run_audit(store, "one", ["--ids", "000000"], 1)
        audit_wall, audit_cpu = run_audit(store, "bench", ["--all"], args.workers)
        n = args.n
        serve_rate, serve_ms = n / serve_wall, 1000 * (server_cpu + client_cpu) / n
        audit_rate, audit_ms = n / audit_wall, 1000 * audit_cpu / n
        steady_rate, steady_ms = (n - 1) / (audit_wall - fixed_wall), 1000 * (audit_cpu - fixed_cpu) / (n - 1)
        print(f"  {'':<34} {'images/s':>9} {'CPU ms/image':>13}")
        print(f"  {'sequential requests to serve':<34} {serve_rate:>9.1f} {serve_ms:>13.1f}   (server "
              f"{1000 * server_cpu / n:.1f}, client {1000 * client_cpu / n:.1f})")
        print(f"  {f'bincount audit, {args.workers} worker(s)':<34} {audit_rate:>9.1f} {audit_ms:>13.1f}   "
              "(the whole command)")
        print(f"  {'  less its fixed cost':<34} {steady_rate:>9.1f} {steady_ms:>13.1f}   (a one-photo audit took "
              f"{fixed_wall:.1f} s, {fixed_cpu:.1f} CPU s)")
        print(f"  ratio audit / serve, images/s: {audit_rate / serve_rate:.2f}x whole, {steady_rate / serve_rate:.2f}x "
              f"less the fixed cost; CPU per image serve / audit: {serve_ms / audit_ms:.2f}x whole, "
              f"{serve_ms / steady_ms:.2f}x less the fixed cost")
    return 0


if __name__ == "__main__":
    sys.exit(main())
