"""The kubernetes backend of `bincount tune` through the real `kubernetes` client against the STUB Kubernetes API
server in tests/k8s_stub.py — the only stub this project allows, since no control plane runs here. What it
creates is the real builders' output; the Trial objects and Experiment statuses it serves are checked against
Katib's own OpenAPI schema, so they have the shape Katib gives them. The outputs go to a real S3 server (moto)."""

from __future__ import annotations

import csv
import io
import json

import pytest
import yaml
from k8s_validation import CRDS, Validator

from bincount import cli
from bincount.config import TuneJob
from bincount.errors import ConfigError
from bincount.k8s.launch import Forbidden, JobFailed, NotInstalled
from bincount.k8s.resources import as_dict
from bincount.store import open_store
from bincount.tune.katib import EXPERIMENT_LABEL, run_katib
from bincount.tune.space import load_space

NAME = "bincount-tune"
BEST = f"{NAME}-7dx2kq9p"


def condition(kind: str, message: str = "", status: str = "True") -> dict:
    return {"type": kind, "status": status, "reason": f"Experiment{kind}" if kind != "Created" else "Created",
            "message": message, "lastUpdateTime": "2026-01-01T00:00:00Z"}


def metrics(accuracy: float, loss: float) -> dict:
    return {"metrics": [{"name": "val_balanced_accuracy", "min": "0.2", "max": str(accuracy), "latest": str(accuracy - 0.01)},
                        {"name": "val_loss", "min": str(loss), "max": "1.6", "latest": str(loss)},
                        {"name": "train_loss", "min": "unavailable", "max": "unavailable", "latest": "unavailable"}]}


def assignments(lr: str, batch: str) -> list[dict]:
    return [{"name": "lr", "value": lr}, {"name": "batch_size", "value": batch},
            {"name": "arch", "value": "efficientnet_lite1"}]


def trial(name: str, state: str, lr: str, batch: str, accuracy: float | None = None, message: str = "") -> dict:
    status: dict = {"conditions": [condition("Created"), condition("Running", status="False"),
                                   condition(state, message)],
                    "startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T00:04:10Z"}
    if accuracy is not None:
        status["observation"] = metrics(accuracy, 1.0)
    return {"apiVersion": "kubeflow.org/v1beta1", "kind": "Trial",
            "metadata": {"name": name, "namespace": "bincount", "labels": {EXPERIMENT_LABEL: NAME}},
            "spec": {"parameterAssignments": assignments(lr, batch), "primaryContainerName": "pytorch"},
            "status": status}


TRIALS = [trial(BEST, "Succeeded", "0.0031", "64", 0.61),
          trial(f"{NAME}-a81kd0qe", "Succeeded", "0.0012", "32", 0.48),
          trial(f"{NAME}-ppq2m7wx", "EarlyStopped", "0.0094", "32", 0.22, "Trial is early stopped"),
          trial(f"{NAME}-zz1nb6cu", "Failed", "0.0055", "64", None, "Trial has failed: OOMKilled")]
RUNNING = {"conditions": [condition("Created"), condition("Running", "Experiment is running")],
           "trials": 2, "trialsRunning": 2, "startTime": "2026-01-01T00:00:00Z"}
SUCCEEDED = {"conditions": [condition("Created"), condition("Running", status="False"),
                            condition("Succeeded", "Experiment has succeeded because max trial count has reached")],
             "trials": 4, "trialsSucceeded": 2, "trialsEarlyStopped": 1, "trialsFailed": 1,
             "currentOptimalTrial": {"bestTrialName": BEST, "parameterAssignments": assignments("0.0031", "64"),
                                     "observation": metrics(0.61, 1.0)},
             "startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T00:30:00Z"}
FAILED = {**SUCCEEDED, "conditions": [condition("Created"), condition("Running", status="False"), condition(
    "Failed", "Experiment has failed because max failed count has reached")], "trialsSucceeded": 0}


@pytest.fixture
def store(s3_env) -> str:
    """A store the outputs go to, holding the dataset's split manifests (the trials would read them)."""
    uri = f"s3://{s3_env.new_bucket('tune')}"
    for split in ("train", "val"):
        open_store(uri).put_text(f"datasets/abid/{split}.jsonl", '{"key": "00004", "label": 3}\n')
    return uri


def job(store: str) -> TuneJob:
    return TuneJob(store=store, dataset="abid", poll=0.01)


@pytest.mark.skipif(not CRDS.is_dir(), reason=f"the shared CRDs are not at {CRDS}")
def test_the_served_trials_and_statuses_have_katibs_shape():
    validator = Validator()
    for obj in TRIALS:
        assert validator.errors(obj) == []
    experiment = as_dict(load_space().render(NAME, "s3://bincount", "abid"))
    del experiment["spec"]["trialTemplate"]["trialSpec"]      # checked in test_tune_space; here the statuses
    for status in (RUNNING, SUCCEEDED, FAILED):
        assert validator.errors({**experiment, "status": status}) == []


def test_experiment_is_created_followed_to_success_and_its_best_trial_written(api, cluster, store):
    api.script("experiments", NAME, [{"conditions": [condition("Created")]}, RUNNING, RUNNING, SUCCEEDED])
    for obj in TRIALS:
        api.add(obj)
    lines = []

    result = run_katib(job(store), cluster, progress=lines.append)

    assert api.created == [as_dict(load_space().render(NAME, store, "abid"))]
    experiment_lines = [line for line in lines if line.startswith("Experiment ")]
    assert [line.split(": ", 1)[1].split(";")[0] for line in experiment_lines] == ["Created", "Running", "Succeeded"]
    assert (f"trial {BEST}: succeeded val_balanced_accuracy=0.61 [lr=0.0031, batch_size=64, arch=efficientnet_lite1]"
            in lines)
    assert any("early-stopped" in line and "Trial is early stopped" in line for line in lines)
    assert result.best.name == BEST
    assert result.best.parameters == {"lr": 0.0031, "batch_size": 64, "arch": "efficientnet_lite1"}
    assert result.best.value == 0.61 and result.best.metrics == {"val_balanced_accuracy": 0.6, "val_loss": 1.0}

    s3 = open_store(store)
    best = json.loads(s3.get_text(f"tuning/{NAME}/best.json"))
    assert best["backend"] == "kubernetes" and best["trial"] == BEST
    assert best["objective"] == {"metric": "val_balanced_accuracy", "goal": "maximize", "value": 0.61}
    assert best["train"] == {**load_space().trial, "lr": 0.0031, "batch_size": 64, "arch": "efficientnet_lite1"}
    rows = {r["trial"]: r for r in csv.DictReader(io.StringIO(s3.get_text(f"tuning/{NAME}/trials.csv")))}
    assert {name: r["state"] for name, r in rows.items()} == {
        BEST: "succeeded", f"{NAME}-a81kd0qe": "succeeded", f"{NAME}-ppq2m7wx": "early-stopped",
        f"{NAME}-zz1nb6cu": "failed"}
    assert rows[f"{NAME}-zz1nb6cu"]["message"] == "Trial has failed: OOMKilled"
    assert rows[BEST]["objective"] == "0.61" and rows[BEST]["seconds"] == "250.0"
    assert s3.exists(f"tuning/{NAME}/report/optimization_history.png")
    assert s3.exists(f"tuning/{NAME}/report/param_importances.png")
    assert result.table().splitlines()[1].startswith(f"{BEST} *")


def test_a_failed_experiment_is_one_error_with_its_reason_and_the_trials_kept(api, cluster, store):
    api.script("experiments", NAME, [RUNNING, FAILED])
    for obj in TRIALS:
        api.add(obj)
    with pytest.raises(JobFailed, match="Experiment bincount-tune failed: Experiment has failed because max failed "
                                        "count has reached"):
        run_katib(job(store), cluster, progress=lambda line: None)
    assert open_store(store).exists(f"tuning/{NAME}/trials.csv")


def test_missing_katib_and_forbidden_rbac_are_clear_errors(api, cluster, store):
    api.forbidden = True
    with pytest.raises(Forbidden, match="forbidden to get Experiment bincount-tune in namespace bincount"):
        run_katib(job(store), cluster)
    api.forbidden = False
    del api.served["kubeflow.org/v1beta1"]
    with pytest.raises(NotInstalled, match="Katib is not installed"):
        run_katib(job(store), cluster)
    assert api.created == []


def test_an_existing_experiment_is_followed_only_if_it_is_the_same_search(api, cluster, store, tmp_path):
    stored = as_dict(load_space().render(NAME, store, "abid"))
    for parameter in stored["spec"]["parameters"]:      # what Katib's defaulting webhook adds
        parameter["feasibleSpace"].setdefault("distribution", "uniform")
    api.add(stored)
    api.script("experiments", NAME, [SUCCEEDED])
    api.add(TRIALS[0])
    result = run_katib(job(store), cluster, progress=lambda line: None)
    assert api.created == [] and result.best.name == BEST

    other = tmp_path / "tuning.yaml"
    other.write_text(yaml.safe_dump({"parameters": [{"name": "lr", "type": "double", "min": 0.01, "max": 0.1}]}))
    with pytest.raises(ConfigError, match="already exists in namespace bincount with another search"):
        run_katib(TuneJob(store=store, dataset="abid", space=str(other)), cluster)


def test_the_cluster_backend_needs_a_store_the_pods_reach(cluster, tmp_path):
    with pytest.raises(ConfigError, match="needs an s3:// store"):
        run_katib(TuneJob(store=str(tmp_path), dataset="abid"), cluster)


def test_cli_runs_the_kubernetes_backend_from_a_kubeconfig(api, store, kubeconfig, capsys):
    argv = ["tune", "--store", store, "--dataset", "abid", "--backend", "kubernetes", "--poll", "0.01"]
    api.forbidden = True
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "forbidden to get Experiment bincount-tune" in err

    api.forbidden = False
    api.script("experiments", NAME, [RUNNING, SUCCEEDED])
    for obj in TRIALS:
        api.add(obj)
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith(f"{BEST} *") and f"best {BEST} with val_balanced_accuracy=0.6100" in out
