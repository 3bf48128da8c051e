"""Launchers (bincount.k8s.launch) through the real `kubernetes` client against the STUB Kubernetes API server in
tests/k8s_stub.py — the only stub this project allows, since no control plane runs here. The objects launched
are the real builders' output."""

from __future__ import annotations

import time

import pytest

from bincount.config import JobResources, ServingResources
from bincount.k8s import launch
from bincount.k8s.launch import (EXPERIMENT, INFERENCE_SERVICE, PYTORCHJOB, TRIAL, Forbidden, JobFailed,
                                 LaunchError, LaunchTimeout, NotInstalled)
from bincount.k8s.resources import ExperimentSpec, SearchParameter, experiment, inference_service, pytorchjob

NAME = "bincount-train"
MASTER = {"training.kubeflow.org/job-name": NAME, "training.kubeflow.org/job-role": "master"}
WORKER = {"training.kubeflow.org/job-name": NAME, "training.kubeflow.org/job-role": "worker"}
FAST = {"poll": 0.01}


def condition(kind: str, message: str = "") -> dict:
    return {"type": kind, "status": "True", "message": message}


def job() -> dict:
    return pytorchjob(NAME, ["--store", "s3://bincount", "--dataset", "abid", "--run", NAME],
                      JobResources(workers=2, procs_per_worker=2, cpu_request="2", cpu_limit="4"))


def test_pytorchjob_runs_to_success_with_progress_and_master_log(api, cluster):
    api.script("pytorchjobs", NAME, [
        {"conditions": [condition("Created")]},
        {"conditions": [condition("Created"), condition("Running")],
         "replicaStatuses": {"Master": {"active": 1}, "Worker": {"active": 1}}},
        {"conditions": [condition("Created"), condition("Succeeded", "PyTorchJob bincount-train succeeded")],
         "replicaStatuses": {"Master": {"succeeded": 1}, "Worker": {"succeeded": 1}}},
    ])
    api.add_pod(f"{NAME}-master-0", MASTER, "Succeeded", "epoch=1 val_accuracy=0.40\nepoch=2 val_accuracy=0.55\n")
    api.add_pod(f"{NAME}-worker-0", WORKER, "Succeeded", "worker output\n")
    progress, lines = [], []

    final = cluster.run(job(), timeout=10, progress=progress.append, on_log=lines.append, **FAST)

    assert api.created == [job()]
    assert final["status"]["conditions"][-1]["type"] == "Succeeded"
    assert progress == [f"PyTorchJob {NAME}: Created",
                        f"PyTorchJob {NAME}: Running (Master 1 active; Worker 1 active)",
                        f"PyTorchJob {NAME}: Succeeded (Master 1 succeeded; Worker 1 succeeded)"]
    assert lines == ["epoch=1 val_accuracy=0.40", "epoch=2 val_accuracy=0.55"]
    assert cluster.logs(PYTORCHJOB, NAME, tail=1) == ["epoch=2 val_accuracy=0.55"]
    assert cluster.delete(PYTORCHJOB, NAME) is True
    assert cluster.delete(PYTORCHJOB, NAME) is False


def test_failed_job_reports_the_reason_and_the_masters_last_log_lines(api, cluster):
    api.script("pytorchjobs", NAME, [
        {"conditions": [condition("Running")]},
        {"conditions": [condition("Running"),
                        condition("Failed", "job has failed because 1 Master replica(s) failed")]},
    ])
    log = "".join(f"step {i}\n" for i in range(30)) + "ValueError: loss is NaN at epoch 2\n"
    api.add_pod(f"{NAME}-master-0", MASTER, "Failed", log)
    cluster.create(job())

    with pytest.raises(JobFailed) as failed:
        cluster.wait(PYTORCHJOB, NAME, timeout=10, **FAST)

    text = str(failed.value)
    assert text.startswith(f"PyTorchJob {NAME} failed: job has failed because 1 Master replica(s) failed")
    assert f"last {launch.LOG_TAIL} log line(s) of its pytorch container" in text
    assert text.rstrip().endswith("ValueError: loss is NaN at epoch 2")
    assert "step 29" in text and "step 10\n" not in text


@pytest.mark.parametrize("kind, body, message", [
    (PYTORCHJOB, job, "Kubeflow Training Operator is not installed: no kubeflow.org/v1 pytorchjobs"),
    (EXPERIMENT, lambda: experiment(ExperimentSpec(
        "bincount-tune", "val_accuracy", (SearchParameter("lr", "double", "--lr", min="0.001", max="0.01"),),
        ("--store", "s3://bincount", "--dataset", "abid"), JobResources())),
     "Katib is not installed: no kubeflow.org/v1beta1 experiments"),
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
    assert cluster.installed(PYTORCHJOB)


def test_rbac_forbidden_names_the_permission_and_the_fix(api, cluster):
    api.forbidden = True

    with pytest.raises(Forbidden) as denied:
        cluster.create(job())

    text = str(denied.value)
    assert f"forbidden to create PyTorchJob {NAME} in namespace bincount (RBAC)" in text
    assert 'cannot create resource "pytorchjobs" in API group "kubeflow.org"' in text
    assert "bincount-pipeline" in text


def test_wait_times_out_with_the_last_state(api, cluster):
    api.script("pytorchjobs", NAME, [{"conditions": [condition("Running")]}])
    cluster.create(job())
    start = time.monotonic()

    with pytest.raises(LaunchTimeout) as late:
        cluster.wait(PYTORCHJOB, NAME, timeout=0.2, poll=0.02)

    assert time.monotonic() - start < 5
    assert f"PyTorchJob {NAME} did not finish within 0.2 s (last state: Running)" in str(late.value)


def test_image_pull_failure_is_surfaced_from_pod_status(api, cluster):
    api.script("pytorchjobs", NAME, [{"conditions": [condition("Created")]}])
    api.add_pod(f"{NAME}-master-0", MASTER, "Pending", container_statuses=[{
        "name": "pytorch", "image": "ghcr.io/bincount/trainer:0.1.0",
        "state": {"waiting": {"reason": "ImagePullBackOff",
                              "message": 'Back-off pulling image "ghcr.io/bincount/trainer:0.1.0"'}}}])
    cluster.create(job())

    with pytest.raises(LaunchError) as pull:
        cluster.wait(PYTORCHJOB, NAME, timeout=10, **FAST)

    assert (f"pod {NAME}-master-0 cannot pull image 'ghcr.io/bincount/trainer:0.1.0' (ImagePullBackOff)"
            in str(pull.value))


def test_unschedulable_pod_is_a_progress_note_not_an_error(api, cluster):
    api.script("pytorchjobs", NAME, [{"conditions": [condition("Created")]}] * 2
               + [{"conditions": [condition("Succeeded")]}])
    api.add_pod(f"{NAME}-master-0", MASTER, "Pending", conditions=[{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}])
    cluster.create(job())
    progress = []

    cluster.wait(PYTORCHJOB, NAME, timeout=10, progress=progress.append, **FAST)

    assert any("unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu." in p for p in progress)


def test_experiment_progress_shows_trials_and_the_best_objective(api, cluster):
    spec = ExperimentSpec("bincount-tune", "val_accuracy",
                          (SearchParameter("lr", "double", "--lr", min="0.001", max="0.01"),),
                          ("--store", "s3://bincount", "--dataset", "abid"), JobResources(), max_trials=4)
    best = {"observation": {"metrics": [{"name": "val_accuracy", "latest": "0.81", "max": "0.81"}]}}
    api.script("experiments", "bincount-tune", [
        {"conditions": [condition("Running")], "trialsRunning": 2, "trialsSucceeded": 1, "currentOptimalTrial": best},
        {"conditions": [condition("Succeeded", "Experiment has succeeded because max trial count has reached")],
         "trialsSucceeded": 4, "currentOptimalTrial": best},
    ])
    progress = []

    final = cluster.run(experiment(spec), timeout=10, progress=progress.append, on_log=print, **FAST)

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
                "loading /mnt/models\nFileNotFoundError: /mnt/models/model.pt\n")
    with pytest.raises(JobFailed) as failed:
        cluster.run(broken, timeout=10, **FAST)
    assert str(failed.value).startswith("InferenceService broken failed: model.pt not found")
    assert "FileNotFoundError: /mnt/models/model.pt" in str(failed.value)


def test_creating_twice_and_unreachable_api_are_clear_errors(api, cluster):
    cluster.create(job())
    with pytest.raises(LaunchError, match=f"PyTorchJob {NAME} already exists in namespace bincount"):
        cluster.create(job())
    api.stop()
    with pytest.raises(LaunchError, match=f"cannot reach the Kubernetes API at {api.url}"):
        cluster.get(PYTORCHJOB, NAME)


def test_only_bincounts_kinds_can_be_launched(cluster):
    with pytest.raises(LaunchError, match="cannot launch Deployment of apps/v1"):
        cluster.create({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}})
