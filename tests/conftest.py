"""Shared fixtures: the real ABID sample from ../shared and a real S3 server (moto) on 127.0.0.1."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from bincount.processes import free_port

# Fixtures shared by some modules: the tiny training dataset (store, cache_dir, one_torch_thread) and the serving
# tests' connection trap.
pytest_plugins = ("training_data", "serve_support")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ABID_SAMPLE = SHARED / "data" / "abid-sample"

CORRUPT_JPEG_KEY = "99990"
NO_QUANTITY_KEY = "99991"


@pytest.fixture(scope="session")
def abid_sample() -> Path:
    if not (ABID_SAMPLE / "metadata").is_dir():
        pytest.skip(f"ABID sample not found at {ABID_SAMPLE}")
    return ABID_SAMPLE


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    def env(self) -> dict[str, str]:
        return {"S3_ENDPOINT": self.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "S3_SECURE": "0", "AWS_REGION": "us-east-1"}

    def client(self):
        from minio import Minio

        return Minio(self.endpoint, access_key="testing", secret_key="testing", secure=False, region="us-east-1")

    def new_bucket(self, prefix: str = "bucket") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().make_bucket(name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    """A real S3 API (moto's server) on 127.0.0.1; the minio SDK talks HTTP to it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield S3Server(f"{host}:{port}")
    server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch) -> S3Server:
    """The store's env variables pointing at the test server."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@dataclass(frozen=True)
class AbidMirror:
    """An ABID-layout bucket on the test server, public-read like `aft-vbi-pds`: the real sample plus two
    planted bad pairs."""

    endpoint: str
    bucket: str
    keys: tuple[str, ...]
    labels: dict[str, int]


@pytest.fixture(scope="session")
def abid_mirror(s3_server: S3Server, abid_sample: Path) -> AbidMirror:
    client = s3_server.client()
    bucket = s3_server.new_bucket("aft-vbi-pds")
    # Anonymous reads like the real bucket. moto refuses an anonymous HEAD object under a policy that
    # grants only s3:GetObject + s3:ListBucket (AWS allows it), so this test mirror grants s3:*.
    client.set_bucket_policy(bucket, json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": "*", "Action": "s3:*",
        "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}))
    keys = tuple(sorted(p.stem for p in (abid_sample / "metadata").glob("*.json")))
    labels = {k: json.loads((abid_sample / "metadata" / f"{k}.json").read_text())["EXPECTED_QUANTITY"] for k in keys}

    def upload(key: str) -> None:
        client.fput_object(bucket, f"bin-images/{key}.jpg", str(abid_sample / "bin-images" / f"{key}.jpg"))
        client.fput_object(bucket, f"metadata/{key}.json", str(abid_sample / "metadata" / f"{key}.json"))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(upload, keys))

    def put(name: str, data: bytes) -> None:
        client.put_object(bucket, name, io.BytesIO(data), len(data))

    good_jpeg = (abid_sample / "bin-images" / f"{keys[0]}.jpg").read_bytes()
    put(f"bin-images/{CORRUPT_JPEG_KEY}.jpg", good_jpeg[: len(good_jpeg) // 3])
    put(f"metadata/{CORRUPT_JPEG_KEY}.json", json.dumps({"EXPECTED_QUANTITY": 2, "BIN_FCSKU_DATA": {}}).encode())
    put(f"bin-images/{NO_QUANTITY_KEY}.jpg", good_jpeg)
    put(f"metadata/{NO_QUANTITY_KEY}.json", json.dumps({"BIN_FCSKU_DATA": {}}).encode())
    return AbidMirror(s3_server.endpoint, bucket, keys, labels)


def wait_for_port(port: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture(scope="session")
def auth_s3_server() -> str:
    """A second moto server, in its own process, that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0):
    every key is unknown to it, so any request is refused the way a bad AWS_ACCESS_KEY_ID is."""
    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def api():
    """The stub Kubernetes API server (the one stub the project allows: no API server can run here)."""
    from k8s_stub import StubKubeAPI

    with StubKubeAPI() as stub:
        yield stub


@pytest.fixture
def kubeconfig(api, tmp_path, monkeypatch) -> Path:
    """A kubeconfig whose context is the stub API server, found the way the CLI finds one ($KUBECONFIG)."""
    import yaml

    config = tmp_path / "kubeconfig"
    config.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "stub",
        "clusters": [{"name": "stub", "cluster": {"server": api.url}}],
        "contexts": [{"name": "stub", "context": {"cluster": "stub", "user": "stub"}}],
        "users": [{"name": "stub", "user": {"token": "not-a-secret"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(config))
    # the kubernetes client reads $KUBECONFIG once, when it is imported
    monkeypatch.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(config))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return config


@pytest.fixture
def cluster(api):
    from bincount.config import ClusterConfig
    from bincount.k8s.launch import Cluster

    return Cluster(api.client(), ClusterConfig())
