"""Shard formats: webdataset, mosaicml-streaming and litdata side by side against one S3 store (issue 13).

The same N drawn photos (224x224 RGB, 1-5 coloured rectangles, the label is their count, JPEG quality 90) are
packed by each library's own writer into a bucket on a real S3 server (moto, in its own process on 127.0.0.1,
so it does not share the benchmark's GIL), about 500 samples a shard:

  webdataset  wds.ShardWriter to a local tar, each finished tar uploaded with boto3 and deleted (`post=`);
  streaming   MDSWriter(out='s3://...'), endpoint from S3_ENDPOINT_URL;
  litdata     optimize(output_dir='s3://...', chunk_size=500, storage_options={'endpoint_url': ...}).

(litdata's writer cannot upload to an http:// endpoint, nor its reader download: see LITDATA_HTTP for the error
and the two workarounds used.) Each is then read back as training would: 2 ranks at once on one node (WORLD_SIZE=2,
one process each, as torchrun starts them; streaming needs both alive to rendezvous), each a DataLoader with 2
workers, batch 64, shuffled with a fixed seed, every JPEG decoded to a uint8 tensor with torchvision. webdataset
streams the tar bodies straight from boto3's get_object into `tar_file_expander` + `group_by_keys` (no local
disk); streaming and litdata download shards into the node's cache dir. Per library:

  pack s         the writer, upload included;
  ep1/ep2 img/s  both ranks' samples over the slower rank's epoch time (epoch 1 includes building the dataset:
                 index fetch, rendezvous; epoch 2 is the same processes again: warm cache, if any);
  1st batch s    dataset construction to the first batch, cold, slower rank (imports excluded);
  disk MB        peak bytes under the node's cache dir during the 2 epochs (sampled every 0.1 s);
  PSS MB         peak proportional set size of each rank's process and its workers, both ranks summed (RSS
                 would count the forked workers' shared torch pages once per worker);
  GETs           GET requests moto logged for both ranks' 2 epochs (webdataset's include one LIST per worker);
  distinct read  distinct samples both ranks read in epoch 1 (litdata drops a remainder to even the ranks);
  same order     a fresh process with the same seed yields epoch 1's first half in the same order;
  resume         that process saves the loader's state_dict mid-epoch and exits, a third process loads it and
                 reads the rest: y if first half + rest == the uninterrupted epoch, in order (webdataset has no
                 loader state: n).

    python benchmarks/shard_formats.py [--n 4000] [--per-shard 500] [--batch 64]

Measured 2026-12-05 (2 CPU cores shared with other engineers' jobs, so +-30% run to run), --n 4000 (11 KiB
mean JPEG, 45 MB), 500 a shard: pack s webdataset 2.8, streaming 4.9, litdata 0.9 (local then boto3);
epoch-1 img/s 707 / 693 / 755 (all three within noise: cold, every byte crosses the wire once); epoch-2 img/s
479 / 1126 / 1405 (streaming and litdata read their disk cache, 45 MB kept: 10 and 11 GETs for both epochs;
webdataset re-streams every shard, 24 GETs, 0 bytes on disk); first batch 1.9 / 3.3 / 3.0 s; PSS 1636 / 1418 /
1737 MB for 2 ranks x 3 processes; all three give the same order twice with one seed; streaming and litdata
resume mid-epoch exactly (half + rest == the uninterrupted epoch), webdataset has no loader state; litdata read
3968 of 4000 (drop_last across ranks). litdata needed both workarounds below to talk to moto over http://.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from importlib import import_module
from pathlib import Path

import numpy as np

from bincount.processes import free_port
from moto_process import count_gets, start_moto

LIBS = ("webdataset", "streaming", "litdata")
# litdata 0.2.76 moves chunks with obstore, built with explicit client_options that lack allow_http, so an
# http:// endpoint (moto here; MinIO inside a cluster) fails with "HTTP error: builder error ... BadScheme",
# and AWS_ALLOW_HTTP=true in the environment does not help (explicit client_options replace it). Workarounds
# here: optimize() to a local dir + boto3 upload; reads forced onto litdata's boto3 fallback (make_loader).
LITDATA_HTTP = "obstore refuses http:// endpoints"
BUCKET = "shards"
SEED = 17
SAMPLES: list[tuple[str, bytes, int]] = []  # filled before packing; litdata's forked workers inherit it


# ---------------------------------------------------------------- the store and the samples


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def draw(i: int) -> tuple[str, bytes, int]:
    """A 224x224 photo of `label` coloured rectangles on a coloured ground, JPEG q90."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(i)
    label = int(rng.integers(1, 6))
    img = Image.new("RGB", (224, 224), tuple(int(c) for c in rng.integers(0, 256, 3)))
    pen = ImageDraw.Draw(img)
    for _ in range(label):
        x, y = rng.integers(0, 170, 2)
        w, h = rng.integers(20, 54, 2)
        pen.rectangle([int(x), int(y), int(x + w), int(y + h)], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    # sensor-like noise, so the JPEG weighs what a photo does (flat rectangles alone compress to ~3 KiB)
    noisy = np.asarray(img, np.int16) + rng.integers(-10, 11, (224, 224, 3), dtype=np.int16)
    img = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return f"bin-{i:06d}", buf.getvalue(), label


# ---------------------------------------------------------------- writers (each library's documented way)


def pack_webdataset(endpoint: str, per_shard: int, tmp: Path) -> None:
    import webdataset as wds

    client = s3_client(endpoint)

    def upload(path: str) -> None:  # ShardWriter calls this after closing each shard
        client.upload_file(path, BUCKET, f"wds/{Path(path).name}")
        os.remove(path)

    with wds.ShardWriter(str(tmp / "shard-%06d.tar"), maxcount=per_shard, post=upload, verbose=0) as sink:
        for key, jpg, label in SAMPLES:
            sink.write({"__key__": key, "jpg": jpg, "cls": str(label).encode()})


def pack_streaming(endpoint: str, per_shard: int, tmp: Path) -> None:
    from streaming import MDSWriter

    # MDS flushes a shard at a byte limit, not a count: the limit that holds `per_shard` average samples.
    mean = sum(len(j) + len(k) + 8 for k, j, _ in SAMPLES) / len(SAMPLES)
    with MDSWriter(out=f"s3://{BUCKET}/mds", columns={"key": "str", "jpg": "bytes", "label": "int"},
                   size_limit=int(per_shard * (mean + 16))) as sink:
        for key, jpg, label in SAMPLES:
            sink.write({"key": key, "jpg": jpg, "label": label})


def _litdata_item(i: int) -> dict:
    key, jpg, label = SAMPLES[i]
    return {"key": key, "jpg": jpg, "label": label}


def pack_litdata(endpoint: str, per_shard: int, tmp: Path) -> None:
    """optimize() straight to s3:// fails against an http:// endpoint (see LITDATA_HTTP), so: to a local dir,
    then uploaded with boto3."""
    from litdata import optimize

    optimize(fn=_litdata_item, inputs=list(range(len(SAMPLES))), output_dir=str(tmp / "out"),
             chunk_size=per_shard, num_workers=1, start_method="fork", verbose=False)
    client = s3_client(endpoint)
    for f in sorted((tmp / "out").iterdir()):
        client.upload_file(str(f), BUCKET, f"litdata/{f.name}")


# ---------------------------------------------------------------- readers (run in a child process per rank)


def decode(key: str, jpg: bytes, label: int) -> dict:
    import torch
    from torchvision.io import decode_jpeg  # imported in the parent by make_loader, before the workers fork

    return {"key": key, "image": decode_jpeg(torch.frombuffer(bytearray(jpg), dtype=torch.uint8)), "label": label}


def wds_dataset(endpoint: str, seed: int):
    """Tar bodies streamed from get_object into webdataset's own tar expander and grouper: no local disk.
    Shards are shuffled per epoch, split by rank then by worker, samples shuffled in a 1000-sample buffer."""
    import torch.utils.data
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander

    class S3Tars(torch.utils.data.IterableDataset):
        epoch = 0

        def __iter__(self):
            rank, world, worker, workers = wds.utils.pytorch_worker_info()
            client = s3_client(endpoint)
            keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="wds/")["Contents"])
            random.Random(seed + self.epoch).shuffle(keys)
            mine = keys[rank::world][worker::workers]
            streams = ({"url": k, "stream": client.get_object(Bucket=BUCKET, Key=k)["Body"]} for k in mine)
            rng = random.Random(f"{seed}/{self.epoch}/{rank}/{worker}")
            for s in wds.shuffle(1000, initial=100, rng=rng)(group_by_keys(tar_file_expander(streams))):
                yield decode(s["__key__"], s["jpg"], int(s["cls"]))

    return S3Tars()


def make_loader(lib: str, endpoint: str, cache: str, batch: int):
    """(dataset, loader) as a training script would build them."""
    import torchvision.io  # noqa: F401  once, before the workers fork
    if lib == "webdataset":
        import torch.utils.data

        ds = wds_dataset(endpoint, SEED)
        return ds, torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=2)
    if lib == "streaming":
        from streaming import StreamingDataLoader, StreamingDataset

        class Decoded(StreamingDataset):
            def __getitem__(self, idx):
                s = super().__getitem__(idx)
                return decode(s["key"], s["jpg"], s["label"])

        ds = Decoded(remote=f"s3://{BUCKET}/mds", local=cache, shuffle=True, shuffle_seed=SEED, batch_size=batch)
        return ds, StreamingDataLoader(ds, batch_size=batch, num_workers=2)
    import litdata.streaming.downloader
    from litdata import StreamingDataLoader, StreamingDataset

    # See LITDATA_HTTP: mark obstore as started by another process, so every download takes litdata's boto3
    # path (the one it uses after a fork anyway). A private flag; without it each chunk download fails.
    litdata.streaming.downloader._OBSTORE_INIT_PID = -1
    ds = StreamingDataset(f"s3://{BUCKET}/litdata", cache_dir=cache, shuffle=True, seed=SEED,
                          storage_options={"endpoint_url": endpoint},
                          transform=lambda s: decode(s["key"], s["jpg"], s["label"]))
    return ds, StreamingDataLoader(ds, batch_size=batch, num_workers=2)


class Peaks(threading.Thread):
    """Samples bytes under `root` and the PSS of this process and its children (the loader's workers)."""

    def __init__(self, root: str):
        super().__init__(daemon=True)
        self.root, self.disk, self.pss, self.running = root, 0, 0, True

    @staticmethod
    def _pss(pid: int) -> int:
        try:
            return int(re.search(rb"Pss:\s+(\d+)", Path(f"/proc/{pid}/smaps_rollup").read_bytes())[1]) * 1024
        except (OSError, TypeError):
            return 0

    def run(self):
        while self.running:
            disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(self.root) for f in fs
                       if os.path.exists(os.path.join(d, f)))
            kids = [int(c) for t in Path("/proc/self/task").iterdir()
                    for c in (t / "children").read_text().split()]
            self.disk = max(self.disk, disk)
            self.pss = max(self.pss, self._pss(os.getpid()) + sum(self._pss(k) for k in kids))
            time.sleep(0.1)


def read_child(cfg: dict) -> dict:
    """One rank's reads. phase 'time': 2 full epochs; 'half': half of epoch 1 then the loader's state to a
    file; 'resume': load that state and read the rest of epoch 1."""
    lib, phase, rank, out = cfg["lib"], cfg["phase"], int(os.environ["RANK"]), {}
    state = Path(f"{cfg['state']}.{rank}") if "state" in cfg else None
    import torchvision.io  # noqa: F401  imports are not the library's cost: done before the clock starts
    import_module({"webdataset": "webdataset", "streaming": "streaming", "litdata": "litdata"}[lib])
    peaks = Peaks(cfg["cache"])
    peaks.start()
    t0 = time.perf_counter()
    ds, loader = make_loader(lib, cfg["endpoint"], cfg["cache"], cfg["batch"])
    if phase == "resume":
        loader.load_state_dict(json.loads(state.read_text()))
    for epoch in range(2 if phase == "time" else 1):
        if lib == "webdataset":  # streaming and litdata count epochs themselves, one per iter(loader)
            ds.epoch = epoch
        keys, start = [], time.perf_counter() if epoch else t0
        for batch in loader:
            if not keys:
                out.setdefault("first_batch_s", time.perf_counter() - t0)
            keys += list(batch["key"])
            if phase == "half" and len(keys) >= cfg["half"] and lib != "webdataset":
                state.write_text(json.dumps(loader.state_dict()))
                break
        out[f"epoch{epoch + 1}"] = {"s": time.perf_counter() - start, "keys": keys}
    peaks.running = False
    peaks.join()
    out.update(disk=peaks.disk, pss=peaks.pss)
    return out


def run_ranks(cfg: dict, tmp: str) -> list[dict]:
    """Both ranks at once, as torchrun starts them on one node: mosaicml-streaming rendezvouses the ranks
    through torch.distributed (env://) inside StreamingDataset(), so one rank alone would wait forever.
    The ranks share the node's cache dir, as each library intends."""
    cfg.setdefault("cache", tempfile.mkdtemp(prefix=f"{cfg['lib']}-{cfg['phase']}-", dir=tmp))
    base = dict(os.environ, WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", NNODES="1", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen([sys.executable, __file__, "--child", json.dumps(cfg)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(base, RANK=str(r), LOCAL_RANK=str(r), GLOBAL_RANK=str(r)))
             for r in (0, 1)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            raise RuntimeError(err.strip().splitlines()[-1] if err.strip() else f"rc {p.returncode}")
    return [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]


# ---------------------------------------------------------------- the run


def measure(lib: str, cfg: dict, log: Path) -> dict:
    row: dict = {}
    cfg, tmp = dict(cfg, lib=lib), cfg["tmp"]
    gets = count_gets(log)
    timed = run_ranks(dict(cfg, phase="time"), tmp)
    row["gets"] = count_gets(log) - gets
    for e in (1, 2):
        row[f"ep{e}"] = (sum(len(t[f"epoch{e}"]["keys"]) for t in timed)
                         / max(t[f"epoch{e}"]["s"] for t in timed))
    all_keys = timed[0]["epoch1"]["keys"] + timed[1]["epoch1"]["keys"]
    row["covered"] = f"{len(set(all_keys))}/{len(SAMPLES)}" + (" +dups" if len(set(all_keys)) < len(all_keys) else "")
    row.update(first=max(t["first_batch_s"] for t in timed), disk=timed[0]["disk"],
               pss=sum(t["pss"] for t in timed))
    refs = [t["epoch1"]["keys"] for t in timed]
    # the restart runs on the same node, with the cache dir the interrupted run left (litdata's state names it)
    state, cache = str(Path(tmp) / f"{lib}-state.json"), tempfile.mkdtemp(prefix=f"{lib}-restart-", dir=tmp)
    halves = [h["epoch1"]["keys"] for h in
              run_ranks(dict(cfg, phase="half", half=len(refs[0]) // 2, state=state, cache=cache), tmp)]
    row["same_order"] = all(h == ref[: len(h)] for h, ref in zip(halves, refs))
    if lib == "webdataset":
        row["resume"] = "n (no loader state)"
        return row
    rests = [r["epoch1"]["keys"] for r in run_ranks(dict(cfg, phase="resume", state=state, cache=cache), tmp)]
    verdicts = []
    for half, rest, ref in zip(halves, rests, refs):
        verdicts.append("y" if half + rest == ref else "samples ok, order differs" if sorted(half + rest) ==
                        sorted(ref) else f"n ({len(half)}+{len(rest)} of {len(ref)}, "
                        f"{len(set(half) & set(rest))} repeated)")
    row["resume"] = verdicts[0] if verdicts[0] == verdicts[1] else " / ".join(verdicts)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--per-shard", type=int, default=500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(read_child(json.loads(args.child))))
        return

    missing = [pkg for module, pkg in (("streaming", "mosaicml-streaming"), ("litdata", "litdata"), ("boto3", "boto3"))
               if importlib.util.find_spec(module) is None]
    if missing:
        sys.exit(f"shard_formats: the comparison needs {', '.join(missing)}: pip install {' '.join(missing)}")
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    with tempfile.TemporaryDirectory(prefix="shard-formats-") as tmp:
        log = Path(tmp) / "moto.log"
        moto, host = start_moto(log)
        endpoint = f"http://{host}"
        os.environ["S3_ENDPOINT_URL"] = endpoint  # mosaicml-streaming's documented way
        try:
            s3_client(endpoint).create_bucket(Bucket=BUCKET)
            t = time.perf_counter()
            SAMPLES.extend(draw(i) for i in range(args.n))
            size = sum(len(j) for _, j, _ in SAMPLES)
            print(f"{args.n} photos, {size / args.n / 1024:.1f} KiB mean, drawn in {time.perf_counter() - t:.1f} s; "
                  f"moto at {endpoint}", flush=True)
            cfg = {"endpoint": endpoint, "tmp": tmp, "batch": args.batch}
            rows = {}
            for lib in LIBS:
                work = Path(tmp) / f"pack-{lib}"
                work.mkdir()
                t = time.perf_counter()
                try:
                    globals()[f"pack_{lib}"](endpoint, args.per_shard, work)
                    pack_s = time.perf_counter() - t
                    objs = s3_client(endpoint).list_objects_v2(Bucket=BUCKET, Prefix={"webdataset": "wds/",
                                                               "streaming": "mds/", "litdata": "litdata/"}[lib])
                    rows[lib] = {"pack": pack_s, "objects": objs["KeyCount"], **measure(lib, cfg, log)}
                except Exception as e:  # a library that cannot talk to the store is a result, not a crash
                    rows[lib] = {"error": f"{type(e).__name__}: {e}"[:300]}
                print(f"{lib}: {rows[lib]}", flush=True)
        finally:
            moto.terminate()
            moto.wait(10)
    report(rows)


def report(rows: dict) -> None:
    cols = ("pack s", "objects", "ep1 img/s", "ep2 img/s", "1st batch s", "disk MB", "PSS MB", "GETs",
            "distinct read", "same order", "mid-epoch resume")
    print("\n" + "| library | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for lib, r in rows.items():
        if "error" in r:
            print(f"| {lib} | error: {r['error']} |")
            continue
        print(f"| {lib} | {r['pack']:.1f} | {r['objects']} | {r['ep1']:.0f} | {r['ep2']:.0f} | {r['first']:.2f} | "
              f"{r['disk'] / 2**20:.0f} | {r['pss'] / 2**20:.0f} | {r['gets']} | {r['covered']} | "
              f"{'y' if r['same_order'] else 'n'} | {r['resume']} |")
    base = rows.get("webdataset", {})
    if "error" not in base:
        print("\nrelative to webdataset (pack s and 1st batch s: lower is better; img/s: higher is better)")
        for lib, r in rows.items():
            if "error" not in r:
                print(f"  {lib:10s} pack {r['pack'] / base['pack']:.2f}x  ep1 {r['ep1'] / base['ep1']:.2f}x  "
                      f"ep2 {r['ep2'] / base['ep2']:.2f}x  1st batch {r['first'] / base['first']:.2f}x")


if __name__ == "__main__":
    main()
