"""The exploratory report of a prepared dataset: figures, `report.md` and a self-contained `report.html`.

Reads `datasets/<name>/` (manifests + stats.json) and, for every distinct image the manifests name, only the
JPEG header (for its size) and the ABID metadata (for its products), so a report over thousands of images
costs two small reads each. Everything written is a function of the inputs alone, so a rerun on the same
dataset gives byte-identical reports.
"""

from __future__ import annotations

import hashlib
import io
import json
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from tqdm import tqdm

from bincount.config import EdaConfig
from bincount.data.abid import RejectedPair, image_key, metadata_key, parse_metadata
from bincount.data.prepare import NAME_RE, SPLITS, dataset_key
from bincount.document import Block, Heading, Para, Picture, Table, png, render_html, render_markdown
from bincount.errors import BincountError, ConfigError
from bincount.store import KeyNotFoundError, Store, join, open_store

HEADER_BYTES = 65536
THUMBNAIL_PX = 240
SPLIT_COLORS = {"train": "#4c72b0", "val": "#dd8452", "test": "#55a868"}
CLASS_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")
STYLE = {
    "font.size": 11, "axes.titlesize": 13, "axes.titleweight": "bold", "axes.labelsize": 11,
    "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
    "legend.frameon": False, "savefig.dpi": 100, "savefig.bbox": "tight", "savefig.pad_inches": 0.2,
}


@dataclass(frozen=True)
class ImageFacts:
    """What the report knows about one distinct image: header size, file size and its metadata."""

    key: str
    label: int
    width: int
    height: int
    nbytes: int
    skus: int
    items: int
    expected: int

    @property
    def aspect(self) -> float:
        return self.width / self.height


@dataclass
class Dataset:
    stats: dict
    classes: list[int]
    splits: dict[str, list[tuple[str, int]]]

    def labels(self) -> dict[str, int]:
        """Each distinct key once, with its label (oversampling repeats keys within train)."""
        out: dict[str, int] = {}
        for rows in self.splits.values():
            for key, label in rows:
                out.setdefault(key, label)
        return dict(sorted(out.items()))

    def split_counts(self) -> dict[str, Counter]:
        return {split: Counter(label for _, label in rows) for split, rows in self.splits.items()}


@dataclass
class EdaResult:
    uri: str
    files: list[str]
    name: str
    images: int
    per_class: dict[int, int]
    median_size: tuple[int, int]
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        counts = ", ".join(f"{c}: {n}" for c, n in self.per_class.items())
        w, h = self.median_size
        text = (f"EDA report of dataset {self.name!r}: {self.uri} ({len(self.files)} files)\n"
                f"{self.images} distinct images (per class {counts}); median size {w}x{h} px")
        if self.warnings:
            text += f"; {len(self.warnings)} warning(s), see the report"
        return text


def report_prefix(name: str) -> str:
    return join("reports", name, "eda")


def build_report(cfg: EdaConfig) -> EdaResult:
    if not NAME_RE.match(cfg.name or ""):
        raise ConfigError(f"dataset name {cfg.name!r} must be letters, digits, '.', '_' or '-'")
    if cfg.samples_per_class < 1 or cfg.workers < 1:
        raise ConfigError("samples_per_class and workers must be at least 1")
    store = open_store(cfg.store)
    dataset = _load_dataset(store, cfg)
    labels = dataset.labels()
    samples = _sample_keys(labels, dataset.classes, cfg.samples_per_class)
    facts, thumbnails = _read_images(store, cfg, labels, {k for keys in samples.values() for k in keys})
    warnings = _warnings(dataset, facts)

    figures = _figures(dataset, facts, samples, thumbnails)
    blocks = _document(cfg, store, dataset, facts, warnings)
    prefix = report_prefix(cfg.name)
    written = []
    for name, data in figures.items():
        store.put(join(prefix, name), data)
        written.append(join(prefix, name))
    store.put_text(join(prefix, "report.md"), render_markdown(blocks))
    store.put_text(join(prefix, "report.html"), render_html(blocks, figures, f"EDA report: {cfg.name}"))
    written += [join(prefix, "report.md"), join(prefix, "report.html")]

    per_class = Counter(f.label for f in facts)
    return EdaResult(
        uri=store.url(join(prefix, "report.html")), files=written, name=cfg.name, images=len(facts),
        per_class={c: per_class[c] for c in dataset.classes}, median_size=_median_size(facts),
        warnings=warnings)


# ---- inputs -------------------------------------------------------------------------------------------------

def _load_dataset(store: Store, cfg: EdaConfig) -> Dataset:
    hint = f"run `bincount data prepare --store {cfg.store} --name {cfg.name}` first"
    stats_key = dataset_key(cfg.name, "stats.json")
    try:
        stats = json.loads(store.get(stats_key))
    except KeyNotFoundError:
        raise BincountError(f"dataset {cfg.name!r} not found: no {stats_key} in {store.uri}; {hint}") from None
    except ValueError as e:
        raise BincountError(f"{stats_key} in {store.uri} is not valid JSON ({e}); {hint}") from None
    for path in ("classes", "counts.raw", "counts.balanced"):
        node = stats
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                raise BincountError(f"{stats_key} lacks {path!r}; it was not written by this version of "
                                    f"`bincount data prepare`: {hint}")
            node = node[part]
    classes = [int(c) for c in stats["classes"]]
    splits = {}
    for split in SPLITS:
        key = dataset_key(cfg.name, f"{split}.jsonl")
        try:
            text = store.get_text(key)
        except KeyNotFoundError:
            raise BincountError(f"dataset {cfg.name!r} is incomplete: no {key} in {store.uri}; {hint}") from None
        splits[split] = _parse_manifest(text, key, set(classes))
    if not any(splits.values()):
        raise BincountError(f"dataset {cfg.name!r} has empty manifests; {hint}")
    return Dataset(stats=stats, classes=classes, splits=splits)


def _parse_manifest(text: str, where: str, classes: set[int]) -> list[tuple[str, int]]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key, label = row["key"], row["label"]
        except (ValueError, KeyError, TypeError):
            raise BincountError(f"{where} line {number} is not a {{\"key\", \"label\"}} object: "
                                f"{line[:80]!r}") from None
        if not isinstance(key, str) or label not in classes:
            raise BincountError(f"{where} line {number}: key must be a string and label one of "
                                f"{sorted(classes)}, got {line[:80]!r}")
        rows.append((key, int(label)))
    return rows


def _sample_keys(labels: dict[str, int], classes: Sequence[int], k: int) -> dict[int, list[str]]:
    """The k keys of each class with the smallest SHA-256: fixed for a dataset, yet spread over its key range."""
    by_class: dict[int, list[str]] = {c: [] for c in classes}
    for key, label in labels.items():
        by_class[label].append(key)
    return {c: sorted(keys, key=lambda s: hashlib.sha256(s.encode()).hexdigest())[:k] for c, keys in by_class.items()}


def _read_images(store: Store, cfg: EdaConfig, labels: dict[str, int],
                 sample_keys: set[str]) -> tuple[list[ImageFacts], dict[str, Image.Image]]:
    """Facts for every key and thumbnails for the sampled ones, read in a thread pool."""
    facts: dict[str, ImageFacts] = {}
    thumbnails: dict[str, Image.Image] = {}
    with ThreadPoolExecutor(max_workers=cfg.workers) as pool, \
            tqdm(total=len(labels), desc=f"eda {cfg.name}", unit="img", file=sys.stderr) as bar:
        futures = {pool.submit(_read_one, store, key, label, key in sample_keys): key for key, label in labels.items()}
        try:
            for future in as_completed(futures):
                key = futures[future]
                try:
                    facts[key], thumbnail = future.result()
                except KeyNotFoundError as e:
                    raise BincountError(f"dataset {cfg.name!r} lists key {key!r} but the store lacks it ({e}); "
                                        "rerun `bincount data download` or `bincount data prepare`") from None
                if thumbnail is not None:
                    thumbnails[key] = thumbnail
                bar.update()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return [facts[k] for k in labels], thumbnails


def _read_one(store: Store, key: str, label: int, thumbnail: bool) -> tuple[ImageFacts, Image.Image | None]:
    """Only the first HEADER_BYTES of an image unless it is a sample (or its header is longer)."""
    image = image_key(key)
    data = store.get(image) if thumbnail else store.get(image, 0, HEADER_BYTES)
    size = _image_size(data)
    if size is None and len(data) == HEADER_BYTES:
        data = store.get(image)
        size = _image_size(data)
    if size is None:
        raise BincountError(f"{image} in {store.uri} is not a readable image")
    nbytes = len(data) if len(data) < HEADER_BYTES or thumbnail else store.stat(image).size
    try:
        meta, expected = parse_metadata(store.get(metadata_key(key)))
        products = meta.get("BIN_FCSKU_DATA") or {}
        items = sum(int(p.get("quantity", 0)) for p in products.values())
    except RejectedPair as e:
        raise BincountError(f"{metadata_key(key)} in {store.uri} is not usable ABID metadata: {e.reason}") from None
    except (AttributeError, TypeError, ValueError):
        raise BincountError(f"{metadata_key(key)} in {store.uri}: BIN_FCSKU_DATA is not a mapping of products "
                            "with quantities") from None
    facts = ImageFacts(key, label, size[0], size[1], nbytes, len(products), items, expected)
    return facts, _thumbnail(data) if thumbnail else None


def _image_size(data: bytes) -> tuple[int, int] | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (OSError, SyntaxError, ValueError):
        return None


def _thumbnail(data: bytes) -> Image.Image:
    """The photo shrunk onto a white square, so that every cell of the grid has the same shape."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    square = Image.new("RGB", (THUMBNAIL_PX, THUMBNAIL_PX), "white")
    square.paste(image, ((THUMBNAIL_PX - image.width) // 2, (THUMBNAIL_PX - image.height) // 2))
    return square


def _warnings(dataset: Dataset, facts: list[ImageFacts]) -> list[str]:
    out = []
    recorded = dataset.stats.get("counts", {}).get("splits", {})
    for split, counts in dataset.split_counts().items():
        if split in recorded and {int(c): n for c, n in recorded[split].items() if n} != dict(counts):
            out.append(f"stats.json counts for {split} differ from {split}.jsonl; the stats may be stale")
    mislabelled = sum(1 for f in facts if f.expected != f.label)
    if mislabelled:
        out.append(f"{mislabelled} image(s) have a manifest label that differs from their EXPECTED_QUANTITY")
    return out


# ---- figures ------------------------------------------------------------------------------------------------

FIGURES = {
    "counts.png": "Images per class before and after balancing",
    "splits.png": "Images per class in each split",
    "sizes.png": "Image width x height per class",
    "aspect.png": "Aspect ratio (width / height) per class",
    "filesize.png": "JPEG file size per class",
    "skus.png": "Distinct products (SKUs) per bin vs items in the bin",
    "samples.png": "Sample images per class",
}


def _figures(dataset: Dataset, facts: list[ImageFacts], samples: dict[int, list[str]],
             thumbnails: dict[str, Image.Image]) -> dict[str, bytes]:
    classes = dataset.classes
    by_class = {c: [f for f in facts if f.label == c] for c in classes}
    draw: dict[str, Callable[[], Figure]] = {
        "counts.png": lambda: _counts_figure(dataset),
        "splits.png": lambda: _splits_figure(dataset),
        "sizes.png": lambda: _sizes_figure(by_class),
        "aspect.png": lambda: _box_figure(by_class, lambda f: f.aspect, "Aspect ratio (width / height)",
                                          FIGURES["aspect.png"], reference=1.0),
        "filesize.png": lambda: _box_figure(by_class, lambda f: f.nbytes / 1024, "File size (KiB)",
                                            FIGURES["filesize.png"]),
        "skus.png": lambda: _skus_figure(facts, classes),
        "samples.png": lambda: _samples_figure(samples, thumbnails),
    }
    with matplotlib.rc_context(STYLE):
        return {name: _png(make(), photos=name == "samples.png") for name, make in draw.items()}


def _png(fig: Figure, photos: bool = False) -> bytes:
    """PNG bytes; a figure of photos is reduced to a 256-colour palette, a third of the size at no visible cost."""
    if not photos:
        return png(fig)
    buf = io.BytesIO()
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")
    image.quantize(256, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG")
    return buf.getvalue()


def _items(c: int) -> str:
    return f"{c} item" if c == 1 else f"{c} items"


def _grouped_bars(ax, classes: Sequence[int], series: dict[str, list[int]], colors: dict[str, str]) -> None:
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(classes))]
        bars = ax.bar(xs, values, width, label=label, color=colors[label])
        ax.bar_label(bars, fontsize=9, padding=2)
    ax.set_xticks(range(len(classes)), [_items(c) for c in classes])
    ax.set_xlabel("Class (items in the bin)")
    ax.set_ylabel("Images")
    ax.margins(y=0.12)
    ax.grid(axis="x", visible=False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _counts_figure(dataset: Dataset) -> Figure:
    counts = dataset.stats["counts"]
    balance = dataset.stats.get("balance", "?")
    series = {
        "before balancing": [int(counts["raw"].get(str(c), 0)) for c in dataset.classes],
        f"after balancing ({balance})": [int(counts["balanced"].get(str(c), 0)) for c in dataset.classes],
    }
    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    _grouped_bars(ax, dataset.classes, series, dict(zip(series, ("#9e9e9e", "#4c72b0"))))
    ax.set_title(FIGURES["counts.png"])
    return fig


def _splits_figure(dataset: Dataset) -> Figure:
    counts = dataset.split_counts()
    series = {f"{split} ({sum(counts[split].values())})": [counts[split][c] for c in dataset.classes]
              for split in SPLITS}
    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    _grouped_bars(ax, dataset.classes, series, dict(zip(series, SPLIT_COLORS.values())))
    ax.set_title(FIGURES["splits.png"] + " (manifest rows)")
    return fig


def _class_color(i: int) -> str:
    return CLASS_COLORS[i % len(CLASS_COLORS)]


def _sizes_figure(by_class: dict[int, list[ImageFacts]]) -> Figure:
    fig = Figure(figsize=(8, 6.5))
    ax = fig.subplots()
    markers = "osD^vP*X"
    for i, (c, group) in enumerate(by_class.items()):
        ax.scatter([f.width for f in group], [f.height for f in group], s=22, alpha=0.65,
                   marker=markers[i % len(markers)], color=_class_color(i), label=f"{_items(c)} ({len(group)})",
                   edgecolors="none")
    limit = max((max(f.width, f.height) for g in by_class.values() for f in g), default=1) * 1.05
    ax.plot([0, limit], [0, limit], color="#555555", lw=0.8, ls="--", label="square (w = h)")
    ax.set_xlim(0, limit)
    ax.set_ylim(0, limit)
    ax.set_aspect("equal")
    ax.set_xlabel("Width (px)")
    ax.set_ylabel("Height (px)")
    ax.set_title(FIGURES["sizes.png"])
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), title="Class (images)")
    return fig


def _box_figure(by_class: dict[int, list[ImageFacts]], value: Callable[[ImageFacts], float], ylabel: str,
                title: str, reference: float | None = None) -> Figure:
    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    classes = list(by_class)
    data = [[value(f) for f in by_class[c]] for c in classes]
    positions = list(range(len(classes)))
    shown = [(p, d) for p, d in zip(positions, data) if d]
    if shown:
        box = ax.boxplot([d for _, d in shown], positions=[p for p, _ in shown], widths=0.55, showfliers=False,
                         patch_artist=True, medianprops={"color": "black"})
        for patch, (p, _) in zip(box["boxes"], shown):
            patch.set_facecolor(_class_color(p))
            patch.set_alpha(0.35)
    for p, d in zip(positions, data):
        jitter = [((i * 0.618034) % 1 - 0.5) * 0.35 for i in range(len(d))]
        ax.scatter([p + j for j in jitter], d, s=10, alpha=0.6, color=_class_color(p), edgecolors="none")
    if reference is not None:
        ax.axhline(reference, color="#555555", lw=0.8, ls="--")
    ax.set_xticks(positions, [f"{_items(c)}\n(n={len(d)})" for c, d in zip(classes, data)])
    ax.set_xlabel("Class (items in the bin)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="x", visible=False)
    return fig


def _skus_figure(facts: list[ImageFacts], classes: Sequence[int]) -> Figure:
    pairs = Counter((f.label, f.skus) for f in facts)
    max_skus = max((f.skus for f in facts), default=1)
    rows = list(range(1, max(max_skus, 1) + 1))
    grid = [[pairs[(c, s)] for c in classes] for s in rows]
    fig = Figure(figsize=(8, 1.6 + 0.75 * len(rows)))
    ax = fig.subplots()
    image = ax.imshow(grid, cmap="Blues", aspect="auto", origin="lower")
    peak = max((v for row in grid for v in row), default=0)
    for y, row in enumerate(grid):
        for x, v in enumerate(row):
            if v:
                ax.text(x, y, str(v), ha="center", va="center", fontsize=10,
                        color="white" if v > peak * 0.6 else "black")
    ax.set_xticks(range(len(classes)), [_items(c) for c in classes])
    ax.set_yticks(range(len(rows)), [str(s) for s in rows])
    ax.set_xlabel("Class (items in the bin)")
    ax.set_ylabel("Distinct products (SKUs) in the bin")
    ax.set_title(FIGURES["skus.png"])
    ax.grid(False)
    fig.colorbar(image, ax=ax, label="Images")
    return fig


def _samples_figure(samples: dict[int, list[str]], thumbnails: dict[str, Image.Image]) -> Figure:
    rows = list(samples)
    cols = max((len(keys) for keys in samples.values()), default=1) or 1
    fig = Figure(figsize=(2.4 * cols + 0.6, 2.4 * len(rows) + 0.5), layout="constrained")
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, c in enumerate(rows):
        for j in range(cols):
            ax = axes[r][j]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(samples[c]):
                key = samples[c][j]
                ax.imshow(thumbnails[key])
                ax.set_title(key, fontsize=9, fontweight="normal")
            if j == 0:
                ax.set_ylabel(_items(c), fontsize=12, fontweight="bold")
    fig.suptitle(FIGURES["samples.png"] + " (bin id above each photo)", fontsize=13, fontweight="bold")
    return fig


# ---- the document -------------------------------------------------------------------------------------------

def _document(cfg: EdaConfig, store: Store, dataset: Dataset, facts: list[ImageFacts],
              warnings: list[str]) -> list[Block]:
    stats = dataset.stats
    classes = dataset.classes
    split_counts = dataset.split_counts()
    per_class = Counter(f.label for f in facts)
    w, h = _median_size(facts)
    split_text = ", ".join(f"{s} {sum(split_counts[s].values())}" for s in SPLITS)
    blocks: list[Block] = [
        Heading(f"EDA report: dataset {cfg.name}", 1),
        Para(f"Store {store.uri}, dataset datasets/{cfg.name}/: classes {', '.join(map(str, classes))}; "
             f"balance {stats.get('balance', '?')}; split {stats.get('split', '?')}; seed {stats.get('seed', '?')}."),
        Para(f"{len(facts)} distinct images; manifest rows: {split_text}. "
             f"Median image size {w} x {h} px; sizes range "
             f"{min((f.width for f in facts), default=0)}-{max((f.width for f in facts), default=0)} px wide and "
             f"{min((f.height for f in facts), default=0)}-{max((f.height for f in facts), default=0)} px high."),
    ]
    if warnings:
        blocks += [Heading("Warnings"), *(Para(f"Warning: {text}") for text in warnings)]

    counts = stats["counts"]
    blocks += [
        Heading("Images per class"),
        Para("Raw: images per class after the class filter, before balancing. Balanced: all splits together, "
             "repeats counted. Train/val/test: manifest rows. Distinct: distinct images in the manifests."),
        Table(["Class", "Raw", "Balanced", "Train", "Val", "Test", "Distinct"],
              [[_items(c), str(counts["raw"].get(str(c), 0)), str(counts["balanced"].get(str(c), 0)),
                *(str(split_counts[s][c]) for s in SPLITS), str(per_class[c])] for c in classes]
              + [["All", str(sum(map(int, counts["raw"].values()))), str(sum(map(int, counts["balanced"].values()))),
                  *(str(sum(split_counts[s].values())) for s in SPLITS), str(len(facts))]]),
        Picture("counts.png", FIGURES["counts.png"]),
        Picture("splits.png", FIGURES["splits.png"]),
        Heading("Image sizes"),
        Para("Per distinct image, from the JPEG header; aspect = width / height; file size in KiB."),
        Table(["Class", "Images", "Mean W", "Min W", "Max W", "Mean H", "Min H", "Max H", "Mean aspect",
               "Mean KiB"],
              [_size_row(_items(c), [f for f in facts if f.label == c]) for c in classes]
              + [_size_row("All", facts)]),
        Picture("sizes.png", FIGURES["sizes.png"]),
        Picture("aspect.png", FIGURES["aspect.png"]),
        Picture("filesize.png", FIGURES["filesize.png"]),
        Heading("Products in each bin (metadata)"),
    ]
    mismatched = sum(1 for f in facts if f.items != f.expected)
    blocks += [
        Para(f"{mismatched} of {len(facts)} bins have SKU quantities in BIN_FCSKU_DATA that do not add up to "
             "EXPECTED_QUANTITY."),
        Table(["Class", "Images", "Mean SKUs", "Max SKUs", "Single-SKU bins"],
              [[_items(c), str(len(group)), _fmt(_mean([f.skus for f in group]), 2),
                str(max((f.skus for f in group), default=0)), _percent(sum(f.skus == 1 for f in group), len(group))]
               for c in classes for group in [[f for f in facts if f.label == c]]]),
        Picture("skus.png", FIGURES["skus.png"]),
        Heading("Rejected images and duplicates (from prepare)"),
    ]
    rejected = stats.get("rejected") or {}
    duplicates = stats.get("duplicates") or {}
    if rejected:
        blocks.append(Table(["Reason", "Images"], [[reason, str(n)] for reason, n in sorted(rejected.items())]))
    else:
        blocks.append(Para("No images were rejected."))
    blocks += [
        Para(f"Byte-identical duplicates: {duplicates.get('groups', 0)} group(s) covering "
             f"{duplicates.get('images', 0)} image(s); each group is kept within one split."),
        Heading("Sample images"),
        Para(f"Up to {cfg.samples_per_class} images per class, chosen deterministically (the keys with the "
             "smallest SHA-256 hash), so reruns show the same photos."),
        Picture("samples.png", FIGURES["samples.png"]),
    ]
    return blocks


def _size_row(label: str, group: list[ImageFacts]) -> list[str]:
    if not group:
        return [label, "0"] + ["-"] * 8
    widths = [f.width for f in group]
    heights = [f.height for f in group]
    return [label, str(len(group)), _fmt(_mean(widths), 1), str(min(widths)), str(max(widths)),
            _fmt(_mean(heights), 1), str(min(heights)), str(max(heights)),
            _fmt(_mean([f.aspect for f in group]), 3), _fmt(_mean([f.nbytes / 1024 for f in group]), 1)]


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _percent(n: int, total: int) -> str:
    return f"{n} ({100 * n / total:.0f}%)" if total else "0"


def _median_size(facts: list[ImageFacts]) -> tuple[int, int]:
    if not facts:
        return (0, 0)
    return (round(statistics.median(f.width for f in facts)), round(statistics.median(f.height for f in facts)))
