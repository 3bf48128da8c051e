"""Canary, promote and rollback on both backends, recorded in serving/<endpoint>.json: locally a real ModelServer
that serves two versions and splits requests by the percentage; on Kubernetes the InferenceServices written to the
API server stub, each strictly valid against the real KServe CRD. And the one-line refusals."""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from k8s_validation import CRDS, Validator
from serve_support import drawn_jpeg

from bincount import cli
from bincount.backends import KubernetesBackend, LocalBackend
from bincount.config import DeployConfig
from bincount.errors import ConfigError
from bincount.model.exported import ExportedModel, Inference, Preprocessing
from bincount.model.zoo import IMAGENET_MEAN, IMAGENET_STD, build_model
from bincount.rollout import registry
from bincount.rollout.deploy import deploy, promote, rollback
from bincount.store import open_store

PHOTO = drawn_jpeg(7, (96, 72))
REQUESTS = 2000
CANARY = 20
Z = 4.0                                         # a correct 20 % split lands outside n·p ± 4σ once in 16,000 runs


def save(store: str, run: str, temperature: float) -> None:
    """resnet18 at 32 px; the temperature tells the versions' answers apart."""
    torch.manual_seed(0)
    net, _ = build_model("resnet18", 5, "none")
    ExportedModel(net, "resnet18", [1, 2, 3, 4, 5], Preprocessing(32, IMAGENET_MEAN, IMAGENET_STD),
                  Inference(temperature=temperature), {"config": {"run": run}, "metrics": {}}).save(
        open_store(store), f"models/{run}")


def ask(port: int, v2: bool) -> tuple[str, str, tuple]:
    """(version in the body, version in the header, the probabilities) of one answer."""
    b64 = base64.b64encode(PHOTO).decode()
    if v2:
        path = "/v2/models/bincount/infer"
        body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}]}
    else:
        path, body = "/v1/models/bincount:predict", {"instances": [{"image": {"b64": b64}}]}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        response = conn.getresponse()
        answer = json.loads(response.read())
        assert response.status == 200, answer
        header = response.getheader("X-Model-Version")
    finally:
        conn.close()
    if v2:
        probabilities = next(o["data"] for o in answer["outputs"] if o["name"] == "probabilities")
        return answer["model_version"], header, tuple(round(p, 3) for p in probabilities)
    return answer["model_version"], header, tuple(round(p, 3) for p in answer["predictions"][0]["probabilities"]
                                                  .values())


def test_a_local_canary_splits_requests_by_its_percentage_and_every_answer_names_its_version(tmp_path, monkeypatch):
    monkeypatch.setenv("BINCOUNT_CACHE", str(tmp_path / "cache"))
    store = str(tmp_path / "store")
    save(store, "r1", 1.0)
    save(store, "r2", 4.0)
    backend = LocalBackend()
    first = deploy(DeployConfig(store=store, model="r1"), backend, "local")
    try:
        canary = deploy(DeployConfig(store=store, model="r2", canary=CANARY), backend, "local")
        assert canary.endpoint.url == first.endpoint.url          # the endpoint keeps its address
        port = int(canary.endpoint.url.rsplit(":", 1)[1])
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: ask(port, v2=i % 2 == 1), range(REQUESTS)))
        assert all(body == header for body, header, _ in answers)
        by_version = {v: {p for body, _, p in answers if body == v} for v in ("r1", "r2")}
        assert all(len(p) == 1 for p in by_version.values()) and by_version["r1"] != by_version["r2"]
        n = sum(body == "r2" for body, _, _ in answers)
        mean, sd = REQUESTS * CANARY / 100, math.sqrt(REQUESTS * CANARY / 100 * (1 - CANARY / 100))
        assert mean - Z * sd <= n <= mean + Z * sd, n
        back = rollback(DeployConfig(store=store), backend, "local")
        assert {ask(port, v2=False)[0] for _ in range(20)} == {"r1"}
        record = registry.load(open_store(store), "bincount")
        assert back.record == record and record.champion.run == "r1" and record.challenger is None
        assert [(e.action, e.run, e.previous) for e in record.history] == [
            ("deploy", "r1", None), ("canary", "r2", "r1"), ("rollback", "r2", "r1")]
    finally:
        pid = Path(tmp_path / "cache" / "serving" / "bincount" / "serve.pid").read_text().strip()
        os.kill(int(pid), signal.SIGTERM)


@pytest.mark.parametrize("args, message", [
    (["--model", "r1", "--canary", "0"], "deploy: --canary is the challenger's share of requests, 1 to 99 "
                                         "percent; got 0"),
    (["--model", "r2", "--canary", "100"], "deploy: --canary is the challenger's share of requests, 1 to 99 "
                                           "percent; got 100"),
    (["--model", "r2", "--canary", "10"], "endpoint bincount has no champion to split traffic with; deploy r2 "
                                          "without --canary first"),
    (["promote"], "endpoint bincount has no challenger to promote; put one on canary with `bincount deploy --model "
                  "RUN --canary PERCENT` first"),
    (["rollback"], "endpoint bincount has no previous version to roll back to"),
    (["--model", "r9"], "no exported model at {store}/models/r9 (expected model.json and model.pt)"),
    (["promote", "--model", "r2"], "deploy promote takes no --model: it acts on the endpoint's challenger or former "
                                   "champion"),
])
def test_bad_rollout_steps_are_one_line_errors_that_change_nothing(tmp_path, capsys, args, message):
    store = str(tmp_path / "store")
    save(store, "r1", 1.0)
    save(store, "r2", 1.0)
    code = cli.main(["deploy", "--store", store, *args])
    assert code == 1 and capsys.readouterr().err == f"bincount: error: {message.format(store=store)}\n"
    assert not open_store(store).exists("serving/bincount.json")


def test_model_list_shows_metrics_and_roles(tmp_path, capsys):
    store = open_store(str(tmp_path))
    save(store.uri, "r1", 1.0)
    save(store.uri, "r2", 1.0)
    store.put_text("reports/r2/evaluation/metrics.json", json.dumps({"accuracy": 0.5, "balanced_accuracy": 0.45,
                                                                      "mae": 0.75}))
    record = registry.EndpointRecord("bincount", champion=registry.Version("r1", "x", "t"),
                                     challenger=registry.Version("r2", "y", "t", canary_percent=10))
    registry.save(store, record)
    assert cli.main(["model", "list", "--store", store.uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "arch", "dataset", "val", "acc", "val", "bal", "acc", "val", "MAE", "test",
                                "acc", "test", "bal", "acc", "test", "MAE", "role"]
    assert lines[1].split()[0] == "r1" and lines[1].endswith("champion of bincount")
    assert lines[2].split()[6:9] == ["0.5000", "0.4500", "0.7500"]
    assert lines[2].endswith("challenger of bincount (10%)")


# ---- Kubernetes: the API server stub (no control plane can run here) ---------------------------------------

READY = {"conditions": [{"type": "Ready", "status": "True"}], "url": "http://bincount.bincount.example.com",
         "deploymentMode": "Serverless"}


@pytest.fixture
def s3_models(s3_env) -> str:
    store = f"s3://{s3_env.new_bucket('models')}"
    for run in ("r1", "r2", "r3"):
        save(store, run, 1.0)
    return store


def predictor(body: dict) -> tuple[dict, dict]:
    spec = body["spec"]["predictor"]
    (container,) = spec["containers"]
    return spec, container


def served(body: dict) -> tuple[str, str, int | None]:
    """(STORAGE_URI, --version, canaryTrafficPercent) of an InferenceService."""
    spec, container = predictor(body)
    env = {e["name"]: e.get("value") for e in container["env"]}
    args = container["args"]
    return env["STORAGE_URI"].rsplit("/", 1)[1], args[args.index("--version") + 1], spec.get("canaryTrafficPercent")


@pytest.mark.skipif(not CRDS.is_dir(), reason=f"the shared CRDs are not at {CRDS}")
def test_canary_promote_and_rollback_write_strictly_valid_inference_services(api, cluster, s3_models):
    api.script("inferenceservices", "bincount", [READY])
    backend = KubernetesBackend(cluster)
    cfg = DeployConfig(store=s3_models, logger_url="http://broker.knative-eventing/bincount", timeout=30)
    steps = [
        lambda: deploy(DeployConfig(**{**vars(cfg), "model": "r1"}), backend, "kubernetes"),
        lambda: deploy(DeployConfig(**{**vars(cfg), "model": "r2", "canary": 10}), backend, "kubernetes"),
        lambda: deploy(DeployConfig(**{**vars(cfg), "model": "r2", "canary": 50}), backend, "kubernetes"),
        lambda: promote(cfg, backend, "kubernetes"),
        lambda: rollback(cfg, backend, "kubernetes"),
        lambda: deploy(DeployConfig(**{**vars(cfg), "model": "r3", "canary": 10}), backend, "kubernetes"),
        lambda: rollback(cfg, backend, "kubernetes"),
    ]
    for step in steps:
        result = step()
        assert result.endpoint.predict_url == "http://bincount.bincount.example.com/v1/models/bincount:predict"
    bodies = api.created + api.replaced
    assert [served(b) for b in bodies] == [
        ("r1", "r1", None),             # the first model: all traffic
        ("r2", "r2", 10),               # canary: the new revision at 10 %, the rolled-out r1 keeps 90 %
        ("r2", "r2", 50),               # the same canary, more traffic
        ("r2", "r2", None),             # promoted: the field removed, r2 takes everything
        ("r1", "r1", None),             # rolled back to the former champion: a rollout of r1
        ("r3", "r3", 10),
        ("r1", "r1", 0)]                # the canary rolled back: at once, to the last rolled-out revision
    validator = Validator()
    assert [e for b in bodies for e in validator.errors(b)] == []
    for body in bodies:
        spec, container = predictor(body)
        assert spec["logger"] == {"url": "http://broker.knative-eventing/bincount", "mode": "all"}
        assert container["args"][container["args"].index("--log-store") + 1] == s3_models
    record = registry.load(open_store(s3_models), "bincount")
    assert (record.champion.run, record.challenger, [v.run for v in record.former]) == ("r1", None, [])
    assert [e.action for e in record.history] == ["deploy", "canary", "canary", "promote", "rollback", "canary",
                                                  "rollback"]
    assert record.backend == "kubernetes" and record.url == READY["url"]


def test_standard_mode_refuses_a_canary_in_one_line_and_changes_nothing(api, cluster, s3_models):
    api.script("inferenceservices", "bincount", [{**READY, "deploymentMode": "Standard"}])
    backend = KubernetesBackend(cluster)
    deploy(DeployConfig(store=s3_models, model="r1", timeout=30), backend, "kubernetes")
    with pytest.raises(ConfigError) as refused:
        deploy(DeployConfig(store=s3_models, model="r2", canary=10, timeout=30), backend, "kubernetes")
    assert str(refused.value) == (
        "InferenceService bincount runs in KServe's Standard (raw) mode, which rolls out by replacing pods and cannot "
        "split traffic: canaryTrafficPercent needs Serverless (Knative) mode; deploy without --canary, or run the "
        "endpoint in Serverless mode")
    assert api.replaced == []
    assert registry.load(open_store(s3_models), "bincount").challenger is None
