"""The store over a local directory and over a real S3 server (moto on 127.0.0.1)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bincount.processes import free_port

from bincount.store import (
    BucketNotFoundError,
    CredentialsError,
    EndpointUnreachableError,
    KeyNotFoundError,
    LocalStore,
    S3Settings,
    S3Store,
    open_store,
)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, s3_server):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    bucket = s3_server.new_bucket("store")
    settings = S3Settings(s3_server.endpoint, "testing", "testing", secure=False)
    return S3Store(bucket, "some/prefix", settings)


def test_put_get_stat_list_delete(store, tmp_path):
    store.check(write=True)
    store.put("a/b/one.bin", b"1" * 10)
    store.put_text("a/two.txt", "two")
    store.put("c/three", b"")
    assert store.get("a/b/one.bin") == b"1" * 10
    assert store.get("a/b/one.bin", offset=2, length=3) == b"111"
    assert store.get_text("a/two.txt") == "two"
    assert store.stat("a/b/one.bin").size == 10
    assert store.exists("c/three") and not store.exists("c/four")
    assert [o.key for o in store.list()] == ["a/b/one.bin", "a/two.txt", "c/three"]
    assert [(o.key, o.size) for o in store.list("a/")] == [("a/b/one.bin", 10), ("a/two.txt", 3)]
    assert list(store.list("nothing/")) == []
    store.delete("a/two.txt")
    assert [o.key for o in store.list("a/")] == ["a/b/one.bin"]
    with pytest.raises(KeyNotFoundError, match="a/two.txt"):
        store.get("a/two.txt")
    with pytest.raises(KeyNotFoundError):
        store.stat("a/two.txt")


def test_streaming_large_object_roundtrip(store, tmp_path):
    big = tmp_path / "big.bin"
    payload = os.urandom(3 << 20)
    big.write_bytes(payload)
    store.put_file("blobs/big.bin", big)
    with store.open("blobs/big.bin") as f:
        first = f.read(1 << 20)
        rest = f.read()
    assert first + rest == payload
    out = tmp_path / "out" / "copy.bin"
    store.get_file("blobs/big.bin", out)
    assert out.read_bytes() == payload
    assert not list(out.parent.glob(".*.part"))


def test_a_ranged_open_streams_exactly_that_window(store):
    payload = bytes(range(256)) * 40
    store.put("blobs/range.bin", payload)
    with store.open("blobs/range.bin", 1000, 3000) as f:
        assert f.read(100) + f.read() == payload[1000:4000]
    with store.open("blobs/range.bin", 9000) as f:
        assert f.read() == payload[9000:]


def test_keys_are_strings_not_numbers(store):
    store.put("raw/metadata/221.json", b"short")
    store.put("raw/metadata/00221.json", b"padded")
    assert store.get("raw/metadata/221.json") == b"short"
    assert store.get("raw/metadata/00221.json") == b"padded"


def test_local_write_is_atomic_on_failure(tmp_path, monkeypatch):
    """A writer that dies halfway leaves the old object intact and no temporary file behind."""
    import shutil

    store = LocalStore(tmp_path / "store")
    store.put("x.bin", b"old")
    src = tmp_path / "src.bin"
    src.write_bytes(b"new content")

    def copy_half_then_fail(fsrc, fdst, length=0):
        fdst.write(fsrc.read(3))
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copyfileobj", copy_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        store.put_file("x.bin", src)
    assert store.get("x.bin") == b"old"
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["x.bin"]


def test_stale_parts_of_dead_writers_are_invisible_and_removed(tmp_path):
    store = LocalStore(tmp_path)
    store.put("raw/a.jpg", b"whole")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / "raw" / f".b.jpg.{dead_pid}.abcd1234.part").write_bytes(b"half")
    live = tmp_path / "raw" / f".c.jpg.{os.getpid()}.abcd1234.part"
    live.write_bytes(b"in progress")
    assert [o.key for o in store.list()] == ["raw/a.jpg"]
    assert store.remove_stale_parts("raw") == 1
    assert live.exists()


def test_local_key_cannot_escape_root(tmp_path):
    store = LocalStore(tmp_path / "root")
    with pytest.raises(Exception, match="escapes"):
        store.put("../outside.txt", b"x")


def test_open_store_parses_uris(tmp_path):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    s3 = open_store("s3://bucket/pre/fix")
    assert isinstance(s3, S3Store) and s3.bucket == "bucket" and s3.prefix == "pre/fix"
    with pytest.raises(Exception, match="names no bucket"):
        open_store("s3://")
    with pytest.raises(Exception, match="unsupported store URI"):
        open_store("gs://bucket")


def test_settings_from_env(monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT", "http://minio.bincount:9000/")
    monkeypatch.setenv("S3_SECURE", "0")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    s = S3Settings.from_env()
    assert (s.endpoint, s.secure, s.access_key) == ("minio.bincount:9000", False, None)


def test_credentials_come_from_the_files_a_pod_mounts(auth_s3_server, monkeypatch, tmp_path):
    """Pods mount the S3 Secret as files and name them in AWS_*_FILE; the key read there reaches the server."""
    (tmp_path / "id").write_text("FILEKEY\n")
    (tmp_path / "secret").write_text("file-secret")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID_FILE", str(tmp_path / "id"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY_FILE", str(tmp_path / "secret"))
    monkeypatch.setenv("S3_ENDPOINT", auth_s3_server)
    monkeypatch.setenv("S3_SECURE", "0")
    settings = S3Settings.from_env()
    assert (settings.access_key, settings.secret_key) == ("FILEKEY", "file-secret")
    with pytest.raises(CredentialsError, match="refused access key 'FILEKEY'"):
        S3Store("bucket", "", settings).check()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY_FILE", str(tmp_path / "gone"))
    with pytest.raises(CredentialsError, match=f"cannot read AWS_SECRET_ACCESS_KEY from {tmp_path / 'gone'}"):
        S3Settings.from_env()


def test_missing_bucket_is_a_clear_error(s3_server):
    store = S3Store("no-such-bucket", "", S3Settings(s3_server.endpoint, "testing", "testing", secure=False))
    with pytest.raises(BucketNotFoundError, match="bucket 'no-such-bucket' does not exist"):
        store.check()
    with pytest.raises(BucketNotFoundError):
        store.stat("any/key")
    with pytest.raises(BucketNotFoundError):
        list(store.list())


def test_unreachable_endpoint_fails_after_bounded_retries():
    port = free_port()
    store = S3Store("bucket", "", S3Settings(f"127.0.0.1:{port}", secure=False), attempts=3, backoff_s=0.01)
    start = time.monotonic()
    with pytest.raises(EndpointUnreachableError, match=f"cannot reach S3 endpoint http://127.0.0.1:{port}"):
        store.get("k")
    assert time.monotonic() - start < 5


def test_bad_credentials_are_a_clear_error(auth_s3_server):
    store = S3Store("bucket", "", S3Settings(auth_s3_server, "WRONGKEY", "wrong-secret", secure=False))
    with pytest.raises(CredentialsError, match="refused access key 'WRONGKEY'.*AWS_ACCESS_KEY_ID"):
        store.check()
