"""`bincount data download` against an ABID mirror on a real S3 server (moto on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bincount.cli import main
from bincount.store import LocalStore, S3Settings, S3Store
from conftest import CORRUPT_JPEG_KEY, NO_QUANTITY_KEY


def run(mirror, dest, *args) -> list[str]:
    return ["data", "download", "--dest", str(dest), "--source-endpoint", mirror.endpoint,
            "--source-bucket", mirror.bucket, *args]


def pairs(root: Path) -> dict[str, tuple[bytes, bytes]]:
    meta = root / "raw" / "metadata"
    return {p.stem: ((root / "raw" / "bin-images" / f"{p.stem}.jpg").read_bytes(), p.read_bytes())
            for p in sorted(meta.glob("*.json"))} if meta.is_dir() else {}


def assert_identical_to_source(copied: dict, abid_sample: Path) -> None:
    for key, (image, meta) in copied.items():
        assert image == (abid_sample / "bin-images" / f"{key}.jpg").read_bytes(), key
        assert meta == (abid_sample / "metadata" / f"{key}.json").read_bytes(), key


def test_download_by_file_list(abid_mirror, abid_sample, tmp_path, capsys):
    chosen = {"1": [f"data/metadata/{k}.json" for k in abid_mirror.keys[:3]],
              "2": [f"data/metadata/{k}.json" for k in abid_mirror.keys[3:5]] + ["data/metadata/000000.json"]}
    file_list = tmp_path / "file_list.json"
    file_list.write_text(json.dumps(chosen))
    dest = tmp_path / "store"
    assert main(run(abid_mirror, dest, "--file-list", str(file_list), "--workers", "4")) == 0
    out = capsys.readouterr().out
    copied = pairs(dest)
    assert sorted(copied) == sorted(abid_mirror.keys[:5])
    assert_identical_to_source(copied, abid_sample)
    assert "6 pairs selected → downloaded 5, skipped 0 (already present), rejected 1" in out
    assert "rejected, not in source: 1 (000000)" in out


def test_download_by_ids_keeps_keys_as_strings(abid_mirror, abid_sample, tmp_path, capsys):
    padded = next(k for k in abid_mirror.keys if k.startswith("0"))
    unpadded = padded.lstrip("0")
    dest = tmp_path / "store"
    assert main(run(abid_mirror, dest, "--ids", padded, unpadded)) == 0
    copied = pairs(dest)
    if unpadded in abid_mirror.keys:
        assert sorted(copied) == sorted([padded, unpadded])
    else:
        assert sorted(copied) == [padded]
        assert f"rejected, not in source: 1 ({unpadded})" in capsys.readouterr().out
    assert_identical_to_source(copied, abid_sample)


def test_quantity_scan_per_class_and_bad_pairs_rejected(abid_mirror, tmp_path, capsys):
    dest = tmp_path / "store"
    assert main(run(abid_mirror, dest, "--quantities", "2-3", "--per-class", "4")) == 0
    out = capsys.readouterr().out
    copied = pairs(dest)
    labels = [json.loads(meta)["EXPECTED_QUANTITY"] for _, meta in copied.values()]
    assert sorted(labels) == [2, 2, 2, 2, 3, 3, 3, 3]
    expected = sorted(k for k in abid_mirror.keys if abid_mirror.labels[k] in (2, 3))
    twos = [k for k in expected if abid_mirror.labels[k] == 2][:4]
    threes = [k for k in expected if abid_mirror.labels[k] == 3][:4]
    assert sorted(copied) == sorted(twos + threes), "selection follows the bucket's listing order"
    assert "by EXPECTED_QUANTITY: 2: 4, 3: 4" in out


def test_quantity_scan_rejects_corrupt_jpeg_and_missing_quantity(abid_mirror, tmp_path, capsys):
    """The two planted bad pairs sort after every real key, so a full scan reaches them."""
    dest = tmp_path / "store"
    assert main(run(abid_mirror, dest, "--quantities", "1-5", "--workers", "16")) == 0
    out = capsys.readouterr().out
    copied = pairs(dest)
    assert sorted(copied) == sorted(abid_mirror.keys)
    assert f"rejected, image does not decode: 1 ({CORRUPT_JPEG_KEY})" in out
    assert f"rejected, no EXPECTED_QUANTITY: 1 ({NO_QUANTITY_KEY})" in out
    assert not (dest / "raw" / "bin-images" / f"{CORRUPT_JPEG_KEY}.jpg").exists()
    assert not (dest / "raw" / "bin-images" / f"{NO_QUANTITY_KEY}.jpg").exists()
    assert f"{len(abid_mirror.keys) + 2} pairs selected → downloaded {len(abid_mirror.keys)}" in out

    assert main(run(abid_mirror, dest, "--quantities", "1-5", "--limit", "20")) == 0
    assert "20 pairs selected → downloaded 0, skipped 20" in capsys.readouterr().out


def test_download_into_s3_store(abid_mirror, s3_env, tmp_path, abid_sample):
    bucket = s3_env.new_bucket("dest")
    assert main(run(abid_mirror, f"s3://{bucket}/prefix", "--ids", *abid_mirror.keys[:4])) == 0
    store = S3Store(bucket, "prefix", S3Settings(s3_env.endpoint, "testing", "testing", secure=False))
    keys = [o.key for o in store.list("raw/")]
    assert keys == sorted([f"raw/bin-images/{k}.jpg" for k in abid_mirror.keys[:4]]
                          + [f"raw/metadata/{k}.json" for k in abid_mirror.keys[:4]])
    k = abid_mirror.keys[0]
    assert store.get(f"raw/bin-images/{k}.jpg") == (abid_sample / "bin-images" / f"{k}.jpg").read_bytes()


def test_killed_download_resumes_to_a_complete_copy(abid_mirror, abid_sample, tmp_path):
    """SIGKILL mid-run, rerun: every pair present once, byte-identical, no partial file anywhere."""
    dest = tmp_path / "store"
    cmd = [sys.executable, "-m", "bincount.cli", *run(abid_mirror, dest, "--quantities", "1-5", "--workers", "1")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta_dir = dest / "raw" / "metadata"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if meta_dir.is_dir() and len(os.listdir(meta_dir)) >= 30:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "download finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = pairs(dest)
    assert 30 <= len(partial) < len(abid_mirror.keys)

    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    copied = pairs(dest)
    assert sorted(copied) == sorted(abid_mirror.keys)
    assert_identical_to_source(copied, abid_sample)
    images = sorted(p.name for p in (dest / "raw" / "bin-images").iterdir())
    assert images == sorted(f"{k}.jpg" for k in abid_mirror.keys), "no stray or temporary files"
    assert sorted(p.name for p in meta_dir.iterdir()) == sorted(f"{k}.json" for k in abid_mirror.keys)
    assert f"downloaded {len(abid_mirror.keys) - len(partial)}, skipped {len(partial)} " in result.stdout


def test_missing_source_bucket_is_one_clear_error(abid_mirror, tmp_path):
    cmd = [sys.executable, "-m", "bincount.cli", "data", "download", "--dest", str(tmp_path / "store"),
           "--source-endpoint", abid_mirror.endpoint, "--source-bucket", "no-such-bucket", "--ids", "00004"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"bincount: error: bucket 'no-such-bucket' does not exist on "
                                     f"http://{abid_mirror.endpoint}")
    assert not (tmp_path / "store" / "raw").exists()


def test_bad_destination_credentials_are_one_clear_error(abid_mirror, auth_s3_server, tmp_path):
    env = dict(os.environ, S3_ENDPOINT=auth_s3_server, S3_SECURE="0",
               AWS_ACCESS_KEY_ID="BADKEY", AWS_SECRET_ACCESS_KEY="bad")
    cmd = [sys.executable, "-m", "bincount.cli", *run(abid_mirror, "s3://dest-bucket", "--ids", "00004")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"bincount: error: S3 endpoint http://{auth_s3_server} refused access key 'BADKEY'")


@pytest.mark.parametrize("args, message", [
    ([], "choose exactly one selection"),
    (["--ids", "1", "--quantities", "1-5"], "choose exactly one selection"),
    (["--quantities", "1-5", "--limit", "0"], "--limit must be positive"),
])
def test_bad_selection_is_a_clear_error(args, message, tmp_path, capsys):
    assert main(["data", "download", "--dest", str(tmp_path), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bincount: error: ") and message in err


def test_bad_file_list_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "list.json"
    bad.write_text("[1, 2]")
    assert main(["data", "download", "--dest", str(tmp_path), "--file-list", str(bad)]) == 1
    assert "must map each class to a list of metadata paths" in capsys.readouterr().err


def test_local_store_sees_no_partial_pair_after_kill_between_writes(tmp_path):
    """Image written, metadata not (killed in between): prepare's scan ignores the image."""
    from bincount.data.prepare import scan

    store = LocalStore(tmp_path)
    store.put("raw/bin-images/1.jpg", b"not yet paired")
    with pytest.raises(Exception, match="no metadata under"):
        scan(store, workers=2)
