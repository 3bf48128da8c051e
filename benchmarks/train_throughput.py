"""Training throughput on the real ABID sample: the seed's way against ours, side by side, ratios printed.

1. Full fine-tune, images/s of whole training steps (data loading included) at 224 px:
   seed-style: fp32, NCHW, every image decoded from the original JPEG with PIL and transformed as PIL images;
   ours:       the local cache pre-resized to shorter side 256, uint8 augmentation, channels_last, bf16 autocast
               (where the hardware has bf16; `--precision` to force), the trainer's own dataset and transforms.
2. Frozen backbone, wall time of 3 epochs with the real trainer (`bincount.train.loop.train`):
   seed-style: the full forward every epoch (fp32, NCHW, original JPEGs); ours: the feature cache (computed
   once, including the image cache fill and the extraction), then 3 head epochs.

    .venv/bin/python benchmarks/train_throughput.py [--archs resnet18,resnet50] [--steps 4] [--images 407]
    on a GPU: --device cuda --archs resnext101_32x8d --batch-size 128 --peak-tflops 989   (H100/H200 dense bf16)
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms as T

from bincount.config import PrepareConfig, TrainConfig
from bincount.data.dataset import BinImages, ImageCache, Item
from bincount.data.prepare import prepare
from bincount.store import open_store
from bincount.devices import pick_device
from bincount.model.exported import Preprocessing
from bincount.model.zoo import IMAGENET_MEAN, IMAGENET_STD, build_model
from bincount.train import presets
from bincount.train.distributed import Dist
from bincount.train.loop import resolve, train

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "abid-sample"


class SeedStyleImages(Dataset):
    """What the seed did: PIL decode of the original JPEG, PIL resize, flip, ToTensor, Normalize, every epoch."""

    def __init__(self, paths: list[Path], labels: list[int], size: int):
        self.paths, self.labels = paths, labels
        self.transform = T.Compose([T.Resize((size, size)), T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), self.labels[i]


def make_store(root: Path, limit: int) -> tuple[str, list[Item]]:
    """The sample copied into a scratch store in the ABID layout, prepared as dataset `sample`."""
    keys = sorted(p.stem for p in (SAMPLE / "metadata").glob("*.json"))[:limit]
    for sub, ext in (("bin-images", "jpg"), ("metadata", "json")):
        (root / "raw" / sub).mkdir(parents=True, exist_ok=True)
        for key in keys:
            shutil.copyfile(SAMPLE / sub / f"{key}.{ext}", root / "raw" / sub / f"{key}.{ext}")
    prepare(PrepareConfig(store=str(root), name="sample", balance="none", split=(0.8, 0.2, 0.0)))
    items = [Item(**json.loads(line)) for line in (root / "datasets/sample/train.jsonl").read_text().splitlines()]
    return str(root), items


def images_per_second(arch: str, loader: DataLoader, prepare_batch, precision: str, channels_last: bool,
                      device: torch.device, steps: int) -> float:
    """Whole optimizer steps (next batch, forward, backward, update) after one warmup step."""
    torch.manual_seed(0)
    model, _ = build_model(arch, 5, "none")
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    batches = iter(loader)
    seen, start = 0, 0.0
    for step in range(steps + 1):
        if step == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, seen = time.perf_counter(), 0
        x, y = next(batches)
        x, y = prepare_batch(x), y.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def train_flops_per_image(arch: str, size: int) -> float:
    model, _ = build_model(arch, 5, "none")
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(torch.zeros(2, 3, size, size)), torch.zeros(2, dtype=torch.long)
                                          ).backward()
    return counter.get_total_flops() / 2


def fine_tune(args, store: str, items: list[Item], tmp: Path, device: torch.device, precision: str) -> list[dict]:
    rows = []
    labels = [item.label - 1 for item in items]
    cache = ImageCache(open_store(store), tmp / "cache", 224)
    preprocessing = Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD)
    start = time.perf_counter()
    cache.fill([item.key for item in items], 16)
    fill_s = time.perf_counter() - start
    need = args.batch_size * (args.steps + 1)
    reps = -(-need // len(items))
    for arch in args.archs.split(","):
        seed = SeedStyleImages([Path(store) / "raw/bin-images" / f"{item.key}.jpg" for item in items] * reps,
                               labels * reps, 224)
        ours = BinImages(items * reps, cache, range(1, 6), presets.train_transform("counting"))
        common = dict(batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                      pin_memory=device.type == "cuda", drop_last=True)
        base = fast = 0.0
        for _ in range(args.repeats):       # alternating, best of each: a busy machine slows both alike
            base = max(base, images_per_second(arch, DataLoader(seed, **common), lambda x: x.to(device), "fp32",
                                               False, device, args.steps))
            fast = max(fast, images_per_second(arch, DataLoader(ours, **common),
                                               lambda x: preprocessing.normalize(x, device, channels_last=True),
                                               precision,
                                               True, device, args.steps))
        row = {"arch": arch, "seed_style_img_s": round(base, 2), "ours_img_s": round(fast, 2),
               "ratio": round(fast / base, 2), "precision": precision, "cache_fill_s": round(fill_s, 2)}
        if args.peak_tflops:
            flops = train_flops_per_image(arch, 224)
            row["ours_fraction_of_peak"] = round(fast * flops / (args.peak_tflops * 1e12), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def frozen(args, store: str, tmp: Path) -> dict:
    common = dict(store=store, dataset="sample", arch=args.frozen_arch, weights="none", freeze="backbone",
                  image_size=224, epochs=3, batch_size=args.batch_size, seed=0, device=args.device)
    start = time.perf_counter()
    train(TrainConfig(run="seed-style", feature_cache=False, precision="fp32", channels_last=False,
                      augment="flip", cache_dir=str(tmp / "frozen-seed"), **common))
    base = time.perf_counter() - start
    start = time.perf_counter()
    train(TrainConfig(run="feature-cache", feature_cache=True, precision=args.precision,
                      cache_dir=str(tmp / "frozen-ours"), **common))
    fast = time.perf_counter() - start
    row = {"arch": args.frozen_arch, "epochs": 3, "seed_style_s": round(base, 1), "ours_s": round(fast, 1),
           "ratio": round(base / fast, 2)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="resnet18,resnet50")
    parser.add_argument("--frozen-arch", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per measurement (after one warmup)")
    parser.add_argument("--repeats", type=int, default=2, help="fine-tune measurements per side (best counts)")
    parser.add_argument("--images", type=int, default=407, help="how many sample images to use")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers for both sides")
    parser.add_argument("--precision", default="auto", help="ours: auto, bf16, fp16 or fp32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--peak-tflops", type=float, help="the accelerator's dense bf16 peak, for the fraction")
    parser.add_argument("--skip", choices=["fine-tune", "frozen"], action="append", default=[])
    args = parser.parse_args()
    if not (SAMPLE / "metadata").is_dir():
        raise SystemExit(f"the ABID sample is not at {SAMPLE}")
    device = pick_device(args.device)
    precision = resolve(TrainConfig(store="", dataset="", run="x", precision=args.precision),
                        Dist(0, 0, 1, 1, device)).precision
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, ours in {precision}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="bincount-bench-") as tmp:
        store, items = make_store(Path(tmp) / "store", args.images)
        results = {}
        if "fine-tune" not in args.skip:
            results["fine_tune"] = fine_tune(args, store, items, Path(tmp), device, precision)
        if "frozen" not in args.skip:
            results["frozen_3_epochs"] = frozen(args, store, Path(tmp))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
