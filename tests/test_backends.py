"""The backends (bincount.backends): the trainer arguments both launch, torchrun on tiny data, and the cluster
backend through the real `kubernetes` client against the STUB Kubernetes API server in tests/k8s_stub.py (the
only stub this project allows: no control plane runs here)."""

from __future__ import annotations

import json

import pytest
import yaml
from k8s_validation import CRDS

from bincount.backends import (Endpoint, KubernetesBackend, LocalBackend, TrainOutcome, get_backend,
                               train_args)
from bincount.config import ClusterConfig, JobResources, ServeConfig, ServeJob, TrainConfig, TrainJob
from bincount.errors import BincountError, ConfigError
from bincount.k8s.launch import INFERENCE_SERVICE, Cluster, JobFailed
from bincount.k8s.resources import as_dict
from bincount.k8s.training import pytorchjob, trainjob
from bincount.store import open_store
from bincount.train import entry
from training_data import make_store, tiny_config

RUN = "bc-run"
MASTER = {"training.kubeflow.org/job-name": RUN, "training.kubeflow.org/job-role": "master"}
FAST_JOB = {"timeout": 10.0, "poll": 0.01}
METRICS = {"val_accuracy": 0.55, "val_loss": 1.2}


def condition(kind: str, message: str = "") -> dict:
    return {"type": kind, "status": "True", "message": message}


def parsed(args: list[str]) -> TrainConfig:
    return entry.config(entry.parser().parse_args(args))


def test_rendered_args_give_back_the_same_config_through_the_trainers_parser():
    cfg = TrainConfig(store="s3://bincount/x", dataset="abid", run="r-1", arch="resnet34", weights="none",
                      classes=(1, 2, 3), image_size=96, epochs=3, lr=3e-4, momentum=0.8, warmup_epochs=0.5,
                      class_weights=[1.0, 2.5, 0.75], channels_last=True, feature_cache=False, resume=False,
                      cache_dir="/tmp/cache dir", precision="fp32", workers=0)

    args = train_args(cfg)

    assert args[:6] == ["--store", "s3://bincount/x", "--dataset", "abid", "--run-id", "r-1"]
    assert "--set" in args and "classes=1,2,3" in args and "class_weights=1.0,2.5,0.75" in args
    assert "channels_last=true" in args and "resume=false" in args
    assert parsed(args) == cfg


def test_a_default_config_renders_only_where_to_train():
    cfg = TrainConfig(store="/data", dataset="abid", run="r")
    assert train_args(cfg) == ["--store", "/data", "--dataset", "abid", "--run-id", "r"]
    assert parsed(train_args(cfg)) == cfg


def test_unknown_backend_names_the_choices():
    assert isinstance(get_backend("local"), LocalBackend)
    assert isinstance(get_backend("kubernetes"), KubernetesBackend)
    assert get_backend("kubernetes", ClusterConfig(training_api="trainjob")).config.training_api == "trainjob"
    with pytest.raises(ConfigError, match=r"unknown backend 'nope'; choose one of: local, kubernetes"):
        get_backend("nope")


@pytest.fixture
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_local_backend_trains_under_torchrun_and_reads_the_exported_metrics(tmp_path, one_thread, capfd):
    store = make_store(tmp_path / "store", n=40)
    cfg = tiny_config(store, "local-run", tmp_path / "cache", epochs=1)

    outcome = LocalBackend().train(TrainJob(cfg))

    meta = json.loads(open_store(store).get_text("models/local-run/model.json"))
    assert outcome == TrainOutcome("local-run", f"{store}/models/local-run", meta["metrics"])
    assert 0.0 <= outcome.metrics["val_accuracy"] <= 1.0
    assert open_store(store).exists("models/local-run/model.pt")
    assert "val_accuracy=" in capfd.readouterr().out   # the trainer's stdout passed through


def test_local_backend_failure_carries_the_trainers_error(tmp_path, one_thread):
    bad = tiny_config(str(tmp_path / "empty"), "bad-run", tmp_path / "cache", dataset="missing", epochs=1)
    with pytest.raises(BincountError) as failed:
        LocalBackend().train(TrainJob(bad))
    text = str(failed.value)
    assert text.startswith("training run bad-run failed (exit status 1); last 1 stderr line(s):\n"
                           "bincount: error: dataset 'missing' has no train split")


@pytest.fixture
def s3_store(s3_env) -> str:
    return f"s3://{s3_env.new_bucket('backends')}"


def test_kubernetes_backend_trains_in_a_pytorchjob_and_reads_the_exported_metrics(api, cluster, s3_store, capsys):
    cfg = TrainConfig(store=s3_store, dataset="abid", run=RUN, epochs=2, lr=0.01)
    resources = JobResources(workers=2, cpu_request="1", cpu_limit="2")
    # what the job's master writes when it exports the model
    open_store(s3_store).put_text(f"models/{RUN}/model.json", json.dumps({"metrics": METRICS}))
    api.script("pytorchjobs", RUN, [
        {"conditions": [condition("Created"), condition("Running")]},
        {"conditions": [condition("Created"), condition("Succeeded", f"PyTorchJob {RUN} succeeded")]},
    ])
    api.add_pod(f"{RUN}-master-0", MASTER, "Succeeded", "epoch=1 val_accuracy=0.40\nepoch=2 val_accuracy=0.55\n")

    outcome = KubernetesBackend(cluster).train(TrainJob(cfg, resources, **FAST_JOB))

    assert outcome == TrainOutcome(RUN, f"{s3_store}/models/{RUN}", METRICS)
    assert api.created == [as_dict(pytorchjob(RUN, train_args(cfg), resources, cluster.config))]
    out, err = capsys.readouterr()
    assert out.splitlines() == ["epoch=1 val_accuracy=0.40", "epoch=2 val_accuracy=0.55"]
    assert f"PyTorchJob {RUN}: Succeeded" in err


@pytest.mark.skipif(not (CRDS / "runtimes").is_dir(), reason=f"the shared CRDs are not at {CRDS}")
def test_kubernetes_backend_trains_in_a_trainjob_when_the_cluster_runs_trainer_v2(api, s3_store, capsys):
    cfg = TrainConfig(store=s3_store, dataset="abid", run=RUN, epochs=2, lr=0.01)
    resources = JobResources(workers=2, cpu_request="1", cpu_limit="2")
    cluster = Cluster(api.client(), ClusterConfig(training_api="trainjob"))
    api.add(yaml.safe_load((CRDS / "runtimes" / "torch-distributed.yaml").read_text()))
    open_store(s3_store).put_text(f"models/{RUN}/model.json", json.dumps({"metrics": METRICS}))
    api.script("trainjobs", RUN, [{"conditions": [{"type": "Complete", "status": "True", "reason": "JobsCompleted",
                                                    "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}])
    rank0 = {"jobset.sigs.k8s.io/jobset-name": RUN, "jobset.sigs.k8s.io/replicatedjob-name": "node",
             "batch.kubernetes.io/job-completion-index": "0"}
    api.add_pod(f"{RUN}-node-0-0-x7k2q", rank0, "Succeeded", "epoch=1 val_accuracy=0.40\n", container="node")

    outcome = KubernetesBackend(cluster).train(TrainJob(cfg, resources, **FAST_JOB))

    assert outcome == TrainOutcome(RUN, f"{s3_store}/models/{RUN}", METRICS)
    assert api.created == [as_dict(trainjob(RUN, train_args(cfg), resources, cluster.config))]
    out, err = capsys.readouterr()
    assert out.splitlines() == ["epoch=1 val_accuracy=0.40"]
    assert f"TrainJob {RUN}: Complete (node-0 Succeeded)" in err


def test_kubernetes_backend_reports_a_failed_job_and_a_missing_export(api, cluster, s3_store):
    api.script("pytorchjobs", RUN, [
        {"conditions": [condition("Running"), condition("Failed", "1 Master replica(s) failed")]}])
    api.add_pod(f"{RUN}-master-0", MASTER, "Failed", "ValueError: loss is NaN at epoch 2\n")
    job = TrainJob(TrainConfig(store=s3_store, dataset="abid", run=RUN), **FAST_JOB)

    with pytest.raises(JobFailed, match=f"(?s)PyTorchJob {RUN} failed: 1 Master replica.*loss is NaN"):
        KubernetesBackend(cluster).train(job)

    api.script("pytorchjobs", "no-export", [{"conditions": [condition("Succeeded")]}])
    api.add_pod("no-export-master-0", {**MASTER, "training.kubeflow.org/job-name": "no-export"}, "Succeeded")
    job = TrainJob(TrainConfig(store=s3_store, dataset="abid", run="no-export"), **FAST_JOB)
    with pytest.raises(BincountError, match=f"no-export finished but exported no model: {s3_store}/models/"
                                            "no-export/model.json is missing"):
        KubernetesBackend(cluster).train(job)


def test_kubernetes_backend_needs_a_store_the_pods_reach(cluster, tmp_path):
    with pytest.raises(ConfigError, match="needs an s3:// store"):
        KubernetesBackend(cluster).train(TrainJob(TrainConfig(store=str(tmp_path), dataset="abid", run=RUN)))


def test_kubernetes_backend_serves_an_inference_service_at_its_status_url(api, cluster):
    url = "http://counter.bincount.example.com"
    api.script("inferenceservices", "counter", [
        {"conditions": [{"type": "Ready", "status": "False", "reason": "RevisionMissing"}]},
        {"conditions": [{"type": "Ready", "status": "True"}], "url": url}])
    job = ServeJob(ServeConfig(model="s3://bincount/models/r", name="counter"), poll=0.01, timeout=10)

    endpoint = KubernetesBackend(cluster).serve(job)

    assert (endpoint.url, endpoint.predict_url) == (url, f"{url}/v1/models/counter:predict")
    assert api.created[0]["kind"] == "InferenceService"
    assert api.created[0]["spec"]["predictor"]["containers"][0]["env"] == [
        {"name": "STORAGE_URI", "value": "s3://bincount/models/r"}]
    endpoint.stop()
    assert cluster.delete(INFERENCE_SERVICE, "counter") is False   # stop() already deleted it
    assert isinstance(endpoint, Endpoint)
