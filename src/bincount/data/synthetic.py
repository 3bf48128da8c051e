"""Offline data source: procedurally drawn warehouse-bin photos with ABID-format metadata.

The whole system has to run without the network, so this source stands in for ABID: a bin seen from above
(floor, walls, stickers, elastic bands and tape as distractors) holding 1–5 items of varied shape, colour and
size, with shadows, uneven light, blur, sensor noise and JPEG compression. It is built so that only counting
explains the label: item size shrinks as the count grows, so the covered area says little, and background,
palette and lighting are drawn independently of the count, so colour statistics say nothing. Items keep most
of their outline visible so that a small CNN can learn to count them at 128 px.

Image i depends only on (seed, i): any number of worker processes writes the same bytes. Speed (hundreds of
images per second per core) comes from drawing the scene at a reduced size with PIL polygons and upscaling it
(the upscale is the lens blur) and from a noise tile made once per process and cropped at a random offset.
"""

from __future__ import annotations

import colorsys
import io
import json
import math
import multiprocessing
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageChops, ImageDraw
from tqdm import tqdm

from bincount.config import SyntheticConfig
from bincount.errors import ConfigError
from bincount.store import Store, open_store

IMAGES = "raw/bin-images"
METADATA = "raw/metadata"
MAX_ITEMS = 5
MAX_SIDE = 1024                 # largest image side accepted
ZOOM = (1.8, 2.8)               # output size / drawing size; larger zooms give blurrier photos
NOISE_TILE = int(MAX_SIDE / ZOOM[0]) + 1
NOISE_SIGMAS = (2.5, 5.0)       # sensor noise levels, one precomputed tile each
MIN_VISIBLE = 0.8               # share of an item's area that later items may not cover...
MIN_VISIBLE_TWIN = 0.9          # ...or, for a later unit of the same SKU, whose outline would merge with it
MIN_INSIDE = 0.9                # share of an item's area that must lie within the photo
MIN_ITEM = 1 / 6                # an item's long side, as a share of the image's short side, at least...
MIN_SCALE = 0.8                 # ...times the most an item may shrink to find room
GRID = 0.5                      # the layout's occupancy grid, relative to the drawing size
PLACEMENT_TRIES = 40

Colour = tuple[float, float, float]
Part = tuple[np.ndarray, tuple, "tuple | None"]


@dataclass(frozen=True)
class Sku:
    """One product's look: polygons in a unit box centred on 0, stretched to `size` when drawn."""

    kind: str
    size: tuple[float, float]
    shape: tuple[np.ndarray, ...]
    parts: tuple[Part, ...]
    asin: str
    name: str


@dataclass(frozen=True)
class Item:
    """One unit in the bin; `inside`: share of its area within the photo, `visible`: share no later item covers."""

    sku: int
    center: tuple[float, float]
    angle: float
    scale: float
    inside: float
    visible: float


@dataclass(frozen=True)
class SyntheticBin:
    """One generated pair and the layout behind it (drawing-pixel coordinates), which the tests inspect."""

    key: str
    count: int
    jpeg: bytes
    metadata: dict
    items: tuple[Item, ...]
    skus: tuple[Sku, ...]
    floor: tuple[float, float, float, float]
    drawing_size: tuple[int, int]
    coverage: float


@dataclass
class SyntheticResult:
    dest: str
    seed: int
    counts: dict[int, int]
    seconds: float
    workers: int

    @property
    def images(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        rate = self.images / self.seconds if self.seconds > 0 else float("inf")
        lines = [f"wrote {self.images} synthetic bins (seed {self.seed}) to {self.dest} in {self.seconds:.1f} s: "
                 f"{rate:.0f} images/s with {self.workers} worker{'s' if self.workers != 1 else ''}"]
        lines += [f"  {count} item{'s' if count != 1 else ' '}: {n} images" for count, n in sorted(self.counts.items())]
        return "\n".join(lines)


def generate(cfg: SyntheticConfig) -> SyntheticResult:
    validate(cfg)
    store = open_store(cfg.dest)
    store.check(write=True)
    counts: Counter[int] = Counter()
    start = time.perf_counter()
    with tqdm(total=cfg.n, desc="synthetic", unit="img", file=sys.stderr) as bar:
        for count in _write_all(cfg, store):
            counts[count] += 1
            bar.update()
    return SyntheticResult(store.url("raw/"), cfg.seed, dict(sorted(counts.items())),
                           time.perf_counter() - start, min(cfg.workers, cfg.n))


def validate(cfg: SyntheticConfig) -> None:
    if cfg.n < 1:
        raise ConfigError(f"synthetic: n must be at least 1, got {cfg.n}")
    if cfg.seed < 0:
        raise ConfigError(f"synthetic: seed must be 0 or more, got {cfg.seed}")
    if cfg.workers < 1:
        raise ConfigError(f"synthetic: workers must be at least 1, got {cfg.workers}")
    if not 1 <= cfg.min_count <= cfg.max_count <= MAX_ITEMS:
        raise ConfigError(f"synthetic: item counts must satisfy 1 <= min_count <= max_count <= {MAX_ITEMS}, "
                          f"got min_count={cfg.min_count} max_count={cfg.max_count}")
    for name in ("width", "height"):
        lo, hi = getattr(cfg, name)
        if not 128 <= lo <= hi <= MAX_SIDE:
            raise ConfigError(f"synthetic: {name} range must satisfy 128 <= low <= high <= {MAX_SIDE}, "
                              f"got {lo},{hi}")


def key_of(seed: int, i: int) -> str:
    return f"synth-{seed}-{i:06d}"


class _Writer:
    def __init__(self, cfg: SyntheticConfig, store: Store):
        self.cfg = cfg
        self.store = store

    def __call__(self, i: int) -> int:
        b = make_bin(self.cfg, i)
        write_bin(self.store, b)
        return b.count


_worker: _Writer | None = None


def _start_worker(cfg: SyntheticConfig) -> None:
    global _worker
    _worker = _Writer(cfg, open_store(cfg.dest))


def _write_in_worker(i: int) -> int:
    assert _worker is not None
    return _worker(i)


def _write_all(cfg: SyntheticConfig, store: Store) -> Iterator[int]:
    """The item count of each bin written, in completion order."""
    workers = min(cfg.workers, cfg.n)
    if workers == 1:
        yield from map(_Writer(cfg, store), range(cfg.n))
        return
    chunk = max(1, min(64, cfg.n // (workers * 8)))
    with multiprocessing.get_context("spawn").Pool(workers, _start_worker, (cfg,)) as pool:
        yield from pool.imap_unordered(_write_in_worker, range(cfg.n), chunk)


def write_bin(store: Store, b: SyntheticBin) -> None:
    """Image first, metadata last: readers iterate metadata, so its presence marks a complete pair."""
    store.put(f"{IMAGES}/{b.key}.jpg", b.jpeg)
    store.put(f"{METADATA}/{b.key}.json", json.dumps(b.metadata, indent=4, sort_keys=True).encode("utf-8"))


def make_bin(cfg: SyntheticConfig, i: int) -> SyntheticBin:
    """The i-th bin of `cfg.seed`; the draws happen in a fixed order so the bytes depend on (seed, i) only."""
    rng = np.random.default_rng([cfg.seed, i])
    key = key_of(cfg.seed, i)
    count = int(rng.integers(cfg.min_count, cfg.max_count + 1))
    size = (int(rng.integers(cfg.width[0], cfg.width[1] + 1)), int(rng.integers(cfg.height[0], cfg.height[1] + 1)))
    zoom = rng.uniform(*ZOOM)
    drawing_size = (round(size[0] / zoom), round(size[1] / zoom))

    img = Image.new("RGB", drawing_size)
    draw = ImageDraw.Draw(img, "RGBA")
    floor, floor_colour = _draw_bin(draw, img, rng)
    skus, assignment = _make_skus(rng, count, floor, floor_colour, min(size) / zoom)
    items, coverage = _layout(rng, skus, assignment, floor, drawing_size)
    _draw_items(draw, rng, skus, items)
    _draw_bands(draw, rng, drawing_size)
    img = _light(img, rng)
    jpeg = _photograph(img, rng, size)
    quantities = Counter(assignment)
    inches_per_px = rng.uniform(15.0, 22.0) / (floor[2] - floor[0])
    metadata = _metadata(rng, key, [skus[s] for s in sorted(quantities)], [quantities[s] for s in sorted(quantities)],
                         inches_per_px)
    return SyntheticBin(key, count, jpeg, metadata, tuple(items), tuple(skus), floor, drawing_size, coverage)


# ---- the bin: walls, floor, stickers ------------------------------------------------------------------------

def _rgb(c: Colour, f: float = 1.0, alpha: int | None = None) -> tuple[int, ...]:
    v = tuple(min(255, max(0, int(x * f))) for x in c)
    return v if alpha is None else (*v, alpha)


def _hsv(h: float, s: float, v: float) -> Colour:
    r, g, b = colorsys.hsv_to_rgb(float(h) % 1.0, float(s), float(v))
    return r * 255, g * 255, b * 255


def _wall_colour(rng: np.random.Generator) -> Colour:
    """Mostly ABID's yellow cardboard, sometimes grey, white or coloured plastic."""
    if rng.random() < 0.55:
        return _hsv(rng.uniform(0.10, 0.16), rng.uniform(0.25, 0.55), rng.uniform(0.75, 0.97))
    return _hsv(rng.uniform(), rng.uniform(0.0, 0.45), rng.uniform(0.45, 0.95))


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], dtype=float)


def _rounded(rx: float, ry: float, power: float, cx: float = 0.0, cy: float = 0.0, n: int = 28) -> np.ndarray:
    """A superellipse: power 2 is an ellipse, larger powers approach a rectangle with rounded corners."""
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    e = 2.0 / power
    return np.stack([cx + rx * np.sign(c) * np.abs(c) ** e, cy + ry * np.sign(s) * np.abs(s) ** e], axis=1)


def _flat(points: np.ndarray) -> list[float]:
    return points.ravel().tolist()


def _draw_bin(draw: ImageDraw.ImageDraw, img: Image.Image,
              rng: np.random.Generator) -> tuple[tuple[float, float, float, float], Colour]:
    """Walls in perspective around a floor (returned with its colour, in drawing pixels), and the stickers."""
    w, h = img.size
    wall = _wall_colour(rng)
    if rng.random() < 0.7:
        floor_colour = _rgb(wall, rng.uniform(0.5, 0.95))
    else:
        floor_colour = _rgb(_wall_colour(rng), rng.uniform(0.5, 0.9))
    x0, x1 = w * rng.uniform(0.02, 0.12), w * (1 - rng.uniform(0.02, 0.12))
    y0, y1 = h * rng.uniform(0.06, 0.18), h * (1 - rng.uniform(0.07, 0.17))
    draw.rectangle((0, 0, w, h), fill=_rgb(wall))
    walls = (((0, 0), (w, 0), (x1, y0), (x0, y0)), ((0, 0), (x0, y0), (x0, y1), (0, h)),
             ((w, 0), (w, h), (x1, y1), (x1, y0)), ((0, h), (x0, y1), (x1, y1), (w, h)))
    for poly, shade in zip(walls, rng.uniform(0.72, 1.08, 4)):
        draw.polygon(poly, fill=_rgb(wall, shade))
    draw.rectangle((x0, y0, x1, y1), fill=_rgb(floor_colour))
    for _ in range(rng.integers(0, 3)):
        x = rng.uniform(x0, x1)
        draw.line((x, y0, x + rng.uniform(-0.1, 0.1) * w, y1), fill=_rgb(floor_colour, 0.85, 110), width=1)
    if rng.random() < 0.5:
        draw.rectangle((0, 0, w, h * rng.uniform(0.0, 0.06)), fill=_rgb(wall, rng.uniform(0.15, 0.4)))
    _sticker(draw, img, rng, (w * rng.uniform(0.25, 0.65), y1 + (h - y1) * rng.uniform(0.15, 0.3)), (h - y1) * 0.7)
    if rng.random() < 0.7:
        _sticker(draw, img, rng, (w * rng.uniform(0.25, 0.65), y0 * rng.uniform(-0.3, 0.2)), y0 * 0.7)
    return (x0, y0, x1, y1), floor_colour


def _sticker(draw: ImageDraw.ImageDraw, img: Image.Image, rng: np.random.Generator,
             corner: tuple[float, float], height: float) -> None:
    """The bin's label: a coloured tag with a bin code and a QR square; present in every class alike."""
    x, y = corner
    height = max(height, 6.0)
    width = height * rng.uniform(2.2, 3.2)
    paper = _hsv(rng.uniform(), rng.uniform(0.0, 0.5), rng.uniform(0.85, 1.0))
    draw.rectangle((x, y, x + width, y + height), fill=_rgb(paper))
    ink = _rgb((30, 30, 40))
    gx = x + height * 0.2
    for _ in range(3):
        gw = height * rng.uniform(0.25, 0.45)
        draw.rectangle((gx, y + height * 0.25, gx + gw, y + height * 0.8), fill=ink)
        gx += gw + height * 0.15
    side = max(int(height * 0.8), 3)
    qr = Image.fromarray((rng.random((7, 7)) < 0.5).astype(np.uint8) * 255).resize((side, side), Image.NEAREST)
    img.paste(qr.convert("RGB"), (int(x + width - side - height * 0.1), int(y + height * 0.1)))


# ---- the items ------------------------------------------------------------------------------------------------

KINDS = ("box", "pack", "bottle", "bag", "tub", "book", "blister")
ASPECTS = {"box": (1.0, 2.0), "pack": (1.0, 1.7), "bottle": (2.0, 3.0), "bag": (1.0, 1.5), "tub": (1.0, 1.15),
           "book": (1.2, 1.6), "blister": (1.2, 1.8)}
AREA = {"box": 1.0, "pack": 0.9, "bottle": 0.75, "bag": 0.75, "tub": 0.79, "book": 1.0, "blister": 0.95}
NOUNS = {"box": ("Storage Box", "LED Bulb 4-Pack", "Tea Sampler", "Jigsaw Puzzle", "Board Game"),
         "pack": ("Coffee Beans", "Protein Powder", "Trail Mix", "Dog Treats", "Bath Salts"),
         "bottle": ("Shampoo", "Vitamin D3 Softgels", "Hand Sanitizer", "Water Bottle", "Olive Oil"),
         "bag": ("Cotton T-Shirt", "Yoga Pants", "Fleece Scarf", "Kids Hoodie", "Rain Poncho"),
         "tub": ("Coconut Oil", "Scented Candle", "Tennis Balls", "Face Cream", "Cat Litter Tub"),
         "book": ("Paperback Novel", "Blu-ray", "Spiral Notebook", "Cookbook", "Colouring Book"),
         "blister": ("USB-C Cable", "Earbuds", "Phone Charger", "Screwdriver Set", "Batteries")}
BRANDS = ("Acme", "Northwind", "Bluebird", "Evergreen", "Summit", "Harbor", "Pioneer", "Maple & Co.", "Orbit")
VARIANTS = ("Large", "Small", "Pack of 2", "Assorted", "Travel Size", "Classic", "Blue", "Black", "Red")
ASIN_CHARS = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))


def _item_colour(rng: np.random.Generator, avoid: Colour) -> Colour:
    """Any hue, but never so close to the floor that the item's outline disappears."""
    colour = _hsv(rng.uniform(), rng.uniform(0.1, 0.9), rng.uniform(0.3, 0.97))
    for _ in range(8):
        if math.dist(colour, avoid) > 90:
            break
        colour = _hsv(rng.uniform(), rng.uniform(0.1, 0.9), rng.uniform(0.3, 0.97))
    return colour


def _looks(kind: str, rng: np.random.Generator, main: Colour):
    """Silhouette polygons and decorated parts of one product, in unit-box coordinates.

    The first part is the body; its dark outline and the shadow make each item one coherent blob. Decorations
    are shades of the body colour, so that at 128 px a label or a cap does not read as a separate item.
    """
    edge = _rgb(main, 0.4)
    darker, lighter = _rgb(main, rng.uniform(0.72, 0.85)), _rgb(main, rng.uniform(1.15, 1.3))
    if kind == "box":
        body = _rect(-0.5, -0.5, 0.5, 0.5)
        side = rng.uniform(0.06, 0.16)
        parts = [(body, _rgb(main), edge), (_rect(-0.5, 0.5 - side, 0.5, 0.5), darker, None)]
        if rng.random() < 0.7:
            lx, ly = rng.uniform(-0.42, 0.0, 2)
            parts.append((_rect(lx, ly, lx + rng.uniform(0.25, 0.4), ly + rng.uniform(0.2, 0.35)), lighter, None))
        return (body,), parts
    if kind == "pack":
        body = _rounded(0.5, 0.5, rng.uniform(3.5, 6.0))
        return (body,), [(body, _rgb(main), edge), (_rect(-0.44, -0.47, 0.44, -0.36), darker, None),
                         (_rounded(0.24, 0.18, 2, 0, rng.uniform(-0.1, 0.2)), lighter, None)]
    if kind == "bottle":
        body = _rounded(0.5, 0.36, 3, 0, 0.14)
        neck = _rect(-0.18, -0.38, 0.18, -0.2)
        cap = _rect(-0.22, -0.5, 0.22, -0.36)
        return (body, neck, cap), [(cap, darker, edge), (neck, _rgb(main), edge), (body, _rgb(main), edge),
                                   (_rect(-0.42, 0.02, 0.42, 0.32), lighter, None)]
    if kind == "bag":
        n = 14
        t = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(-0.12, 0.12, n)
        r = 0.5 * rng.uniform(0.85, 1.0, n)
        body = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
        parts = [(body, _rgb(main), edge)]
        for _ in range(3):
            y = rng.uniform(-0.35, 0.3)
            parts.append((_rect(-0.3, y, 0.3, y + 0.05), lighter, None))
        return (body,), parts
    if kind == "tub":
        body = _rounded(0.5, 0.5, 2)
        return (body,), [(body, _rgb(main), edge), (_rounded(0.4, 0.4, 2), lighter, darker)]
    if kind == "book":
        body = _rect(-0.5, -0.5, 0.5, 0.5)
        return (body,), [(body, _rgb(main), edge), (_rect(-0.46, -0.46, -0.36, 0.46), darker, None),
                         (_rect(-0.25, -0.1, 0.4, 0.35), lighter, None)]
    body = _rounded(0.5, 0.5, 8)
    return (body,), [(body, lighter, edge), (_rounded(0.36, 0.3, 5, 0, 0.1), _rgb(main), None)]


def _make_skus(rng: np.random.Generator, count: int, floor: tuple[float, float, float, float],
               floor_colour: Colour, short_side: float) -> tuple[list[Sku], list[int]]:
    """Products and which product each item is: repeats look identical, like several units of one SKU."""
    floor_area = (floor[2] - floor[0]) * (floor[3] - floor[1])
    coverage = rng.uniform(0.22, 0.4)
    longest = 0.92 * min(floor[2] - floor[0], floor[3] - floor[1])
    skus: list[Sku] = []
    assignment: list[int] = []
    for _ in range(count):
        if skus and rng.random() < 0.3:
            assignment.append(int(rng.integers(len(skus))))
            continue
        kind = KINDS[rng.integers(len(KINDS))]
        aspect = rng.uniform(*ASPECTS[kind])
        area = coverage * floor_area / count * rng.uniform(0.85, 1.2) / AREA[kind]
        height = float(np.clip(np.sqrt(area * aspect), MIN_ITEM * short_side, longest))
        width = min(max(height / aspect, area / height), longest)
        shape, parts = _looks(kind, rng, _item_colour(rng, floor_colour))
        asin = _asin(rng, {s.asin for s in skus})
        name = (f"{BRANDS[rng.integers(len(BRANDS))]} {NOUNS[kind][rng.integers(len(NOUNS[kind]))]}, "
                f"{VARIANTS[rng.integers(len(VARIANTS))]}")
        skus.append(Sku(kind, (width, height), shape, tuple(parts), asin, name))
        assignment.append(len(skus) - 1)
    return skus, assignment


def _asin(rng: np.random.Generator, taken: set[str]) -> str:
    while True:
        asin = "B0" + "".join(rng.choice(ASIN_CHARS, 8))
        if asin not in taken:
            return asin


def _place(points: np.ndarray, size: tuple[float, float], center: tuple[float, float], angle: float,
           scale: float = 1.0) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    local = points * (np.asarray(size) * scale)
    return local @ np.array([[c, s], [-s, c]]) + center


def _mask(polygons: list[np.ndarray], grid_size: tuple[int, int]) -> np.ndarray:
    canvas = Image.new("L", grid_size)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        draw.polygon(_flat(poly), fill=1)
    return np.asarray(canvas).astype(bool)


def _area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _layout(rng: np.random.Generator, skus: list[Sku], assignment: list[int],
            floor: tuple[float, float, float, float], drawing_size: tuple[int, int]) -> tuple[list[Item], float]:
    """Positions and angles such that every item keeps MIN_VISIBLE of its area uncovered by later ones
    (MIN_VISIBLE_TWIN where the later one is an identical unit) and MIN_INSIDE of it within the photo.

    Overlap is checked on a coarse occupancy grid; when an item does not fit after a few tries it shrinks a
    little each try (down to MIN_SCALE), and the least-occluding try wins if none satisfies the rule. Also
    returns the share of the floor that items cover, which tests use to show that area does not give the count.
    """
    grid_size = (max(1, round(drawing_size[0] * GRID)), max(1, round(drawing_size[1] * GRID)))
    labels = np.zeros((grid_size[1], grid_size[0]), dtype=np.uint8)
    areas: list[int] = []
    placed: list[tuple[tuple[float, float], float, float, float]] = []
    for index, sku_index in enumerate(assignment):
        sku = skus[sku_index]
        needed = np.where(np.asarray(assignment[:index]) == sku_index, MIN_VISIBLE_TWIN, MIN_VISIBLE)
        shown = np.bincount(labels.ravel(), minlength=index + 1)[1:index + 1]
        best = None
        for attempt in range(PLACEMENT_TRIES):
            scale = max(MIN_SCALE, 0.97 ** max(0, attempt - 10))
            margin = 0.25 * min(sku.size) * scale
            center = (rng.uniform(floor[0] + margin, max(floor[0] + margin, floor[2] - margin)),
                      rng.uniform(floor[1] + margin, max(floor[1] + margin, floor[3] - margin)))
            angle = rng.uniform(0, 2 * np.pi)
            polygons = [_place(p, sku.size, center, angle, scale) * GRID for p in sku.shape]
            mask = _mask(polygons, grid_size)
            inside = mask.sum() / max(sum(_area(p) for p in polygons), 1.0)
            visible = shown - np.bincount(labels[mask], minlength=index + 1)[1:index + 1]
            worst = min(float(np.min(visible / np.maximum(areas, 1) / needed)) if index else 1.0,
                        inside / MIN_INSIDE)
            if best is None or worst > best[0]:
                best = (worst, center, angle, scale, mask, inside)
            if worst >= 1.0:
                break
        _, center, angle, scale, mask, inside = best
        labels[mask] = index + 1
        areas.append(max(int(mask.sum()), 1))
        placed.append((center, angle, scale, inside))
    pixels = np.bincount(labels.ravel(), minlength=len(assignment) + 1)
    visible = pixels[1:] / np.asarray(areas)
    coverage = float(pixels[1:].sum()) / ((floor[2] - floor[0]) * (floor[3] - floor[1]) * GRID * GRID)
    items = [Item(sku, *where, float(v)) for sku, where, v in zip(assignment, placed, visible)]
    return items, coverage


def _draw_items(draw: ImageDraw.ImageDraw, rng: np.random.Generator, skus: list[Sku], items: list[Item]) -> None:
    light = rng.uniform(0, 2 * np.pi)
    reach = rng.uniform(2.0, 4.5)
    offset = np.array([np.cos(light), np.sin(light)]) * reach
    shadow = (0, 0, 0, int(rng.integers(80, 140)))
    for item in items:
        sku = skus[item.sku]
        for poly in sku.shape:
            draw.polygon(_flat(_place(poly, sku.size, item.center, item.angle, item.scale) + offset), fill=shadow)
        for poly, fill, outline in sku.parts:
            draw.polygon(_flat(_place(poly, sku.size, item.center, item.angle, item.scale)), fill=fill,
                         outline=outline, width=2 if outline else 1)


# ---- distractors, light and the camera ----------------------------------------------------------------------

def _draw_bands(draw: ImageDraw.ImageDraw, rng: np.random.Generator, drawing_size: tuple[int, int]) -> None:
    """Elastic bands in bundles across the bin, and sometimes a strip of tape: over items, never items."""
    w, h = drawing_size
    for _ in range(rng.choice(4, p=(0.15, 0.35, 0.35, 0.15))):
        y = rng.uniform(0.0, 0.9) * h
        slope = rng.uniform(-0.05, 0.05) * w
        gap = rng.uniform(1.1, 2.2)
        grey = rng.uniform(210, 255)
        alpha = int(rng.integers(50, 120))
        for j in range(rng.integers(6, 16)):
            yj = y + j * gap + rng.uniform(-0.4, 0.4)
            draw.line((0, yj, w, yj + slope + rng.uniform(-1, 1)), fill=_rgb((grey, grey, grey * 0.97), 1, alpha))
    if rng.random() < 0.2:
        x = rng.uniform(0.1, 0.9) * w
        half = rng.uniform(3, 7)
        lean = rng.uniform(-0.3, 0.3) * h
        tape = (210, 185, 140) if rng.random() < 0.5 else (235, 235, 235)
        draw.polygon(((x - half, 0), (x + half, 0), (x + half + lean, h), (x - half + lean, h)),
                     fill=_rgb(tape, 1, int(rng.integers(50, 100))))


def _light(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A smooth, tinted illumination field from a 3×3 grid of gains, applied at the drawing size."""
    tint = np.array([1.0, rng.uniform(0.9, 1.0), rng.uniform(0.78, 1.0)])
    if rng.random() < 0.3:
        tint = tint[::-1]
    gains = rng.uniform(0.62, 1.0) * (1 + rng.uniform(-0.15, 0.15, (3, 3, 1))) * tint
    field = Image.fromarray(np.clip(gains * 255, 0, 255).astype(np.uint8)).resize(img.size, Image.BILINEAR)
    return ImageChops.multiply(img, field)


@lru_cache(maxsize=None)
def _noise_tile(sigma: float) -> Image.Image:
    """Sensor noise centred on 128 (mostly luminance, some chroma); fixed seed, so every process agrees."""
    rng = np.random.default_rng(20240611)
    lum = rng.standard_normal((NOISE_TILE, NOISE_TILE, 1), dtype=np.float32) * sigma
    chroma = rng.standard_normal((NOISE_TILE, NOISE_TILE, 3), dtype=np.float32) * (sigma * 0.5)
    return Image.fromarray(np.clip(128 + lum + chroma, 0, 255).astype(np.uint8))


def _photograph(img: Image.Image, rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    """Camera: noise from a random crop of the tile, the upscale's blur (stronger for larger zooms), JPEG."""
    w, h = img.size
    tile = _noise_tile(NOISE_SIGMAS[rng.integers(len(NOISE_SIGMAS))])
    x, y = rng.integers(0, NOISE_TILE - w + 1), rng.integers(0, NOISE_TILE - h + 1)
    img = ImageChops.add(img, tile.crop((x, y, x + w, y + h)), 1.0, -128).resize(size, Image.BILINEAR)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=int(rng.integers(72, 93)))
    return out.getvalue()


def _metadata(rng: np.random.Generator, key: str, skus: list[Sku], quantities: list[int],
              inches_per_px: float) -> dict:
    """ABID's metadata: one entry per SKU with its quantity and dimensions (inches, pounds)."""
    data = {}
    for sku, quantity in zip(skus, quantities):
        length, width = sorted((d * inches_per_px for d in sku.size), reverse=True)
        height = rng.uniform(0.4, 6.0)
        weight = length * width * height * rng.uniform(0.004, 0.03)
        data[sku.asin] = {
            "asin": sku.asin, "name": sku.name, "normalizedName": sku.name, "quantity": quantity,
            "length": {"unit": "IN", "value": round(length, 3)},
            "width": {"unit": "IN", "value": round(width, 3)},
            "height": {"unit": "IN", "value": round(height, 3)},
            "weight": {"unit": "pounds", "value": round(weight, 3)},
        }
    return {"BIN_FCSKU_DATA": data, "EXPECTED_QUANTITY": sum(quantities), "image_fname": f"{key}.jpg"}
