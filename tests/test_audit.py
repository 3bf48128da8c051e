"""The inventory audit on real ABID photos: counts and p_mismatch as the exported model computes them, bad images
and bad expected quantities counted by reason, string keys, the report, resumption after a kill, several workers,
and the endpoint agreeing with the audit on the same photo."""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bincount.audit.flagging import Policy, p_wrong
from bincount.cli import main
from bincount.config import ServeConfig
from bincount.model.exported import ExportedModel
from bincount.processes import free_port
from bincount.serve.local import start
from serve_support import export_model, real_photos
from training_data import subprocess_env

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BINS = 48


def _copy_pair(sample: Path, store: Path, key: str, as_key: str | None = None) -> None:
    for folder, suffix in (("bin-images", ".jpg"), ("metadata", ".json")):
        dest = store / "raw" / folder / f"{as_key or key}{suffix}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample / folder / f"{key}{suffix}", dest)


@pytest.fixture(scope="module")
def audited_store(abid_sample, tmp_path_factory) -> tuple[Path, list[str]]:
    """A store with BINS real pairs, a model fitted on other real photos, and planted bad pairs."""
    root = tmp_path_factory.mktemp("store")
    keys = sorted(p.stem for p in (abid_sample / "metadata").glob("*.json"))
    for key in keys[-BINS:]:
        _copy_pair(abid_sample, root, key)
    export_model(root, real_photos(abid_sample, 4))
    raw = root / "raw"
    photo = (abid_sample / "bin-images" / f"{keys[0]}.jpg").read_bytes()
    (raw / "bin-images" / "zz-corrupt.jpg").write_bytes(photo[: len(photo) // 3])
    (raw / "metadata" / "zz-corrupt.json").write_text('{"EXPECTED_QUANTITY": 2}')
    (raw / "bin-images" / "zz-noqty.jpg").write_bytes(photo)
    (raw / "metadata" / "zz-noqty.json").write_text("{}")
    (raw / "bin-images" / "zz-nine.jpg").write_bytes(photo)
    (raw / "metadata" / "zz-nine.json").write_text('{"EXPECTED_QUANTITY": 9}')
    (raw / "bin-images" / "zz-nometa.jpg").write_bytes(photo)
    return root, keys[-BINS:]


def _records(root: Path, name: str) -> list[dict]:
    shards = sorted((root / "audits" / name / "shards").glob("*.jsonl"))
    return [json.loads(line) for shard in shards for line in shard.read_text().splitlines()]


def _audit(root: Path, *args: str) -> int:
    return main(["audit", "--store", str(root), "--model", "test", "--precision", "fp32", *args])


def test_audit_counts_real_photos_as_the_exported_model_does(audited_store, capsys):
    root, keys = audited_store
    code = _audit(root, "--all", "--name", "all", "--shard-size", "16", "--batch-size", "5", "--top", "10")
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "audited 51 of 52 bins (1 image(s) unreadable)" in out and out.count("\n") == 1
    assert "flagged (expected precision ≥ 50 %), expected to hold" in out
    assert ("no usable expected quantity: 1 no EXPECTED_QUANTITY, 1 no metadata, 1 outside the model's classes"
            in out)
    records = {r["key"]: r for r in _records(root, "all")}
    assert len(list((root / "audits/all/shards").glob("*.jsonl"))) == 4 and len(records) == BINS + 4

    # The same photos through the model by hand: its preprocessing, a plain fp32 forward pass, softmax.
    model = ExportedModel.load(str(root / "models/test"))
    photos = torch.stack([model.preprocessing.read((root / f"raw/bin-images/{k}.jpg").read_bytes()) for k in keys])
    with torch.no_grad():
        expected_p = model.net(model.preprocessing.normalize(photos, torch.device("cpu"))).softmax(1)
    for key, p in zip(keys, expected_p.tolist()):
        r = records[key]
        label = json.loads((root / f"raw/metadata/{key}.json").read_text())["EXPECTED_QUANTITY"]
        assert r["expected"] == label and r["count"] == 1 + max(range(5), key=p.__getitem__)
        assert list(r["probabilities"].values()) == pytest.approx(p, abs=1e-5)
        assert r["p_mismatch"] == pytest.approx(1 - p[label - 1], abs=1e-5)

    assert records["zz-corrupt"]["error"] == "corrupt" and "count" not in records["zz-corrupt"]
    assert records["zz-noqty"] == {**records["zz-noqty"], "expected": None, "expected_problem": "no EXPECTED_QUANTITY"}
    assert records["zz-nine"]["expected_problem"] == "outside the model's classes" and records["zz-nine"]["stated"] == 9
    assert records["zz-nometa"]["expected_problem"] == "no metadata" and "p_mismatch" not in records["zz-nometa"]

    summary = json.loads((root / "audits/all/summary.json").read_text())
    scored = [r for r in records.values() if "p_mismatch" in r]
    assert summary["with_expected"] == len(scored) == BINS and summary["policy"] == "expected precision ≥ 50 %"
    assert summary["error_rate_source"] == "estimated" and 0 < summary["error_rate"] < 1
    start = summary["flagged_from_p_mismatch"]
    flagged = [r["p_mismatch"] for r in scored if start is not None and r["p_mismatch"] >= start]
    assert summary["flagged"] == len(flagged)
    wrong = [p_wrong(m, summary["error_rate"], 5) for m in flagged]
    assert summary["expected_wrong_flagged"] == pytest.approx(sum(wrong), abs=0.01 * len(flagged) + 1e-9)
    assert summary["expected_wrong_all"] == pytest.approx(summary["error_rate"] * BINS)
    assert summary["image_failures"] == {"corrupt": 1}
    assert summary["expected_problems"] == {"no EXPECTED_QUANTITY": 1, "no metadata": 1,
                                            "outside the model's classes": 1}
    for c, row in summary["per_class"].items():
        mine = [r for r in scored if r["expected"] == int(c)]
        assert row["bins"] == len(mine)
        if mine:
            assert row["agreement"] == pytest.approx(sum(r["count"] == r["expected"] for r in mine) / len(mine))

    md = (root / "audits/all/report.md").read_text()
    top = sorted(scored, key=lambda r: (-r["p_mismatch"], r["key"]))[:10]
    table = [line.split(" | ")[0].strip("| ") for line in md.splitlines() if line.startswith("| ")][-10:]
    assert table == [r["key"] for r in top]
    page = (root / "audits/all/report.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 10 and page.count("data:image/png;base64,") == 1
    assert "http://" not in page and "https://" not in page and "src='p_mismatch" not in page
    assert (root / "audits/all/p_mismatch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_keys_stay_strings_and_a_csv_of_expected_quantities_reports_bad_rows(audited_store, abid_sample, tmp_path,
                                                                           capsys):
    root, keys = audited_store
    _copy_pair(abid_sample, root, keys[0], "00221")
    _copy_pair(abid_sample, root, keys[1], "221")
    ids = tmp_path / "ids.txt"
    ids.write_text("00221\n221\n\nzz-nometa\nghost\n")
    csv = tmp_path / "expected.csv"
    csv.write_text("key,expected\n00221,3\n221,1\n221,2\nnosuch,4\n00221x\nzz-nometa,two\n")
    code = _audit(root, "--ids", f"@{ids}", "--expected", str(csv), "--name", "csv")
    assert code == 0, capsys.readouterr().err
    records = {r["key"]: r for r in _records(root, "csv")}
    assert set(records) == {"00221", "221", "zz-nometa", "ghost"}
    assert records["ghost"]["error"] == "missing" and "count" not in records["ghost"]
    assert records["00221"]["expected"] == 3 and records["221"]["expected"] == 1
    assert records["00221"]["p_mismatch"] == pytest.approx(1 - records["00221"]["probabilities"]["3"])
    assert records["zz-nometa"]["expected_problem"] == "not in the CSV"
    summary = json.loads((root / "audits/csv/summary.json").read_text())
    assert summary["expected_problems"] == {"duplicate key": 1, "key not in the audited bins": 1,
                                            "not two columns": 1, "expected is not a count": 1,
                                            "not in the CSV": 2}
    assert summary["image_failures"] == {"missing": 1} and summary["audited"] == 3


@pytest.mark.parametrize("args, message", [
    (["--model", "nosuch", "--all"], "no exported model"),
    (["--model", "test"], "exactly one of"),
    (["--model", "test", "--all", "--modified-after", "yesterday"], "not an ISO 8601 time"),
    (["--model", "test", "--ids", "x", "--expected", "missing.csv"], "cannot read expected quantities"),
    (["--model", "test", "--all", "--review", "-3"], "review must be 0 or more"),
    (["--model", "test", "--all", "--target-precision", "1.5"], "target precision in (0, 1)"),
    (["--model", "test", "--all", "--error-rate", "1"], "error_rate in [0, 1)"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(audited_store, args, message, capsys):
    root, _ = audited_store
    before = sorted(p for p in root.rglob("*"))
    code = main(["audit", "--store", str(root), "--name", "bad", *args])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and message in err and "Traceback" not in err
    assert sorted(p for p in root.rglob("*")) == before


def test_an_unreachable_store_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setenv("S3_ENDPOINT", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("S3_SECURE", "0")
    code = main(["audit", "--store", "s3://nosuch-bucket", "--model", "m", "--all"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "cannot reach S3 endpoint" in err


def test_a_rerun_with_other_settings_is_refused(audited_store, capsys):
    root, keys = audited_store
    assert _audit(root, "--ids", keys[0], "--name", "once") == 0
    assert _audit(root, "--ids", keys[1], "--name", "once") == 1
    assert "already exists" in capsys.readouterr().err


def test_modified_after_and_after_select_among_all(audited_store, tmp_path):
    root, keys = audited_store
    store = tmp_path / "store"
    shutil.copytree(root / "raw", store / "raw")
    shutil.copytree(root / "models", store / "models")
    for p in (store / "raw/bin-images").glob("*.jpg"):
        os.utime(p, (1_600_000_000, 1_600_000_000))             # 2020-09-13
    os.utime(store / f"raw/bin-images/{keys[3]}.jpg", (1_700_000_000, 1_700_000_000))   # 2023-11-14
    assert _audit(store, "--all", "--modified-after", "2021-01-01T00:00:00Z", "--name", "late") == 0
    assert [r["key"] for r in _records(store, "late")] == [keys[3]]
    assert _audit(store, "--all", "--after", "zz-nine", "--name", "after") == 0
    assert [r["key"] for r in _records(store, "after")] == ["zz-nometa", "zz-noqty"]
    os.utime(store / f"raw/bin-images/{keys[5]}.jpg")                                  # now
    assert _audit(store, "--all", "--modified-after", "1d", "--name", "day-{date}") == 0
    assert [r["key"] for r in _records(store, f"day-{time.strftime('%Y-%m-%d', time.gmtime())}")] == [keys[5]]


def _worker_run(root: Path, name: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bincount.cli", "audit", "--store", str(root), "--model", "test",
                             "--all", "--name", name, "--shard-size", "2", "--batch-size", "2", "--precision", "fp32",
                             *extra], env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_killed_audit_resumes_and_ends_with_the_same_output(audited_store):
    root, _ = audited_store
    proc = _worker_run(root, "killed")
    shards = root / "audits/killed/shards"
    deadline = time.monotonic() + 120
    while len(list(shards.glob("*.jsonl"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.jsonl")}
    total = json.loads((root / "audits/killed/plan.json").read_text())["shards"]
    assert 2 <= len(done) < total, "the audit was not killed mid-run"

    rerun = _worker_run(root, "killed")
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("*.jsonl") if p.name in done} == done
    assert not list(shards.glob(".*.part"))

    whole = _worker_run(root, "whole", "--workers", "2")
    _, err = whole.communicate(timeout=600)
    assert whole.returncode == 0, err
    for shard in sorted((root / "audits/whole/shards").glob("*.jsonl")):
        assert (shards / shard.name).read_bytes() == shard.read_bytes(), shard.name
    assert len(list(shards.glob("*.jsonl"))) == total
    a, b = (json.loads((root / f"audits/{n}/summary.json").read_text()) for n in ("killed", "whole"))
    assert {**a, "name": ""} == {**b, "name": ""}


def test_the_endpoint_and_the_audit_give_the_same_probabilities(audited_store, tmp_path, capsys):
    root, keys = audited_store
    assert main(["audit", "--store", str(root), "--model", "test", "--ids", *keys[:8], "--name", "served"]) == 0
    records = _records(root, "served")
    server = start(ServeConfig(model=str(root / "models/test"), port=0), tmp_path / "server")
    try:
        for r in records:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            photo = base64.b64encode((root / f"raw/bin-images/{r['key']}.jpg").read_bytes()).decode()
            conn.request("POST", "/v1/models/bincount:predict", json.dumps({"instances": [{"image": {"b64": photo}}]}),
                         {"Content-Type": "application/json"})
            served = json.loads(conn.getresponse().read())["predictions"][0]
            assert served["count"] == r["count"] and list(served["probabilities"]) == list(r["probabilities"])
            # both default to the same precision; 1e-5 leaves room only for a batch blocked differently
            assert max(abs(a - b) for a, b in zip(served["probabilities"].values(),
                                                  r["probabilities"].values())) <= 1e-5, (served, r)
    finally:
        server.stop()


@pytest.mark.parametrize("args, message", [
    (["--name", "all", "--count", "2", "--index", "2"], "must be 0..1"),
    (["--name", "all", "--count", "2"], "must be 0..1, got None"),
    (["--name", "nosuch"], "no audit 'nosuch'"),
])
def test_a_worker_with_a_bad_index_or_audit_is_one_clear_line(audited_store, args, message, monkeypatch, capsys):
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    root, _ = audited_store
    assert main(["audit", "worker", "--store", str(root), *args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_the_report_merge_keeps_only_the_top_bins_yet_ranks_and_counts_as_a_full_sort():
    import random

    from bincount.audit.plan import Plan
    from bincount.audit.report import Tally

    rng = random.Random(0)
    records = []
    for i in range(5000):
        key = f"{rng.randrange(10**6):06d}"
        if i % 97 == 0:
            records.append({"key": key, "error": "corrupt"})
            continue
        expected = None if i % 31 == 0 else rng.randint(1, 5)
        record = {"key": key, "count": rng.randint(1, 5), "expected": expected}
        if expected is not None:
            record["p_mismatch"] = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0, rng.random()])     # many ties
        records.append(record)
    tally = Tally(Plan("t", "m", [1, 2, 3, 4, 5], 1, len(records), {}, {}), Policy(threshold=0.5), 7)
    for record in records:
        tally.add(record)
    scored = [r for r in records if "p_mismatch" in r]
    assert tally.ranked() == sorted(scored, key=lambda r: (-r["p_mismatch"], r["key"]))[:7]
    assert len(tally._suspects) < 2 * 7 + 1024 < len(scored)         # memory bounded by top, not by the bins
    summary = tally.summary({})
    flagged = [r["p_mismatch"] for r in scored if r["p_mismatch"] >= 0.5]
    assert (summary["bins"], summary["with_expected"], summary["flagged"]) == (5000, len(scored), len(flagged))
    wrong = [p_wrong(m, summary["error_rate"], 5) for m in flagged]
    assert summary["expected_precision"] == pytest.approx(sum(wrong) / len(wrong), abs=1e-3)
    assert summary["image_failures"] == {"corrupt": sum("error" in r for r in records)}
    assert sum(tally.histogram) == len(scored) and tally.histogram[-1] == sum(r["p_mismatch"] >= 39 / 40 for r in scored)
