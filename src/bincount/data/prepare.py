"""Labels from metadata, class filter, balancing and a stratified split into `datasets/<name>/`.

Byte-identical images (same md5) form one group that is never divided between splits, so a duplicate can
never carry a training image into validation or test; so do photos that list a product in common, the photos
of one bin before and after a pick or a stow (`group_same_bin`). Undersampling happens before the split (all splits
balanced, as the seed did); oversampling repeats training keys only, after the split, so no image is repeated
inside or across val/test. Everything is a function of the seed and the raw data: same input, same bytes out.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm import tqdm

from bincount.config import PrepareConfig
from bincount.data.abid import IMAGES, METADATA, RAW, RejectedPair, image_key, metadata_key, parse_metadata
from bincount.errors import BincountError, ConfigError
from bincount.store import KeyNotFoundError, Store, open_store

SPLITS = ("train", "val", "test")
BALANCE_MODES = ("undersample", "oversample", "none")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def dataset_key(name: str, filename: str) -> str:
    return f"datasets/{name}/{filename}"


def read_manifest(store: Store, name: str, split: str) -> list[dict]:
    """The {"key", "label"} records of one split, with a clear error when the dataset is missing."""
    try:
        text = store.get_text(dataset_key(name, f"{split}.jsonl"))
    except KeyNotFoundError:
        raise BincountError(f"dataset {name!r} has no {split} split in {store.uri} "
                            f"(expected {dataset_key(name, split + '.jsonl')}); run `bincount data prepare` first"
                            ) from None
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class Sample:
    key: str
    label: int
    md5: str
    products: frozenset[str] = frozenset()      # the ASINs of BIN_FCSKU_DATA


@dataclass
class PrepareResult:
    name: str
    uri: str
    stats: dict

    def summary(self) -> str:
        counts = self.stats["counts"]
        classes = [str(c) for c in self.stats["classes"]]
        header = f"{'class':>5} {'raw':>7} {'balanced':>9} " + " ".join(f"{s:>7}" for s in SPLITS)
        rows = [f"{c:>5} {counts['raw'].get(c, 0):>7} {counts['balanced'].get(c, 0):>9} "
                + " ".join(f"{counts['splits'][s].get(c, 0):>7}" for s in SPLITS) for c in classes]
        totals = {s: sum(counts["splits"][s].values()) for s in SPLITS}
        lines = [f"dataset {self.name!r} → {self.uri} (balance={self.stats['balance']}, seed={self.stats['seed']})",
                 header, *rows,
                 f"{'all':>5} {sum(counts['raw'].values()):>7} {sum(counts['balanced'].values()):>9} "
                 + " ".join(f"{totals[s]:>7}" for s in SPLITS)]
        if self.stats["rejected"]:
            lines.append("skipped: " + ", ".join(f"{r}: {n}" for r, n in sorted(self.stats["rejected"].items())))
        dup = self.stats["duplicates"]
        if dup["groups"]:
            lines.append(f"byte-identical images: {dup['images']} in {dup['groups']} groups (kept in one split each)")
        same = self.stats["same_bin"]
        if same["groups"]:
            lines.append(f"photos sharing a product (one bin, other counts): {same['images']} in {same['groups']} "
                         "groups (kept in one split each)")
        return "\n".join(lines)


def _validate(cfg: PrepareConfig) -> None:
    if not NAME_RE.match(cfg.name or ""):
        raise ConfigError(f"dataset name {cfg.name!r} must be letters, digits, '.', '_' or '-'")
    if cfg.balance not in BALANCE_MODES:
        raise ConfigError(f"--balance must be one of {', '.join(BALANCE_MODES)}, got {cfg.balance!r}")
    if any(f < 0 for f in cfg.split) or abs(sum(cfg.split) - 1) > 1e-6 or cfg.split[0] <= 0:
        raise ConfigError(f"--split must be three non-negative fractions summing to 1 with train > 0, "
                          f"got {','.join(map(str, cfg.split))}")
    if not cfg.classes:
        raise ConfigError("--classes must name at least one item count")


def _load(store: Store, key: str) -> Sample | tuple[str, str]:
    """A labelled sample, or (key, reason) when the pair is unusable."""
    try:
        meta, label = parse_metadata(store.get(metadata_key(key)))
        products = meta.get("BIN_FCSKU_DATA")
        digest = hashlib.md5()
        with store.open(image_key(key)) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except RejectedPair as e:
        return key, e.reason
    except KeyNotFoundError:
        return key, "image missing"
    return Sample(key, label, digest.hexdigest(), frozenset(products) if isinstance(products, dict) else frozenset())


def scan(store: Store, workers: int) -> tuple[list[Sample], Counter]:
    """Every complete pair under raw/ (metadata present marks completeness) and the reasons others were skipped."""
    metas = {o.key.rsplit("/", 1)[-1][: -len(".json")]
             for o in store.list(f"{RAW}/{METADATA}/") if o.key.endswith(".json")}
    if not metas:
        raise BincountError(f"no metadata under {store.url(RAW + '/' + METADATA)}/; run `bincount data synthetic` "
                            "or `bincount data download` first")
    images = {o.key.rsplit("/", 1)[-1][: -len(".jpg")]
              for o in store.list(f"{RAW}/{IMAGES}/") if o.key.endswith(".jpg")}
    rejected: Counter = Counter()
    if metas - images:
        rejected["image missing"] = len(metas - images)
    samples = []
    with ThreadPoolExecutor(workers) as pool:
        loaded = pool.map(lambda k: _load(store, k), sorted(metas & images))
        for item in tqdm(loaded, total=len(metas & images), desc="prepare", unit="img", leave=False, disable=None):
            if isinstance(item, Sample):
                samples.append(item)
            else:
                rejected[item[1]] += 1
    return samples, rejected


def group_duplicates(samples: Sequence[Sample]) -> tuple[list[list[Sample]], Counter]:
    """Groups of byte-identical images; a group whose copies disagree on the label is dropped as unusable."""
    by_md5: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_md5[s.md5].append(s)
    groups, dropped = [], Counter()
    for members in by_md5.values():
        if len({s.label for s in members}) > 1:
            dropped["duplicate image with conflicting labels"] += len(members)
        else:
            groups.append(sorted(members, key=lambda s: s.key))
    return sorted(groups, key=lambda g: g[0].key), dropped


def group_same_bin(groups: Sequence[list[Sample]]) -> list[list[Sample]]:
    """Groups joined wherever their photos list a product in common, in the order of their first group.

    ABID photographs a bin again after each pick or stow: such photos share products and differ in count (in
    the 407-photo sample, 228 photos fall in 110 groups and no two photos of a group have the same count). A bin
    split between training and evaluation is recalled, not counted: the model answers its twin's count.
    """
    parent = list(range(len(groups)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    holder: dict[str, int] = {}
    for i, group in enumerate(groups):
        for product in sorted(frozenset().union(*(s.products for s in group))):
            parent[root(i)] = root(holder.setdefault(product, i))
    merged: dict[int, list[Sample]] = {}
    for i, group in enumerate(groups):
        merged.setdefault(root(i), []).extend(group)
    return [sorted(m, key=lambda s: s.key) if len(m) > 1 else m for m in merged.values()]


def _size(groups: list[list[Sample]]) -> int:
    return sum(len(g) for g in groups)


def undersample(by_class: dict[int, list[list[Sample]]], rng: random.Random) -> dict[int, list[list[Sample]]]:
    """Every class down to the smallest class's image count, keeping whole duplicate groups."""
    target = min(_size(g) for g in by_class.values())
    out = {}
    for label, groups in sorted(by_class.items()):
        shuffled = groups[:]
        rng.shuffle(shuffled)
        kept, n = [], 0
        for g in shuffled:
            if n + len(g) <= target:
                kept.append(g)
                n += len(g)
        out[label] = kept
    return out


def stratified_split(groups: Sequence[list[Sample]], fractions: Sequence[float], rng: random.Random,
                     names: Sequence[str] = SPLITS) -> dict[str, list[Sample]]:
    """Whole groups into splits with per-class largest-remainder targets.

    Groups of several counts (one bin's photos) go first, shuffled, biggest first, each to the split it overfills
    least (then the one with the largest share of its room left): one that fits no evaluation split lands in train. Then per class the
    shuffled one-count groups fill the splits in order up to what is left of their targets; those that fit
    nowhere go to the first split (train), never to an evaluation split.
    """
    classes = sorted({s.label for g in groups for s in g})
    targets = {c: dict(zip(names, _largest_remainder(sum(s.label == c for g in groups for s in g), fractions)))
               for c in classes}
    taken = {c: dict.fromkeys(names, 0) for c in classes}
    splits: dict[str, list[Sample]] = {n: [] for n in names}
    mixed = [g for g in groups if len({s.label for s in g}) > 1]
    if mixed:
        rng.shuffle(mixed)
        for group in sorted(mixed, key=len, reverse=True):
            need = Counter(s.label for s in group)

            def cost(name: str) -> tuple[int, float]:
                over = sum(max(0, taken[c][name] + n - targets[c][name]) for c, n in need.items())
                target = sum(targets[c][name] for c in classes)
                return over, -sum(targets[c][name] - taken[c][name] for c in classes) / max(1, target)

            best = min(names, key=cost)
            splits[best].extend(group)
            for c, n in need.items():
                taken[c][best] += n
    for c in classes:
        pure = [g for g in groups if g[0].label == c and len({s.label for s in g}) == 1]
        rng.shuffle(pure)
        i = 0
        for name in names:
            room = targets[c][name] - taken[c][name]
            while i < len(pure) and len(pure[i]) <= room:
                splits[name].extend(pure[i])
                room -= len(pure[i])
                i += 1
        for g in pure[i:]:
            splits[names[0]].extend(g)
    return splits


def _largest_remainder(n: int, fractions: Sequence[float]) -> list[int]:
    exact = [n * f for f in fractions]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def oversample(train: list[Sample], rng: random.Random) -> list[Sample]:
    """Repeat randomly chosen training samples of smaller classes up to the largest class's count."""
    by_label: dict[int, list[Sample]] = defaultdict(list)
    for s in train:
        by_label[s.label].append(s)
    target = max(len(v) for v in by_label.values())
    out = list(train)
    for label, members in sorted(by_label.items()):
        out.extend(rng.choices(members, k=target - len(members)))
    return out


def _count(samples: Sequence[Sample], classes: Sequence[int]) -> dict[str, int]:
    c = Counter(s.label for s in samples)
    return {str(k): c.get(k, 0) for k in classes}


def prepare(cfg: PrepareConfig) -> PrepareResult:
    _validate(cfg)
    store = open_store(cfg.store)
    store.check()
    samples, rejected = scan(store, cfg.workers)
    labels_found = Counter(s.label for s in samples)
    groups, dropped = group_duplicates(samples)
    rejected.update(dropped)

    classes = sorted(set(cfg.classes))
    by_class: dict[int, list[list[Sample]]] = {c: [] for c in classes}
    for g in groups:
        if g[0].label in by_class:
            by_class[g[0].label].append(g)
        else:
            rejected["label outside --classes"] += len(g)
    empty = [c for c, g in by_class.items() if not g]
    if empty:
        raise BincountError(f"no images with EXPECTED_QUANTITY {', '.join(map(str, empty))} in {store.uri}; "
                            f"found {dict(sorted(labels_found.items())) or 'none'}; adjust --classes")
    raw = [s for gs in by_class.values() for g in gs for s in g]

    rng = random.Random(cfg.seed)
    if cfg.balance == "undersample":
        by_class = undersample(by_class, rng)
    bins = group_same_bin([g for groups_of_class in by_class.values() for g in groups_of_class])
    splits = stratified_split(bins, cfg.split, rng)
    if cfg.balance == "oversample":
        splits["train"] = oversample(splits["train"], rng)

    # a bin's photos carry its first key, so training can compare the counts of one bin (`same_bin_rank_weight`)
    bin_of = {s.key: g[0].key for g in bins if len(g) > 1 for s in g}
    for split in SPLITS:
        records = sorted(splits[split], key=lambda s: s.key)
        store.put_text(dataset_key(cfg.name, f"{split}.jsonl"), "".join(
            json.dumps({"key": s.key, "label": s.label, **({"bin": bin_of[s.key]} if s.key in bin_of else {})})
            + "\n" for s in records))
    duplicated = [g for g in groups if len(g) > 1]
    same_bin = [g for g in bins if len({s.md5 for s in g}) > 1]
    stats = {
        "name": cfg.name,
        "store": store.uri,
        "classes": classes,
        "balance": cfg.balance,
        "split": list(cfg.split),
        "seed": cfg.seed,
        "labels_found": {str(k): v for k, v in sorted(labels_found.items())},
        "counts": {
            "raw": _count(raw, classes),
            "balanced": _count([s for split in SPLITS for s in splits[split]], classes),
            "splits": {split: _count(splits[split], classes) for split in SPLITS},
        },
        "rejected": dict(sorted(rejected.items())),
        "duplicates": {"groups": len(duplicated), "images": _size(duplicated)},
        "same_bin": {"groups": len(same_bin), "images": _size(same_bin)},
    }
    store.put_text(dataset_key(cfg.name, "stats.json"), json.dumps(stats, indent=2) + "\n")
    return PrepareResult(cfg.name, store.url(f"datasets/{cfg.name}"), stats)
