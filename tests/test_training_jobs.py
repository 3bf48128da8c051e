"""The training job's launchers (bincount.k8s.training_jobs) for both training APIs: Kubeflow's own clients (the
Training SDK's TrainingClient for PyTorchJobs, the kubeflow SDK's TrainerClient for TrainJobs) make their own calls
against the STUB Kubernetes API server in tests/k8s_stub.py, the only stub this project allows (no control plane runs
here); nothing of the SDKs is mocked. The jobs are the real builders' output; the TrainJob's runtime is the one a
Trainer v2.3 install ships (../shared/crds/runtimes), and the statuses served have the shapes of the SDKs' models."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml
from k8s_validation import CRDS

from bincount import cli
from bincount.config import ClusterConfig, JobResources
from bincount.errors import ConfigError
from bincount.k8s.launch import Cluster, Forbidden, JobFailed, LaunchError, LaunchTimeout, NotFound, NotInstalled
from bincount.k8s.resources import as_dict
from bincount.k8s.training import PYTORCHJOB, TRAINJOB, TrainingAPI
from bincount.k8s.training_jobs import PyTorchJobs, TrainJobs, launcher

NAME = "bincount-train"
FAST = {"poll": 0.01}
IMAGE = "ghcr.io/bincount/trainer:0.1.0"
RUNTIME_FILE = CRDS / "runtimes" / "torch-distributed.yaml"
RESOURCES = JobResources(workers=2, procs_per_worker=2, cpu_request="2", cpu_limit="4")

pytestmark = pytest.mark.skipif(not RUNTIME_FILE.is_file(), reason=f"the shared CRDs are not at {CRDS}")


def condition(kind: str, message: str = "", reason: str = "") -> dict:
    """A condition as both operators write one (a TrainJob's is a metav1.Condition: every field set)."""
    return {"type": kind, "status": "True", "reason": reason or kind, "message": message,
            "lastTransitionTime": "2026-01-01T00:00:00Z"}


@dataclass
class API:
    """One training API's world: its jobs, its pods' labels, its conditions and its launcher."""

    api: TrainingAPI
    job_status: Callable[[str, str], dict]        # (condition, message) → the job's status at that point
    worker_labels: dict[str, str] = field(default_factory=dict)

    @property
    def plural(self) -> str:
        return self.api.plural

    def job(self, name: str = NAME, resources: JobResources = RESOURCES) -> Any:
        return self.api.job(name, ["--store", "s3://bincount", "--dataset", "abid", "--run-id", name], resources,
                            self.config)

    @property
    def config(self) -> ClusterConfig:
        return ClusterConfig(training_api=self.api.name)

    def rank0(self, name: str = NAME) -> dict[str, str]:
        return {self.api.job_label: name, **self.api.main_pod}

    def worker(self, name: str = NAME) -> dict[str, str]:
        return {self.api.job_label: name, **self.worker_labels}


def pytorchjob_status(kind: str, message: str = "") -> dict:
    running = {"Master": {"active": 1}, "Worker": {"active": 1}}
    done = {"Master": {"succeeded": 1}, "Worker": {"succeeded": 1}}
    return {"conditions": [condition("Created"), *([condition(kind, message)] if kind != "Created" else [])],
            **({"replicaStatuses": running} if kind == "Running" else {}),
            **({"replicaStatuses": done} if kind == "Succeeded" else {})}


def trainjob_status(kind: str, message: str = "") -> dict:
    """TrainJobs have no Running condition (the SDK calls a job Running when all its nodes run)."""
    return {"conditions": [condition(kind, message)]} if kind in ("Complete", "Failed", "Created") else {}


APIS = {
    "pytorchjob": API(PYTORCHJOB, pytorchjob_status, {"training.kubeflow.org/job-role": "worker"}),
    "trainjob": API(TRAINJOB, trainjob_status, {"jobset.sigs.k8s.io/replicatedjob-name": "node",
                                                "batch.kubernetes.io/job-completion-index": "1"}),
}


@pytest.fixture(params=list(APIS))
def world(request, api) -> API:
    """Each training API, on a cluster with its operator; Trainer's with the runtime its install ships."""
    api.add(yaml.safe_load(RUNTIME_FILE.read_text()))
    return APIS[request.param]


@pytest.fixture
def trainer_world(api) -> API:
    api.add(yaml.safe_load(RUNTIME_FILE.read_text()))
    return APIS["trainjob"]


def on(api, world: API) -> Cluster:
    return Cluster(api.client(), world.config)


def test_a_job_runs_to_success_with_progress_and_rank_zeros_log(api, world):
    s, done = world.job_status, world.api.succeeded
    api.script(world.plural, NAME, [s("Created", ""), s("Running", ""), s(done, f"job {NAME} done")])
    api.add_pod(f"{NAME}-rank0", world.rank0(), "Succeeded", "epoch=1 val_accuracy=0.40\nepoch=2 val_accuracy=0.55\n",
                container=world.api.container)
    api.add_pod(f"{NAME}-rank1", world.worker(), "Succeeded", "worker output\n", container=world.api.container)
    progress, lines = [], []

    final = launcher(on(api, world)).run(world.job(), timeout=10, progress=progress.append, on_log=lines.append,
                                         **FAST)

    assert api.created == [as_dict(world.job())]
    assert lines == ["epoch=1 val_accuracy=0.40", "epoch=2 val_accuracy=0.55"]
    if world.api is PYTORCHJOB:
        assert type(final).__name__ == "KubeflowOrgV1PyTorchJob"
        assert progress == [f"PyTorchJob {NAME}: Created", f"PyTorchJob {NAME}: Running (Master 1 active; Worker 1 "
                            "active)", f"PyTorchJob {NAME}: Succeeded (Master 1 succeeded; Worker 1 succeeded)"]
    else:
        # the SDK's log stream reads the TrainJob too, so it may take a scripted status the wait does not see
        assert (final.name, final.status, [s.name for s in final.steps]) == (NAME, "Complete", ["node-0", "node-1"])
        states = [f"TrainJob {NAME}: {status} (node-0 Succeeded; node-1 Succeeded)"
                  for status in ("Created", "Running", "Complete")]
        assert progress == sorted(progress, key=states.index) and progress[-1] == states[-1]


def test_a_pod_that_cannot_pull_its_image_ends_the_wait_with_its_reason(api, world):
    """The SDKs wait on the job's conditions, which stay as they are: the pod watch in their callback ends it."""
    api.script(world.plural, NAME, [world.job_status("Created", "")])
    api.add_pod(f"{NAME}-rank0", world.rank0(), "Pending", container=world.api.container, container_statuses=[{
        "name": world.api.container, "image": IMAGE,
        "state": {"waiting": {"reason": "ImagePullBackOff", "message": f'Back-off pulling image "{IMAGE}"'}}}])

    with pytest.raises(LaunchError) as pull:
        launcher(on(api, world)).run(world.job(), timeout=10, **FAST)

    assert str(pull.value) == (f"{world.api.kind} {NAME} cannot start: pod {NAME}-rank0 cannot pull image '{IMAGE}' "
                               f'(ImagePullBackOff): Back-off pulling image "{IMAGE}"')


def test_an_unschedulable_pod_is_a_note_in_the_progress(api, world):
    s = world.job_status
    api.script(world.plural, NAME, [s("Created", ""), s("Created", ""), s(world.api.succeeded, "")])
    api.add_pod(f"{NAME}-rank0", world.rank0(), "Pending", container=world.api.container, conditions=[{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}])
    progress = []

    launcher(on(api, world)).run(world.job(), timeout=10, progress=progress.append, **FAST)

    assert any(f"[pod {NAME}-rank0 unschedulable: 0/3 nodes are available" in p for p in progress)


def test_the_wait_times_out_with_the_last_state(api, world):
    api.script(world.plural, NAME, [world.job_status("Created", "")])

    with pytest.raises(LaunchTimeout) as late:
        launcher(on(api, world)).run(world.job(), timeout=0.3, poll=0.02)

    assert f"{world.api.kind} {NAME} did not finish within 0.3 s (last state: Created)" in str(late.value)
    assert f"kubectl -n bincount describe {world.plural}.{world.api.group} {NAME}" in str(late.value)


def test_a_missing_operator_and_forbidden_rbac_are_clear_errors(api, world):
    api.forbidden = True
    with pytest.raises(Forbidden) as denied:
        launcher(on(api, world)).run(world.job(), timeout=10, **FAST)
    assert f"forbidden to get {world.api.kind} {NAME} in namespace bincount (RBAC)" in str(denied.value)
    assert f'cannot get resource "{world.plural}" in API group "{world.api.group}"' in str(denied.value)

    api.forbidden = False
    del api.served[world.api.api_version]
    with pytest.raises(NotInstalled) as missing:
        launcher(on(api, world)).run(world.job(), timeout=10, **FAST)
    assert str(missing.value) == (f"{world.api.operator} is not installed: no {world.api.api_version} "
                                  f"{world.plural}")
    assert api.created == []


def test_a_finished_job_of_the_run_is_deleted_through_the_sdk_and_the_run_starts_again(api, world):
    """A rerun (a retried pipeline step) resumes from the run's checkpoint, so the job is made anew."""
    s, done = world.job_status, world.api.succeeded
    api.add(as_dict(world.job()))
    api.script(world.plural, NAME, [s("Failed", "OOMKilled"), s(done, "")])
    progress = []

    launcher(on(api, world)).run(world.job(), timeout=10, progress=progress.append, **FAST)

    assert progress[0] == f"deleting the finished {world.api.kind} {NAME} (Failed) to run it again"
    assert [(plural, name) for plural, name, _ in api.deleted] == [(world.plural, NAME)]
    assert api.created == [as_dict(world.job())]


def test_a_job_of_the_run_that_still_runs_is_followed_not_created_again(api, world):
    s = world.job_status
    api.add(as_dict(world.job()))
    api.script(world.plural, NAME, [s("Created", ""), s("Created", ""), s(world.api.succeeded, "")])
    progress = []

    launcher(on(api, world)).run(world.job(), timeout=10, progress=progress.append, **FAST)

    assert progress[0] == f"following the {world.api.kind} {NAME} that is already running (Created)"
    assert api.created == [] and api.deleted == []


def test_a_failed_pytorchjob_reports_its_reason_and_the_masters_last_log_lines(api):
    world = APIS["pytorchjob"]
    api.script(world.plural, NAME, [pytorchjob_status("Running"),
                                    pytorchjob_status("Failed", "job has failed because 1 Master replica(s) failed")])
    log = "".join(f"step {i}\n" for i in range(30)) + "ValueError: loss is NaN at epoch 2\n"
    api.add_pod(f"{NAME}-master-0", world.rank0(), "Failed", log)

    with pytest.raises(JobFailed) as failed:
        PyTorchJobs(on(api, world)).run(world.job(), timeout=10, **FAST)

    lines = str(failed.value).splitlines()
    assert lines[0] == f"PyTorchJob {NAME} failed: job has failed because 1 Master replica(s) failed"
    assert lines[1] == "last 20 log line(s) of its pytorch container:"
    assert lines[2:] == [f"  step {i}" for i in range(11, 30)] + ["  ValueError: loss is NaN at epoch 2"]


def test_a_failed_trainjob_ends_with_its_reason_in_one_line(api, trainer_world):
    message = "jobset failed:\n  ReplicatedJob node failed: 1 of 2 pods exited with code 1"
    api.script("trainjobs", NAME, [{"conditions": [condition("Failed", message, "FailedJobs")]}])

    with pytest.raises(JobFailed) as failed:
        TrainJobs(on(api, trainer_world)).run(trainer_world.job(), timeout=10, **FAST)

    assert str(failed.value) == (f"TrainJob {NAME} failed: jobset failed: ReplicatedJob node failed: 1 of 2 pods "
                                 "exited with code 1 (FailedJobs)")


def test_a_trainjob_needs_its_runtime_and_a_torch_one(api, trainer_world):
    del api.objects[("clustertrainingruntimes", "torch-distributed")]
    with pytest.raises(NotFound, match="the TrainJob's runtime torch-distributed is not installed: no "
                                       "TrainingRuntime of that name in namespace bincount and no "
                                       "ClusterTrainingRuntime either"):
        TrainJobs(on(api, trainer_world)).run(trainer_world.job(), timeout=10, **FAST)

    other = yaml.safe_load(RUNTIME_FILE.read_text())
    other["metadata"] = {"name": "jax-distributed", "labels": {"trainer.kubeflow.org/framework": "jax"}}
    api.add(other)
    cluster = Cluster(api.client(), ClusterConfig(training_api="trainjob", training_runtime="jax-distributed"))
    job = TRAINJOB.job(NAME, ["--run-id", NAME], RESOURCES, cluster.config)
    with pytest.raises(ConfigError, match="runtime jax-distributed runs jax, not torch"):
        TrainJobs(cluster).run(job, timeout=10, **FAST)
    assert api.created == []


def test_cli_trains_on_the_cluster_and_a_failed_trainjob_is_one_line(api, trainer_world, kubeconfig, capsys):
    api.script("trainjobs", "bc-run", [{"conditions": [condition("Failed", "node-0 exited 1", "FailedJobs")]}])
    argv = ["train", "--store", "s3://bincount", "--dataset", "abid", "--run", "bc-run", "--epochs", "3",
            "--backend", "kubernetes", "--training-api", "trainjob", "--nodes", "2", "--poll", "0.01"]

    assert cli.main(argv) == 1

    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "bincount: error: TrainJob bc-run failed: node-0 exited 1 (FailedJobs)"
    [created] = api.created
    assert created["kind"] == "TrainJob" and created["spec"]["trainer"]["numNodes"] == 2
    assert created["spec"]["trainer"]["args"] == ["--store", "s3://bincount", "--dataset", "abid", "--run-id",
                                                  "bc-run", "--set", "epochs=3"]

    assert cli.main(["train", "--store", "s3://bincount", "--dataset", "abid", "--run", "r", "--nodes", "2"]) == 1
    assert capsys.readouterr().err == ("bincount: error: --nodes size a cluster's training job: add --backend "
                                       "kubernetes, or run this command under torchrun for several processes here\n")
