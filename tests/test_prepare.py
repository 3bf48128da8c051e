"""`bincount data prepare`: labels, balancing, stratified split, duplicates, determinism."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from bincount.cli import main
from bincount.config import PrepareConfig
from bincount.data.prepare import SPLITS, prepare
from bincount.store import LocalStore


@pytest.fixture(scope="module")
def real_store(abid_sample, tmp_path_factory) -> Path:
    """The 407 real sample pairs in a local store's raw/ layout."""
    root = tmp_path_factory.mktemp("real")
    shutil.copytree(abid_sample / "bin-images", root / "raw" / "bin-images")
    shutil.copytree(abid_sample / "metadata", root / "raw" / "metadata")
    return root


def write_pair(root: Path, key: str, label: int | None, image: bytes) -> None:
    (root / "raw" / "bin-images").mkdir(parents=True, exist_ok=True)
    (root / "raw" / "metadata").mkdir(parents=True, exist_ok=True)
    (root / "raw" / "bin-images" / f"{key}.jpg").write_bytes(image)
    meta = {"BIN_FCSKU_DATA": {}} | ({"EXPECTED_QUANTITY": label} if label is not None else {})
    (root / "raw" / "metadata" / f"{key}.json").write_text(json.dumps(meta))


def manifests(root: Path, name: str) -> dict[str, list[dict]]:
    return {s: [json.loads(line) for line in (root / "datasets" / name / f"{s}.jsonl").read_text().splitlines()]
            for s in SPLITS}


def test_undersample_gives_equal_classes_and_stratified_splits(real_store):
    result = prepare(PrepareConfig(store=str(real_store), name="u"))
    m = manifests(real_store, "u")
    per_split = {s: Counter(r["label"] for r in m[s]) for s in SPLITS}
    smallest = min(result.stats["counts"]["raw"].values())
    for label in range(1, 6):
        total = sum(per_split[s][label] for s in SPLITS)
        assert total == smallest == 67
        for split, frac in zip(SPLITS, (0.7, 0.2, 0.1)):
            assert abs(per_split[split][label] - total * frac) <= 1, (split, label)
    assert result.stats["counts"]["raw"] == {"1": 67, "2": 88, "3": 90, "4": 87, "5": 75}
    assert result.stats["counts"]["splits"]["train"] == {str(c): per_split["train"][c] for c in range(1, 6)}


def test_every_key_in_exactly_one_split_with_its_metadata_label(real_store, abid_sample):
    prepare(PrepareConfig(store=str(real_store), name="none", balance="none"))
    m = manifests(real_store, "none")
    keys = [r["key"] for s in SPLITS for r in m[s]]
    assert len(keys) == len(set(keys)) == 407
    for record in (r for s in SPLITS for r in m[s]):
        meta = json.loads((abid_sample / "metadata" / f"{record['key']}.json").read_text())
        assert record["label"] == meta["EXPECTED_QUANTITY"]
        assert isinstance(record["key"], str)


def test_same_seed_same_bytes_other_seed_differs(real_store):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        prepare(PrepareConfig(store=str(real_store), name=name, seed=seed))
    files = ("train.jsonl", "val.jsonl", "test.jsonl", "stats.json")
    read = {n: [(real_store / "datasets" / n / f).read_bytes() for f in files] for n in "abc"}
    assert read["a"][:3] == read["b"][:3]
    assert read["a"][:3] != read["c"][:3]


def test_oversample_repeats_train_only(real_store):
    prepare(PrepareConfig(store=str(real_store), name="o", balance="oversample"))
    m = manifests(real_store, "o")
    train = Counter(r["label"] for r in m["train"])
    assert len(set(train.values())) == 1 and train[3] == 63
    for split in ("val", "test"):
        keys = [r["key"] for r in m[split]]
        assert len(keys) == len(set(keys)), "no repeats in evaluation splits"
    train_keys = {r["key"] for r in m["train"]}
    assert not train_keys & {r["key"] for s in ("val", "test") for r in m[s]}


def test_byte_identical_images_never_straddle_splits(tmp_path):
    from PIL import Image
    import io

    def jpeg(seed: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (32, 24), (seed * 7 % 256, seed * 13 % 256, seed * 31 % 256)).save(buf, "JPEG")
        return buf.getvalue()

    for i in range(60):
        label = i % 3 + 1
        write_pair(tmp_path, f"{i:05d}", label, jpeg(i))
    dup_groups = []
    for g in range(8):
        original = f"{g * 3:05d}"
        copies = [f"dup{g}-{c}" for c in range(3)]
        for key in copies:
            write_pair(tmp_path, key, g * 3 % 3 + 1, jpeg(g * 3))
        dup_groups.append([original, *copies])
    write_pair(tmp_path, "conflict-a", 1, jpeg(999))
    write_pair(tmp_path, "conflict-b", 2, jpeg(999))
    result = prepare(PrepareConfig(store=str(tmp_path), name="d", balance="none", classes=(1, 2, 3), seed=1))
    m = manifests(tmp_path, "d")
    where = {r["key"]: s for s in SPLITS for r in m[s]}
    for group in dup_groups:
        assert len({where[k] for k in group}) == 1, group
    assert "conflict-a" not in where and "conflict-b" not in where
    assert result.stats["rejected"]["duplicate image with conflicting labels"] == 2
    assert result.stats["duplicates"] == {"groups": 8, "images": 32}


def test_photos_of_one_bin_stay_in_one_split(real_store, abid_sample):
    """In the sample, consecutive photos of one bin share products and never their count: split apart, a model
    that recognises the bin is scored on its twin's count."""
    result = prepare(PrepareConfig(store=str(real_store), name="bins", balance="none", seed=3))
    m = manifests(real_store, "bins")
    products = {p.stem: set(json.loads(p.read_text())["BIN_FCSKU_DATA"]) for p in (abid_sample / "metadata").glob("*.json")}
    in_split = {s: set().union(*(products[r["key"]] for r in m[s])) for s in SPLITS}
    assert not in_split["train"] & in_split["val"] and not in_split["train"] & in_split["test"]
    assert not in_split["val"] & in_split["test"]
    assert result.stats["same_bin"] == {"groups": 110, "images": 228}
    sizes = {s: len(m[s]) for s in SPLITS}
    assert abs(sizes["val"] - 0.2 * 407) <= 5 and abs(sizes["test"] - 0.1 * 407) <= 5, sizes
    assert "photos sharing a product (one bin, other counts): 228 in 110 groups" in result.summary()
    bins: dict[str, list[dict]] = {}
    for r in (r for s in SPLITS for r in m[s] if "bin" in r):
        bins.setdefault(r["bin"], []).append(r)
    assert len(bins) == 110 and sum(map(len, bins.values())) == 228
    for members in bins.values():       # one bin: products in common, counts apart, its first key as its name
        assert set.intersection(*(products[r["key"]] for r in members)) or len(members) > 2
        assert len({r["label"] for r in members}) > 1 and members[0]["bin"] == min(r["key"] for r in members)


def test_bad_pairs_are_counted_not_fatal(tmp_path):
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG")
    for i in range(10):
        write_pair(tmp_path, f"k{i}", i % 2 + 1, buf.getvalue() + bytes([i]))
    write_pair(tmp_path, "noqty", None, buf.getvalue())
    write_pair(tmp_path, "twelve", 12, buf.getvalue() + b"12")
    (tmp_path / "raw" / "metadata" / "orphan.json").write_text('{"EXPECTED_QUANTITY": 1}')
    result = prepare(PrepareConfig(store=str(tmp_path), name="bad", balance="none", classes=(1, 2)))
    assert result.stats["rejected"] == {"image missing": 1, "label outside --classes": 1,
                                        "no EXPECTED_QUANTITY": 1}
    assert result.stats["labels_found"] == {"1": 5, "2": 5, "12": 1}


def test_prepare_through_s3_store(s3_env, abid_sample):
    bucket = s3_env.new_bucket("prep")
    client = s3_env.client()
    keys = sorted(p.stem for p in (abid_sample / "metadata").glob("*.json"))[:40]
    for k in keys:
        client.fput_object(bucket, f"root/raw/bin-images/{k}.jpg", str(abid_sample / "bin-images" / f"{k}.jpg"))
        client.fput_object(bucket, f"root/raw/metadata/{k}.json", str(abid_sample / "metadata" / f"{k}.json"))
    result = prepare(PrepareConfig(store=f"s3://{bucket}/root", name="s3", balance="none"))
    assert sum(sum(v.values()) for v in result.stats["counts"]["splits"].values()) == 40
    listed = sorted(o.object_name for o in client.list_objects(bucket, prefix="root/datasets/", recursive=True))
    assert listed == [f"root/datasets/s3/{f}" for f in ("stats.json", "test.jsonl", "train.jsonl", "val.jsonl")]


@pytest.mark.parametrize("args, message", [
    (["--split", "0.5,0.2"], "expected 3 values"),
    (["--split", "0.5,0.2,0.2"], "summing to 1"),
    (["--classes", "1,9"], "no images with EXPECTED_QUANTITY 9"),
    (["--name", "../escape"], "dataset name"),
])
def test_bad_options_are_one_clear_error(args, message, tmp_path, capsys):
    write_pair(tmp_path, "a", 1, b"x")
    base = {"--store": str(tmp_path), "--name": "n"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["data", "prepare", *[x for kv in base.items() for x in kv]]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("bincount: error: ") and message in err and "Traceback" not in err


def test_empty_store_suggests_a_source(tmp_path, capsys):
    assert main(["data", "prepare", "--store", str(tmp_path), "--name", "n"]) == 1
    assert "run `bincount data synthetic` or `bincount data download` first" in capsys.readouterr().err
    assert not LocalStore(tmp_path).exists("datasets/n/stats.json")
