"""Shard streaming against the image cache, per rank, from one S3 store (issue 13): side by side, ratios printed.

A bucket on a real S3 server (moto, in its own process on 127.0.0.1, so it does not share the benchmark's GIL)
holds `max(--n, --scale)` synthetic bins (`bincount data synthetic`, small photos: width 160-200, height 128-160
px, ~5 KiB JPEG) prepared as one train split (`balance none`, split 1,0,0) and packed once with `shards.pack` at
`--image-size` (64 px by default, to keep 2 cores busy for minutes, not hours; the trainer's default is 224).
The photos are generated and prepared in a local directory and only the photos and manifests uploaded: moto
answers ~350 requests/s on 2 shared cores, and the metadata PUTs and prepare's 2 GETs a photo are setup, not
what is measured. A dataset of N < all images is the first N/shard_samples shards of the packed one (a random
subset: packing shuffles) with its own manifest and index, so both paths read exactly the same images.

Each rank is its own process (RANK r of 2, started together and kept in step by a file barrier at the start of
every epoch, as DDP's first all-reduce would), with its own fresh node directory (TMPDIR and cache dir), as two
fresh nodes would have. A DataLoader with 2 workers delivers batches of 64 to an empty loop (no model, no
augmentation: the same transform cost would be added to both) for 2 epochs:

  cache    today's path: load the manifest, `ImageCache.fill(keys, 16)` (per-object GETs, decode, resize, .npy
           to local disk: every node fetches the whole split), then `BinImages` with a DistributedSampler
           (shuffle, seed 0) and drop_last;
  shards   `read_index`, then `ShardStream(shuffle=True, drop_last=True, rank, world)`: ranged GETs, no disk.

Printed:
  1st batch s     from the rank's start (imports done) to its first batch in hand, slower rank: a fresh node's
                  time to first step (the cache path includes the whole fill);
  epoch 1 end s   from the start to the end of epoch 1, slower rank (the cache fill included);
  ep1/ep2 img/s   both ranks' samples over the slower rank's epoch time;
  GETs            object GETs per rank, counted in the rank process and its workers (Store.get/open wrapped),
                  per epoch (the manifest or index included), and the GET lines moto logged for the whole run;
  RSS/PSS MB      peak of the rank process plus its loader workers (psutil, sampled every 0.1 s; RSS counts the
                  forked workers' shared pages once per process, PSS shares them out), per rank;
  disk MB         bytes under the rank's node directory at the end (the cache; for shards: anything at all) and
                  the peak under its TMPDIR (sampled).
The scale table runs rank 0 of 2 alone, one epoch, for each `--scale` size: RSS and disk per rank should be
flat for shards (disk 0, RSS within 10 %), and grow with the split for the cache.

    .venv/bin/python benchmarks/shard_stream.py [--n 20000] [--scale 10000,40000] [--image-size 64]
    smoke (~1-2 min): .venv/bin/python benchmarks/shard_stream.py --n 2000 --scale 1000,4000 --shard-samples 500

Measured 2026-12-05, 2 CPU cores, otherwise idle; defaults (--n 20000 --scale 10000,40000, 64 px, 9.5 min in
all; 40000 photos of 5.2 KiB, packed in 97 s at 414 images/s into 20 shards of 8.1 MiB, 4.15 KiB a sample):
  time to first step   cache 115.9 s (both nodes fetch all 20000 photos) / shards 0.58 s: 198x shorter (goal 10x)
  end of epoch 1       117.4 s / 4.2 s: 28x shorter (goal 5x); epoch-1 throughput 170 / 4790 img/s
  epoch 2              12831 / 5055 img/s: 0.39x (goal >= 1x: missed; see below)
  GETs a rank, epoch   20001 / 7-8 in epoch 1, 0 / 6-7 later; moto logged 40000 photo GETs / 26 ranged shard GETs
  per rank             peak RSS 1923 / 1797 MB, PSS 641 / 612 MB, disk 236.8 / 0 MB
  scale 10k -> 40k     cache: RSS +8.5 %, PSS +9.1 %, disk 118 -> 474 MB; shards: RSS +0.7 %, PSS +1.0 %, disk 0 -> 0
Later epochs: a warm cache reads 64 px raw arrays off local disk, shards decode JPEG and walk tar headers in
Python, ~0.2 ms a sample (one process: 15,400 vs 4,800 img/s at 64 px, 12,500 vs 1,900 at 224 px). Either is far
above what a CPU trains (Lite0 at 224: ~15 img/s on these 2 cores) and above what one GPU rank trains with the GPU
overlay's 6 loader workers; the raw arrays are also what fills a node's disk (150 KB a 224 px photo: 80 GB for
ABID, per node).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from moto_process import start_moto

BUCKET = "shard-stream"
DATASET = "bench"
CLASSES = [1, 2, 3, 4, 5]
BATCH = 64
LOADER_WORKERS = 2
FILL_THREADS = 16           # TrainConfig.prefetch_workers
SEED = 0
WORLD = 2


# ---------------------------------------------------------------- the store


class MotoLog:
    """GET lines moto logged since the last call: photos, shards, other objects (manifests, indexes)."""

    def __init__(self, path: Path):
        self.path, self.at = path, 0

    def gets(self) -> dict[str, int]:
        with self.path.open("rb") as f:
            f.seek(self.at)
            text = f.read()
        self.at += len(text)
        paths = re.findall(rb'GET /' + BUCKET.encode() + rb'/(\S+)', text)
        images = sum(p.startswith(b"raw/bin-images/") for p in paths)
        shard = sum(b"/shards/" in p and p.endswith(b".tar") for p in paths)
        return {"images": images, "shards": shard, "other": len(paths) - images - shard}


def du(root: Path) -> int:
    total = 0
    for d, _, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(d, f)).st_size
            except OSError:
                pass
    return total


# ---------------------------------------------------------------- setup: generate, prepare, upload, pack


def build(args, tmp: Path, uri: str) -> tuple[dict[int, str], dict]:
    """The packed dataset in the bucket, and a dataset name of each size measured."""
    from bincount.config import PrepareConfig, ShardConfig, SyntheticConfig
    from bincount.data import shards
    from bincount.data.prepare import dataset_key, prepare
    from bincount.data.synthetic import generate
    from bincount.store import open_store

    total = max([args.n, *args.scale])
    info: dict = {"total": total}
    local = tmp / "gen"
    t = time.perf_counter()
    generate(SyntheticConfig(dest=str(local), n=total, seed=0, width=(160, 200), height=(128, 160),
                             workers=args.gen_workers))
    prepare(PrepareConfig(store=str(local), name=DATASET, balance="none", split=(1.0, 0.0, 0.0), workers=8))
    info["generate_s"] = time.perf_counter() - t

    store = open_store(uri)
    photos = sorted((local / "raw" / "bin-images").iterdir())
    manifests = sorted((local / "datasets" / DATASET).iterdir())
    t = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: store.put_file(f"raw/bin-images/{p.name}", p), photos))
    for p in manifests:
        store.put_file(dataset_key(DATASET, p.name), p)
    info["upload_s"] = time.perf_counter() - t
    info["photo_bytes"] = sum(p.stat().st_size for p in photos)
    print(f"{total} photos ({info['photo_bytes'] / total / 1024:.1f} KiB mean) generated and prepared locally in "
          f"{info['generate_s']:.0f} s, uploaded in {info['upload_s']:.0f} s", flush=True)

    t = time.perf_counter()
    result = shards.pack(ShardConfig(store=uri, name=DATASET, image_size=args.image_size,
                                     shard_samples=args.shard_samples))
    info["pack_s"] = time.perf_counter() - t
    index = shards.read_index(store, DATASET, "train")
    sizes = [s.bytes for s in index.shards]
    info.update(shards=len(sizes), shard_bytes=sum(sizes), shard_min=min(sizes), shard_max=max(sizes))
    print(result.summary())
    print(f"pack: {info['pack_s']:.1f} s, {total / info['pack_s']:.0f} images/s; {len(sizes)} train shard(s) of "
          f"{min(sizes) / 2**20:.2f}-{max(sizes) / 2**20:.2f} MiB, {sum(sizes) / total / 1024:.2f} KiB a sample",
          flush=True)

    names = {}
    for n in sorted({args.n, *args.scale}):
        k = math.ceil(n / args.shard_samples)
        if k >= len(index.shards):
            names[n] = DATASET
            continue
        name = f"{DATASET}-{n}"
        sub = dataclasses.replace(index, shards=index.shards[:k], skipped=())
        items = sorted(sub.items(), key=lambda i: i.key)        # as prepare writes a manifest
        store.put_text(dataset_key(name, "train.jsonl"),
                       "".join(json.dumps({"key": i.key, "label": i.label}) + "\n" for i in items))
        sub = dataclasses.replace(sub, manifest_sha256=shards.manifest_digest(items))
        store.put_text(f"{shards.prefix(name, 'train')}/{shards.INDEX}", sub.to_json())   # reads bench's shards
        names[n] = name
    return names, info


# ---------------------------------------------------------------- one rank (a child process)


class Peaks(threading.Thread):
    """Peak RSS and PSS of this process plus its children (the loader workers), peak bytes under `tmp`."""

    def __init__(self, tmp: Path):
        super().__init__(daemon=True)
        self.tmp, self.rss, self.pss, self.tmp_peak, self.running = tmp, 0, 0, 0, True
        try:
            import psutil

            self.proc = psutil.Process()
            self.how = "psutil"
        except ImportError:
            self.proc, self.how = None, "getrusage max(self) + max(children)"

    @staticmethod
    def _pss(pid: int) -> int:
        try:
            return int(re.search(rb"Pss:\s+(\d+)", Path(f"/proc/{pid}/smaps_rollup").read_bytes())[1]) * 1024
        except (OSError, TypeError):
            return 0

    def sample(self) -> None:
        if self.proc is not None:
            procs = [self.proc]
            try:
                procs += self.proc.children(recursive=True)
            except Exception:
                pass
            rss = pss = 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                    pss += self._pss(p.pid)
                except Exception:
                    pass
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
        self.tmp_peak = max(self.tmp_peak, du(self.tmp))

    def run(self) -> None:
        while self.running:
            self.sample()
            time.sleep(0.1)

    def stop(self) -> None:
        self.running = False
        self.join()
        if self.proc is None:
            self.rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                        + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024


def barrier(where: Path, name: str, rank: int, ranks: list[int]) -> None:
    (where / f"{name}.{rank}").touch()
    while not all((where / f"{name}.{r}").exists() for r in ranks):
        time.sleep(0.01)


def child(cfg: dict) -> dict:
    import multiprocessing

    from torch.utils.data import DataLoader, DistributedSampler

    from bincount import store as stores
    from bincount.data import shards
    from bincount.data.dataset import BinImages, ImageCache, load_split

    gets = multiprocessing.Value("q", 0)        # shared with the forked loader workers

    def counted(method):
        def wrapper(self, *a, **k):
            with gets.get_lock():
                gets.value += 1
            return method(self, *a, **k)
        return wrapper

    stores.S3Store.get = counted(stores.S3Store.get)
    stores.S3Store.open = counted(stores.S3Store.open)

    rank, ranks, node = cfg["rank"], cfg["ranks"], Path(cfg["node"])
    peaks = Peaks(node / "tmp")
    peaks.start()
    out: dict = {"epochs": [], "rss_how": peaks.how}
    barrier(Path(cfg["barrier"]), "start", rank, ranks)
    t0 = time.perf_counter()
    store = stores.open_store(cfg["uri"])
    if cfg["mode"] == "cache":
        items = load_split(store, cfg["name"], "train", CLASSES)
        cache = ImageCache(store, node / "cache", cfg["image_size"])
        cache.fill([i.key for i in items], FILL_THREADS)
        out["fill_s"] = time.perf_counter() - t0
        data = BinImages(items, cache, CLASSES)
        epoched = DistributedSampler(data, num_replicas=WORLD, rank=rank, shuffle=True, seed=SEED)
        loader = DataLoader(data, batch_size=BATCH, sampler=epoched, num_workers=LOADER_WORKERS, drop_last=True)
    else:
        index = shards.read_index(store, cfg["name"], "train")
        epoched = data = shards.ShardStream(cfg["uri"], index, CLASSES, rank=rank, world=WORLD, batch_size=BATCH,
                                            shuffle=True, drop_last=True, seed=SEED)
        loader = DataLoader(data, batch_size=BATCH, num_workers=LOADER_WORKERS)
    for epoch in range(cfg["epochs"]):
        if epoch:
            barrier(Path(cfg["barrier"]), f"epoch{epoch}", rank, ranks)
        epoched.set_epoch(epoch)
        start, before = (t0, 0) if epoch == 0 else (time.perf_counter(), gets.value)
        n, first = 0, None
        for _, y in loader:
            if n == 0:
                first = time.perf_counter() - start
                out.setdefault("first_batch_s", first)
            n += len(y)
        out["epochs"].append({"s": time.perf_counter() - start, "samples": n, "gets": gets.value - before,
                              "first_s": first})
    peaks.stop()
    out.update(rss=peaks.rss, pss=peaks.pss, tmp_peak=peaks.tmp_peak, disk=du(node))
    return out


def run_ranks(cfg: dict, ranks: list[int], tmp: Path) -> list[dict]:
    """The ranks at once, each a fresh process with a fresh node directory."""
    meet = Path(tempfile.mkdtemp(prefix="barrier-", dir=tmp))
    procs = []
    for r in ranks:
        node = Path(tempfile.mkdtemp(prefix=f"node{r}-", dir=tmp))
        (node / "tmp").mkdir()
        c = dict(cfg, rank=r, ranks=ranks, node=str(node), barrier=str(meet))
        procs.append(subprocess.Popen([sys.executable, __file__, "--child", json.dumps(c)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=dict(os.environ, TMPDIR=str(node / "tmp"))))
    outs = [p.communicate(timeout=3600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            raise RuntimeError(f"rank failed (rc {p.returncode}):\n{err[-3000:]}")
    return [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]


# ---------------------------------------------------------------- the run


def summarize(runs: list[dict], moto: dict) -> dict:
    epochs = len(runs[0]["epochs"])
    row = {"first": max(r["first_batch_s"] for r in runs), "end1": max(r["epochs"][0]["s"] for r in runs),
           "fill": max(r.get("fill_s", 0.0) for r in runs), "rss": max(r["rss"] for r in runs),
           "pss": max(r["pss"] for r in runs), "disk": max(r["disk"] for r in runs),
           "tmp_peak": max(r["tmp_peak"] for r in runs), "moto": moto, "rss_how": runs[0]["rss_how"],
           "samples": [r["epochs"][0]["samples"] for r in runs]}
    for e in range(epochs):
        row[f"ep{e + 1}"] = sum(r["epochs"][e]["samples"] for r in runs) / max(r["epochs"][e]["s"] for r in runs)
        row[f"gets{e + 1}"] = [r["epochs"][e]["gets"] for r in runs]
        row[f"first{e + 1}"] = max(r["epochs"][e]["first_s"] for r in runs)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20000, help="train images for the throughput and first-step runs")
    p.add_argument("--scale", default="10000,40000", help="train images of each RSS/disk run, comma-separated")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--shard-samples", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--gen-workers", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    args.scale = [int(s) for s in args.scale.split(",") if s]

    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="shard-stream-") as tmp:
        tmp = Path(tmp)
        log = tmp / "moto.log"
        moto, endpoint = start_moto(log)
        os.environ.update(S3_ENDPOINT=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          S3_SECURE="0", AWS_REGION="us-east-1")
        try:
            from minio import Minio

            Minio(endpoint, access_key="testing", secret_key="testing", secure=False,
                  region="us-east-1").make_bucket(BUCKET)
            uri = f"s3://{BUCKET}"
            names, info = build(args, tmp, uri)
            mlog = MotoLog(log)
            mlog.gets()
            base = {"uri": uri, "image_size": args.image_size}
            main_rows, scale_rows = {}, {}
            for mode in ("cache", "shards"):
                t = time.perf_counter()
                runs = run_ranks(dict(base, mode=mode, name=names[args.n], epochs=args.epochs), [0, 1], tmp)
                main_rows[mode] = summarize(runs, mlog.gets())
                print(f"{mode} n={args.n}: {time.perf_counter() - t:.0f} s {main_rows[mode]}", flush=True)
            for n in args.scale:
                for mode in ("cache", "shards"):
                    t = time.perf_counter()
                    runs = run_ranks(dict(base, mode=mode, name=names[n], epochs=1), [0], tmp)
                    scale_rows[(n, mode)] = summarize(runs, mlog.gets())
                    print(f"{mode} scale {n}: {time.perf_counter() - t:.0f} s {scale_rows[(n, mode)]}", flush=True)
        finally:
            moto.terminate()
            moto.wait(10)
    report(args, info, main_rows, scale_rows, time.perf_counter() - began)


def report(args, info: dict, rows: dict, scale: dict, wall: float) -> None:
    mb = 2**20
    c, s = rows["cache"], rows["shards"]
    print(f"\n## n={args.n} train images, {args.image_size} px, 2 ranks x {LOADER_WORKERS} workers, batch {BATCH}, "
          f"{info['shards']} shards of {args.shard_samples} (whole pack of {info['total']}: {info['pack_s']:.1f} s, "
          f"{info['shard_bytes'] / mb:.1f} MiB); memory by {c['rss_how']}")
    cols = ["1st batch s", "epoch 1 end s", "fill s", "ep1 img/s"] + [f"ep{e} img/s" for e in range(2, args.epochs + 1)]
    cols += ["GETs/rank ep1"] + [f"GETs/rank ep{e}" for e in range(2, args.epochs + 1)]
    cols += ["moto GETs img/shard/other", "peak RSS MB/rank", "peak PSS MB/rank", "disk MB/rank", "TMPDIR peak B"]
    print("| path | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for mode, r in rows.items():
        cells = [f"{r['first']:.2f}", f"{r['end1']:.1f}", f"{r['fill']:.1f}" if mode == "cache" else "-"]
        cells += [f"{r[f'ep{e}']:.0f}" for e in range(1, args.epochs + 1)]
        cells += ["/".join(map(str, r[f"gets{e}"])) for e in range(1, args.epochs + 1)]
        m = r["moto"]
        cells += [f"{m['images']}/{m['shards']}/{m['other']}", f"{r['rss'] / mb:.0f}", f"{r['pss'] / mb:.0f}",
                  f"{r['disk'] / mb:.1f}", f"{r['tmp_peak']}"]
        print(f"| {mode} | " + " | ".join(cells) + " |")
    print(f"shards vs cache: time to first step {c['first'] / s['first']:.1f}x shorter (goal >= 10x); "
          f"to the end of epoch 1 {c['end1'] / s['end1']:.1f}x shorter (goal >= 5x); "
          + "; ".join(f"epoch {e} throughput {s[f'ep{e}'] / c[f'ep{e}']:.2f}x" for e in range(1, args.epochs + 1))
          + " (goal >= 1 after epoch 1)")
    print(f"samples/rank/epoch: cache {c['samples']}, shards {s['samples']}; first batch of each later epoch "
          f"(worker start, shuffle buffer): cache " + ", ".join(f"{c[f'first{e}']:.2f}" for e in range(2, args.epochs + 1))
          + " s, shards " + ", ".join(f"{s[f'first{e}']:.2f}" for e in range(2, args.epochs + 1)) + " s")

    print(f"\n## scale: rank 0 of 2 alone, 1 epoch, fresh node each")
    cols = ["train images", "path", "epoch 1 end s", "GETs", "peak RSS MB", "peak PSS MB", "disk MB", "TMPDIR peak B"]
    print("| " + " | ".join(cols) + " |")
    print("|---" * len(cols) + "|")
    for (n, mode), r in sorted(scale.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"| {n} | {mode} | {r['end1']:.1f} | {r['gets1'][0]} | {r['rss'] / mb:.0f} | {r['pss'] / mb:.0f} | "
              f"{r['disk'] / mb:.1f} | {r['tmp_peak']} |")
    if len(args.scale) > 1:
        lo, hi = min(args.scale), max(args.scale)
        for mode in ("cache", "shards"):
            a, b = scale[(lo, mode)], scale[(hi, mode)]
            print(f"{mode}: {lo} -> {hi} images: RSS {100 * (b['rss'] / a['rss'] - 1):+.1f} %, PSS "
                  f"{100 * (b['pss'] / a['pss'] - 1):+.1f} %, disk {a['disk'] / mb:.1f} -> {b['disk'] / mb:.1f} MB")
    print(f"\nwhole run {wall / 60:.1f} min (setup: generate+prepare {info['generate_s']:.0f} s, upload "
          f"{info['upload_s']:.0f} s, pack {info['pack_s']:.0f} s)")


if __name__ == "__main__":
    main()
