"""EDA report over a small dataset prepared (by `prepare`) from real ABID photos: figures, links, numbers."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import statistics
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from bincount.cli import main
from bincount.config import EdaConfig, PrepareConfig
from bincount.data import eda
from bincount.data.eda import build_report
from bincount.data.prepare import prepare
from bincount.errors import BincountError
from bincount.store import LocalStore, open_store

PER_CLASS = {1: 6, 2: 8, 3: 10, 4: 12, 5: 14}
FIGURES = ("counts.png", "splits.png", "sizes.png", "aspect.png", "filesize.png", "skus.png", "samples.png")


def _sample_keys(abid_sample: Path) -> dict[int, list[str]]:
    """The first PER_CLASS[c] keys of each class: unequal classes, so balancing has work to do."""
    by_class: dict[int, list[str]] = {c: [] for c in PER_CLASS}
    for path in sorted((abid_sample / "metadata").glob("*.json")):
        label = json.loads(path.read_text())["EXPECTED_QUANTITY"]
        if label in by_class and len(by_class[label]) < PER_CLASS[label]:
            by_class[label].append(path.stem)
    return by_class


def _load_raw(store, abid_sample: Path, keys: dict[int, list[str]]) -> None:
    for key in (k for ks in keys.values() for k in ks):
        store.put_file(f"raw/bin-images/{key}.jpg", abid_sample / "bin-images" / f"{key}.jpg")
        store.put_file(f"raw/metadata/{key}.json", abid_sample / "metadata" / f"{key}.json")


@pytest.fixture(scope="module")
def sample_keys(abid_sample) -> dict[int, list[str]]:
    return _sample_keys(abid_sample)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, abid_sample, sample_keys) -> Path:
    """A local store with 50 real pairs and two datasets: `mini` (undersampled) and `over` (oversampled)."""
    root = tmp_path_factory.mktemp("eda-store")
    _load_raw(LocalStore(root), abid_sample, sample_keys)
    prepare(PrepareConfig(store=str(root), name="mini", workers=4))
    prepare(PrepareConfig(store=str(root), name="over", balance="oversample", workers=4))
    return root


@pytest.fixture(scope="module")
def reports(prepared) -> dict[str, eda.EdaResult]:
    return {name: build_report(EdaConfig(store=str(prepared), name=name, workers=4)) for name in ("mini", "over")}


def _report_dir(root: Path, name: str) -> Path:
    return root / "reports" / name / "eda"


def _manifests(root: Path, name: str) -> dict[str, list[dict]]:
    base = root / "datasets" / name
    return {s: [json.loads(line) for line in (base / f"{s}.jsonl").read_text().splitlines()]
            for s in ("train", "val", "test")}


def _md_table(markdown: str, header_start: str) -> dict[str, dict[str, str]]:
    """The markdown table whose header begins with `header_start`, as {first cell: {column: cell}}."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def _label(c: int) -> str:
    return f"{c} item" if c == 1 else f"{c} items"


def test_every_figure_is_a_readable_png_of_sensible_size(prepared, reports):
    out = _report_dir(prepared, "mini")
    assert sorted(p.name for p in out.glob("*.png")) == sorted(FIGURES)
    for name in FIGURES:
        path = out / name
        assert path.stat().st_size < 3 * 1024 * 1024, name
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG", name
            assert image.width >= 400 and image.height >= 300, (name, image.size)
            extrema = image.convert("L").getextrema()
            assert extrema[1] - extrema[0] > 100, f"{name} looks blank: {extrema}"
    expected = (*FIGURES, "report.md", "report.html")
    assert sorted(reports["mini"].files) == sorted(f"reports/mini/eda/{n}" for n in expected)


def test_markdown_links_every_figure_and_every_link_exists(prepared):
    out = _report_dir(prepared, "mini")
    markdown = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(links) == sorted(FIGURES)
    assert all((out / link).is_file() for link in links)


class _Resources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.tags: Counter = Counter()

    def handle_starttag(self, tag, attrs):
        self.tags[tag] += 1
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data", "poster", "action"):
                self.refs.append((tag, name, value or ""))


def test_html_is_self_contained_and_embeds_every_figure(prepared):
    out = _report_dir(prepared, "mini")
    text = (out / "report.html").read_text()
    parser = _Resources()
    parser.feed(text)
    assert all(tag == "img" and name == "src" for tag, name, _ in parser.refs), parser.refs
    prefix = "data:image/png;base64,"
    assert all(value.startswith(prefix) for _, _, value in parser.refs)
    embedded = sorted(base64.b64decode(value[len(prefix):]) for _, _, value in parser.refs)
    assert embedded == sorted((out / name).read_bytes() for name in FIGURES)
    assert "http://" not in text and "https://" not in text and "url(" not in text and "@import" not in text
    assert parser.tags["table"] >= 2 and parser.tags["style"] == 1
    assert "<th>Mean aspect</th>" in text and "<td>5 items</td>" in text


@pytest.mark.parametrize("name", ["mini", "over"])
def test_class_counts_match_manifests_and_stats(prepared, name):
    markdown = (_report_dir(prepared, name) / "report.md").read_text()
    table = _md_table(markdown, "| Class | Raw")
    stats = json.loads((prepared / "datasets" / name / "stats.json").read_text())
    manifests = _manifests(prepared, name)
    for c, n in PER_CLASS.items():
        row = table[_label(c)]
        assert int(row["Raw"]) == n == stats["counts"]["raw"][str(c)]
        assert int(row["Balanced"]) == stats["counts"]["balanced"][str(c)]
        for split, rows in manifests.items():
            assert int(row[split.capitalize()]) == sum(r["label"] == c for r in rows), (c, split)
        assert int(row["Distinct"]) == len({r["key"] for rows in manifests.values() for r in rows if r["label"] == c})
    assert int(table["All"]["Train"]) == len(manifests["train"])
    if name == "over":
        assert int(table["All"]["Distinct"]) == sum(PER_CLASS.values()) < int(table["All"]["Balanced"])
    else:
        assert {table[_label(c)]["Balanced"] for c in PER_CLASS} == {str(min(PER_CLASS.values()))}


def test_size_table_matches_the_photos(prepared, abid_sample):
    """Statistics recomputed here by fully decoding each photo of the dataset."""
    markdown = (_report_dir(prepared, "over") / "report.md").read_text()
    table = _md_table(markdown, "| Class | Images | Mean W")
    labels = {r["key"]: r["label"] for rows in _manifests(prepared, "over").values() for r in rows}
    for c in PER_CLASS:
        sizes = []
        for key in (k for k, label in labels.items() if label == c):
            with Image.open(abid_sample / "bin-images" / f"{key}.jpg") as image:
                image.load()
                sizes.append(image.size)
        row = table[_label(c)]
        assert int(row["Images"]) == len(sizes)
        assert int(row["Min W"]) == min(w for w, _ in sizes) and int(row["Max W"]) == max(w for w, _ in sizes)
        assert int(row["Min H"]) == min(h for _, h in sizes) and int(row["Max H"]) == max(h for _, h in sizes)
        assert float(row["Mean W"]) == pytest.approx(statistics.fmean(w for w, _ in sizes), abs=0.05)
        assert float(row["Mean aspect"]) == pytest.approx(statistics.fmean(w / h for w, h in sizes), abs=5e-4)
    assert int(table["All"]["Images"]) == len(labels)


def test_cli_rerun_prints_where_the_report_is_and_rewrites_identical_bytes(prepared, reports, capsys):
    out = _report_dir(prepared, "mini")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["data", "eda", "--store", str(prepared), "--name", "mini", "--workers", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert str(out / "report.html") in lines[0]
    assert "30 distinct images" in lines[1] and "per class 1: 6, 2: 6" in lines[1]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_missing_dataset_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(BincountError, match=r"datasets/nope/stats\.json.*bincount data prepare"):
        build_report(EdaConfig(store=str(tmp_path), name="nope"))
    assert main(["data", "eda", "--store", str(tmp_path), "--name", "nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bincount: error: dataset 'nope' not found")
    assert not (tmp_path / "reports").exists()


@pytest.fixture
def copied(prepared, tmp_path) -> Path:
    """A private copy of the `mini` dataset and its raw pairs, for tests that damage it."""
    root = tmp_path / "store"
    shutil.copytree(prepared / "raw", root / "raw")
    shutil.copytree(prepared / "datasets" / "mini", root / "datasets" / "mini")
    return root


def test_missing_image_names_the_key_and_writes_nothing(copied):
    key = json.loads((copied / "datasets" / "mini" / "val.jsonl").read_text().splitlines()[0])["key"]
    (copied / "raw" / "bin-images" / f"{key}.jpg").unlink()
    with pytest.raises(BincountError, match=rf"lists key '{key}'.*raw/bin-images/{key}\.jpg"):
        build_report(EdaConfig(store=str(copied), name="mini", workers=2))
    assert not (copied / "reports").exists()


def test_manifest_that_disagrees_with_stats_and_metadata_is_flagged(copied):
    val = copied / "datasets" / "mini" / "val.jsonl"
    rows = [json.loads(line) for line in val.read_text().splitlines()]
    rows[0]["label"] = rows[0]["label"] % 5 + 1
    val.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = build_report(EdaConfig(store=str(copied), name="mini", samples_per_class=1, workers=2))
    markdown = (_report_dir(copied, "mini") / "report.md").read_text()
    assert "Warning: stats.json counts for val differ from val.jsonl; the stats may be stale" in markdown
    assert "Warning: 1 image(s) have a manifest label that differs from their EXPECTED_QUANTITY" in markdown
    assert "2 warning(s)" in result.summary()


class _RecordingStore(LocalStore):
    def __init__(self, root):
        super().__init__(root)
        self.reads: list[tuple[str, int | None]] = []

    def get(self, key, offset=0, length=None):
        self.reads.append((key, length))
        return super().get(key, offset, length)


def test_sizes_come_from_the_header_with_a_full_read_when_it_is_longer(tmp_path, abid_sample, sample_keys):
    store = _RecordingStore(tmp_path)
    small = sample_keys[2][0]
    _load_raw(store, abid_sample, {2: [small]})
    image = Image.new("RGB", (321, 123), "gray")
    buf = io.BytesIO()
    image.save(buf, "JPEG", icc_profile=bytes(range(256)) * 400)
    assert len(buf.getvalue()) > eda.HEADER_BYTES
    store.put("raw/bin-images/big-header.jpg", buf.getvalue())
    store.put_file("raw/metadata/big-header.json", abid_sample / "metadata" / f"{small}.json")

    facts, _ = eda._read_one(store, small, 2, thumbnail=False)
    with Image.open(abid_sample / "bin-images" / f"{small}.jpg") as photo:
        assert (facts.width, facts.height) == photo.size
    assert facts.nbytes == (abid_sample / "bin-images" / f"{small}.jpg").stat().st_size
    assert (f"raw/bin-images/{small}.jpg", eda.HEADER_BYTES) in store.reads
    assert (f"raw/bin-images/{small}.jpg", None) not in store.reads

    facts, _ = eda._read_one(store, "big-header", 2, thumbnail=False)
    assert (facts.width, facts.height, facts.nbytes) == (321, 123, len(buf.getvalue()))
    assert ("raw/bin-images/big-header.jpg", None) in store.reads


def test_report_through_an_s3_store_matches_the_local_one(s3_env, abid_sample, sample_keys, prepared, reports):
    bucket = s3_env.new_bucket("eda")
    uri = f"s3://{bucket}/root"
    store = open_store(uri)
    _load_raw(store, abid_sample, sample_keys)
    prepare(PrepareConfig(store=uri, name="mini", workers=8))
    result = build_report(EdaConfig(store=uri, name="mini", workers=8))
    assert result.uri == f"{uri}/reports/mini/eda/report.html"
    assert all(store.exists(key) for key in result.files)

    def body(markdown: str) -> list[str]:
        return [line for line in markdown.splitlines() if not line.startswith("Store ")]

    local = (_report_dir(prepared, "mini") / "report.md").read_text()
    assert body(store.get_text("reports/mini/eda/report.md")) == body(local)
    with Image.open(io.BytesIO(store.get("reports/mini/eda/samples.png"))) as image:
        assert image.format == "PNG" and image.width >= 400
