"""The generic launcher (bincount.k8s.launch: Katib Experiments, InferenceServices, batch Jobs) through the real
`kubernetes` client against the STUB Kubernetes API server in tests/k8s_stub.py — the only stub this project
allows, since no control plane runs here. The objects launched are the real builders' output. The training jobs'
launchers, through Kubeflow's SDKs, are tested in test_training_jobs.py."""

from __future__ import annotations

import time

import pytest

from bincount.config import JobResources, ServingResources
from bincount.k8s.experiment import ExperimentSpec, SearchParameter, experiment
from bincount.k8s.launch import (BATCH_JOB, EXPERIMENT, INFERENCE_SERVICE, TRIAL, Forbidden, JobFailed, LaunchError,
                                 LaunchTimeout, NotInstalled)
from bincount.k8s.resources import as_dict, audit_job, inference_service

FAST = {"poll": 0.01}
AUDIT = "bincount-audit-x"
AUDIT_POD = {"batch.kubernetes.io/job-name": AUDIT, "batch.kubernetes.io/job-completion-index": "0"}


def condition(kind: str, message: str = "") -> dict:
    return {"type": kind, "status": "True", "message": message}


def search(**changes) -> dict:
    spec = ExperimentSpec("bincount-tune", "val_accuracy",
                          (SearchParameter("lr", "double", "--lr", min="0.001", max="0.01"),),
                          ("--store", "s3://bincount", "--dataset", "abid"), JobResources(), **changes)
    return as_dict(experiment(spec))


def audit() -> dict:
    return audit_job(AUDIT, ["audit", "worker", "--store", "s3://bincount", "--name", "a"], JobResources(workers=2))


@pytest.mark.parametrize("kind, body, message", [
    (EXPERIMENT, search, "Katib is not installed: no kubeflow.org/v1beta1 experiments"),
    (INFERENCE_SERVICE, lambda: inference_service("bincount", "s3://bincount/models/r", ServingResources()),
     "KServe is not installed: no serving.kserve.io/v1beta1 inferenceservices"),
])
def test_missing_crd_group_says_which_operator_to_install(api, cluster, kind, body, message):
    del api.served[kind.api_version]

    with pytest.raises(NotInstalled) as missing:
        cluster.create(body())

    assert str(missing.value) == message
    assert not cluster.installed(kind)


def test_crd_group_present_but_kind_missing_is_not_installed_either(api, cluster):
    del api.served["kubeflow.org/v1beta1"]["experiments"]
    assert not cluster.installed(EXPERIMENT)
    assert cluster.installed(TRIAL)


def test_rbac_forbidden_names_the_permission_and_the_fix(api, cluster):
    api.forbidden = True

    with pytest.raises(Forbidden) as denied:
        cluster.create(search())

    text = str(denied.value)
    assert "forbidden to create Experiment bincount-tune in namespace bincount (RBAC)" in text
    assert 'cannot create resource "experiments" in API group "kubeflow.org"' in text
    assert "bincount-pipeline" in text


def test_wait_times_out_with_the_last_state(api, cluster):
    api.script("jobs", AUDIT, [{"active": 2}])
    cluster.create(audit())
    start = time.monotonic()

    with pytest.raises(LaunchTimeout) as late:
        cluster.wait(BATCH_JOB, AUDIT, timeout=0.2, poll=0.02)

    assert time.monotonic() - start < 5
    assert f"Job {AUDIT} did not finish within 0.2 s (last state: Running (2 pod(s): 0 succeeded, 2 active, " \
           "0 failed))" in str(late.value)


def test_image_pull_failure_is_surfaced_from_pod_status(api, cluster):
    api.script("jobs", AUDIT, [{}])
    api.add_pod(f"{AUDIT}-0-x7k2q", AUDIT_POD, "Pending", container="audit", container_statuses=[{
        "name": "audit", "image": "ghcr.io/bincount/trainer:0.1.0",
        "state": {"waiting": {"reason": "ImagePullBackOff",
                              "message": 'Back-off pulling image "ghcr.io/bincount/trainer:0.1.0"'}}}])

    with pytest.raises(LaunchError) as pull:
        cluster.run(audit(), timeout=10, **FAST)

    assert (f"Job {AUDIT} cannot start: pod {AUDIT}-0-x7k2q cannot pull image 'ghcr.io/bincount/trainer:0.1.0' "
            "(ImagePullBackOff)" in str(pull.value))


def test_unschedulable_pod_is_a_progress_note_not_an_error(api, cluster):
    api.script("jobs", AUDIT, [{}, {}, {"conditions": [condition("Complete")], "succeeded": 2}])
    api.add_pod(f"{AUDIT}-0-x7k2q", AUDIT_POD, "Pending", container="audit", conditions=[{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}])
    progress = []

    cluster.run(audit(), timeout=10, progress=progress.append, **FAST)

    assert any("unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu." in p for p in progress)
    assert progress[-1].startswith(f"Job {AUDIT}: Complete")


def test_a_failed_batch_job_reports_the_reason_and_its_main_pods_last_log_lines(api, cluster):
    api.script("jobs", AUDIT, [{"conditions": [condition("Failed", "Job has reached the specified backoff limit")]}])
    api.add_pod(f"{AUDIT}-0-x7k2q", AUDIT_POD, "Failed", "".join(f"shard {i}\n" for i in range(30)) + "OSError: disk\n",
                container="audit")

    with pytest.raises(JobFailed) as failed:
        cluster.run(audit(), timeout=10, **FAST)

    lines = str(failed.value).splitlines()
    assert lines[0] == f"Job {AUDIT} failed: Job has reached the specified backoff limit"
    assert lines[1] == "last 20 log line(s) of its audit container:"
    assert lines[2:] == [f"  shard {i}" for i in range(11, 30)] + ["  OSError: disk"]


def test_experiment_progress_shows_trials_and_the_best_objective(api, cluster):
    best = {"observation": {"metrics": [{"name": "val_accuracy", "latest": "0.81", "max": "0.81"}]}}
    api.script("experiments", "bincount-tune", [
        {"conditions": [condition("Running")], "trialsRunning": 2, "trialsSucceeded": 1, "currentOptimalTrial": best},
        {"conditions": [condition("Succeeded", "Experiment has succeeded because max trial count has reached")],
         "trialsSucceeded": 4, "currentOptimalTrial": best},
    ])
    progress = []

    final = cluster.run(search(max_trials=4), timeout=10, progress=progress.append, on_log=print, **FAST)

    assert final["status"]["trialsSucceeded"] == 4
    for i, lr in enumerate(("0.002", "0.004")):
        labels = {"katib.kubeflow.org/experiment": "bincount-tune"}
        api.add({"apiVersion": "kubeflow.org/v1beta1", "kind": "Trial",
                 "metadata": {"name": f"bincount-tune-{i}", "labels": labels},
                 "spec": {"parameterAssignments": [{"name": "lr", "value": lr}]}})
    api.add({"apiVersion": "kubeflow.org/v1beta1", "kind": "Trial",
             "metadata": {"name": "other-0", "labels": {"katib.kubeflow.org/experiment": "other"}}})
    trials = cluster.list(TRIAL, "katib.kubeflow.org/experiment=bincount-tune")
    assert [t["spec"]["parameterAssignments"][0]["value"] for t in trials] == ["0.002", "0.004"]
    assert progress == [
        "Experiment bincount-tune: Running; trials: 1 succeeded, 2 running, 0 failed of 4; best val_accuracy=0.81",
        "Experiment bincount-tune: Succeeded; trials: 4 succeeded, 0 running, 0 failed of 4; best val_accuracy=0.81"]


def test_inference_service_ready_and_failed_load(api, cluster):
    ok = inference_service("bincount", "s3://bincount/models/r", ServingResources())
    api.script("inferenceservices", "bincount", [
        {"conditions": [{"type": "Ready", "status": "False", "reason": "RevisionMissing"}]},
        {"conditions": [{"type": "Ready", "status": "True"}], "url": "http://bincount.bincount.example.com"}])
    progress = []
    cluster.run(ok, timeout=10, progress=progress.append, **FAST)
    assert progress[-1] == "InferenceService bincount: Ready at http://bincount.bincount.example.com"

    broken = inference_service("broken", "s3://bincount/models/missing", ServingResources())
    api.script("inferenceservices", "broken", [{"modelStatus": {
        "transitionStatus": "BlockedByFailedLoad", "lastFailureInfo": {"message": "model.pt not found"}}}])
    api.add_pod("broken-predictor-0", {"serving.kserve.io/inferenceservice": "broken"}, "Running",
                "loading /mnt/models\nFileNotFoundError: /mnt/models/model.pt\n", container="kserve-container")
    with pytest.raises(JobFailed) as failed:
        cluster.run(broken, timeout=10, **FAST)
    assert str(failed.value).startswith("InferenceService broken failed: model.pt not found")
    assert "FileNotFoundError: /mnt/models/model.pt" in str(failed.value)


def test_creating_twice_and_unreachable_api_are_clear_errors(api, cluster):
    cluster.create(search())
    with pytest.raises(LaunchError, match="Experiment bincount-tune already exists in namespace bincount"):
        cluster.create(search())
    api.stop()
    with pytest.raises(LaunchError, match=f"cannot reach the Kubernetes API at {api.url}"):
        cluster.get(EXPERIMENT, "bincount-tune")


def test_only_the_kinds_it_knows_are_launched_here(cluster):
    with pytest.raises(LaunchError, match="cannot launch Deployment of apps/v1 here"):
        cluster.create({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}})
    with pytest.raises(LaunchError, match="training jobs go through bincount.k8s.training_jobs"):
        cluster.create({"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "x"}})
