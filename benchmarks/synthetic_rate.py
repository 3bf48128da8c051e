"""Synthetic source speed: images per second on one core, ours against a naive camera, and against the goal.

Ours draws each scene at a reduced size, adds noise from a precomputed tile, and lets the upscale do the blur.
The naive baseline draws the same scenes (same seeds, same draws) at full size, blurs the full image with
PIL's GaussianBlur and adds fresh per-pixel numpy noise. CPU time (time.process_time) is the figure that
counts, because other jobs may share the cores; wall time is printed beside it.

    python benchmarks/synthetic_rate.py [--n 500] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Callable
from unittest import mock

import numpy as np
from PIL import Image, ImageFilter

from bincount.config import SyntheticConfig
from bincount.data import synthetic
from bincount.data.synthetic import generate, make_bin

GOAL = 200.0


def naive_photograph(img: Image.Image, rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    """The straightforward camera: full-resolution Gaussian blur and per-pixel normal noise."""
    img = img.resize(size, Image.BILINEAR).filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 1.3)))
    sigma = synthetic.NOISE_SIGMAS[rng.integers(len(synthetic.NOISE_SIGMAS))]
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0.0, sigma, (size[1], size[0], 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=int(rng.integers(72, 93)))
    return out.getvalue()


def timed(run: Callable[[], object]) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = SyntheticConfig(dest="unused", n=args.n, seed=args.seed)
    make_bin(cfg, args.n)  # builds the noise tiles once, as every process does before its first image

    rows = {"ours, in memory": timed(lambda: [make_bin(cfg, i) for i in range(args.n)])}
    with tempfile.TemporaryDirectory() as tmp:
        store_cfg = SyntheticConfig(dest=tmp, n=args.n, seed=args.seed)
        rows["ours, into a local store"] = timed(lambda: generate(store_cfg))
    with mock.patch.object(synthetic, "ZOOM", (1.0, 1.0)), \
            mock.patch.object(synthetic, "_photograph", naive_photograph):
        rows["naive, in memory"] = timed(lambda: [make_bin(cfg, i) for i in range(args.n)])

    print(f"\nsynthetic generation, {args.n} images, one process")
    print(f"{'':28s}{'cpu s':>8s}{'img/s cpu':>11s}{'wall s':>8s}{'img/s wall':>12s}")
    for name, (cpu, wall) in rows.items():
        print(f"{name:28s}{cpu:8.2f}{args.n / cpu:11.0f}{wall:8.2f}{args.n / wall:12.0f}")
    ours, naive = rows["ours, in memory"][0], rows["naive, in memory"][0]
    stored = args.n / rows["ours, into a local store"][0]
    print(f"speed-up of ours over naive (in memory, cpu): {naive / ours:.2f}x")
    print(f"ours into a local store: {stored:.0f} images/s cpu = {stored / GOAL:.2f}x the goal of {GOAL:.0f}")


if __name__ == "__main__":
    main()
