"""The training job's launchers, through Kubeflow's own clients: a PyTorchJob through the Training SDK's
`TrainingClient`, a TrainJob through the kubeflow SDK's `TrainerClient`. `launcher(cluster).run(job)` creates the
builder's job, streams rank 0's log, waits for the end and returns the finished job, or raises one error a user can
act on. A job of the same name that already finished is deleted first, so rerunning a run (a retried pipeline step)
starts it again from its checkpoint; one still running is followed instead.

Done here, through `Cluster`, because the SDKs cannot do it:
- See a pod that can never start (an image that cannot be pulled, a missing Secret): both SDKs wait on the job's
  conditions alone, which then never change. The pod watch runs as the SDK wait's callback and ends the wait with
  the pod's own reason.
- Stream the PyTorchJob master's log to a callback as it comes: `TrainingClient.get_job_logs(follow=True)` prints
  each line to stdout behind the pod's name and returns only at the end. (`TrainerClient.get_job_logs` yields the
  lines, and streams the TrainJob's.)
- Submit our TrainJob: `TrainerClient.train` builds its own TrainJob from a `CustomTrainerContainer`, which has no
  processes per node (the runtime's `auto` starts one process per CPU of a CPU node's limit) and sets a node's
  requests equal to its limits. The builder's typed TrainJob, the object manifests/ is rendered from, is created
  the way the SDK creates its own: one call of the CustomObjects API.
- Say why a TrainJob failed: the SDK's TrainJob carries the status word only; the condition's reason and message
  are read from the typed `TrainerV1alpha1TrainJob`.
- Name what went wrong: the SDKs wrap every API error in a RuntimeError; `Cluster.sdk_error` maps the one under it.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from abc import ABC, abstractmethod
from typing import Any

from kubeflow.common.types import KubernetesBackendConfig
from kubeflow.trainer import TrainerClient
from kubeflow.training import TrainingClient
from kubeflow.training import models as training
from kubeflow_trainer_api import models as trainer
from kubernetes import client

from bincount.errors import ConfigError
from bincount.k8s.launch import (LOG_TAIL, Callback, Cluster, JobFailed, Kind, LaunchError, NotFound, PodWatch,
                                 State, failure_text)
from bincount.k8s.resources import as_dict
from bincount.k8s.training import PYTORCHJOB, TRAINJOB, TrainingAPI, training_api

FAILED = "Failed"


def job_kind(api: TrainingAPI) -> Kind:
    """The job's place in the API, its pods (`job_label`=name) and its main pod (rank 0)."""
    pods = f"{api.job_label}={{name}}"
    return Kind(api.group, api.version, api.plural, api.kind, api.operator, pods=pods,
                main_pod=",".join([pods, *(f"{k}={v}" for k, v in api.main_pod.items())]), container=api.container)


RUNTIME = Kind(TRAINJOB.group, TRAINJOB.version, "clustertrainingruntimes", "ClusterTrainingRuntime",
               TRAINJOB.operator)


def _rounds(timeout: float) -> float:
    """The SDKs wait a number of polls worth `timeout`; "until it ends" is as many as fit in an int."""
    return timeout if math.isfinite(timeout) else sys.maxsize


class Launcher(ABC):
    """Runs one training API's jobs through its SDK client (`sdk`: `get_job`, `delete_job` and the rest); the
    subclasses are the parts each SDK does its own way."""

    api: TrainingAPI
    sdk: Any

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.kind = job_kind(self.api)
        self.namespace = cluster.namespace

    def run(self, job: Any, *, timeout: float, poll: float = 5.0, progress: Callback | None = None,
            on_log: Callback | None = None) -> Any:
        """Creates `job` (unless one of its name runs already), streams rank 0's log to `on_log` while it runs, and
        returns the finished job."""
        name = job.metadata.name
        if self._replace(name, timeout, poll, progress):
            self._create(job)
        with self.cluster.streaming(self.kind, name, on_log, poll, progress, self._follow):
            return self.wait(name, timeout=timeout, poll=poll, progress=progress)

    def wait(self, name: str, *, timeout: float, poll: float = 5.0, progress: Callback | None = None) -> Any:
        """The SDK's wait for the job's end, with the pod watch as its callback; a failed job is raised."""
        watch = PodWatch(self.cluster, self.kind, name, progress)
        try:
            final = self._wait(name, timeout, poll, watch)
        except TimeoutError:
            raise watch.timeout(timeout) from None
        except RuntimeError as e:
            raise self.cluster.sdk_error(e, self.kind, "get", name) from None
        if self._state(final).failed:
            raise JobFailed(self._failure(name, final))
        return final

    def _replace(self, name: str, timeout: float, poll: float, progress: Callback | None) -> bool:
        """False when a job of this name is running (it is followed); a finished one is deleted through the SDK and
        True returned once it is gone, so that the run starts again."""
        try:
            existing = self._state(self.sdk.get_job(name))
        except RuntimeError as e:
            error = self.cluster.sdk_error(e, self.kind, "get", name)
            if isinstance(error, NotFound):
                return True
            raise error from None
        if not existing.done:
            if progress:
                progress(f"following the {self.kind.kind} {name} that is already running ({existing.summary})")
            return False
        if progress:
            progress(f"deleting the finished {self.kind.kind} {name} ({existing.summary}) to run it again")
        try:
            self._delete(name)
        except RuntimeError as e:
            raise self.cluster.sdk_error(e, self.kind, "delete", name) from None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.cluster.get(self.kind, name)
            except NotFound:
                return True
            time.sleep(poll)
        raise LaunchError(f"{self.kind.kind} {name} was not deleted within {timeout:g} s; it blocks the new run")

    @abstractmethod
    def _create(self, job: Any) -> None: ...

    @abstractmethod
    def _delete(self, name: str) -> None: ...

    @abstractmethod
    def _wait(self, name: str, timeout: float, poll: float, watch: PodWatch) -> Any: ...

    @abstractmethod
    def _follow(self, kind: Kind, name: str, on_line: Callback, stop: threading.Event, poll: float) -> None: ...

    @abstractmethod
    def _state(self, job: Any) -> State:
        """The state of the job as the SDK returns it."""

    @abstractmethod
    def _failure(self, name: str, job: Any) -> str: ...


class PyTorchJobs(Launcher):
    """PyTorchJobs through `TrainingClient`: create_job, wait_for_job_conditions, get_job_logs, delete_job."""

    api = PYTORCHJOB

    def __init__(self, cluster: Cluster):
        super().__init__(cluster)
        self.sdk = TrainingClient(client_configuration=cluster.api_client.configuration, namespace=self.namespace,
                                  job_kind=self.api.kind)

    def _create(self, job: training.KubeflowOrgV1PyTorchJob) -> None:
        try:
            self.sdk.create_job(job=job)
        except RuntimeError as e:
            raise self.cluster.sdk_error(e, self.kind, "create", job.metadata.name) from None

    def _delete(self, name: str) -> None:
        self.sdk.delete_job(name, delete_options=client.V1DeleteOptions(propagation_policy="Foreground"))

    def _wait(self, name: str, timeout: float, poll: float, watch: PodWatch) -> training.KubeflowOrgV1PyTorchJob:
        return self.sdk.wait_for_job_conditions(
            name, expected_conditions={self.api.succeeded, FAILED}, wait_timeout=_rounds(timeout),
            polling_interval=poll, callback=lambda job: watch(self._state(job)))

    def _follow(self, kind: Kind, name: str, on_line: Callback, stop: threading.Event, poll: float) -> None:
        self.cluster.follow(kind, name, on_line, stop, poll)

    def _state(self, job: training.KubeflowOrgV1PyTorchJob) -> State:
        """The latest true condition, and the replicas' pod counts (`Running (Master 1 active; Worker 1 active)`)."""
        obj = as_dict(job)
        true = [c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
        last = true[-1] if true else {}
        condition = last.get("type", "Pending")
        parts = []
        for role, counts in sorted(((obj.get("status") or {}).get("replicaStatuses") or {}).items()):
            nonzero = [f"{n} {k}" for k, n in sorted(counts.items()) if isinstance(n, int) and n]
            if nonzero:
                parts.append(f"{role} {', '.join(nonzero)}")
        summary = f"{condition} ({'; '.join(parts)})" if parts else condition
        return State(summary, done=condition in (self.api.succeeded, FAILED), failed=condition == FAILED,
                     message=last.get("message") or last.get("reason") or "")

    def _failure(self, name: str, job: training.KubeflowOrgV1PyTorchJob) -> str:
        """The reason, and the last lines of the master's log (read with `get_job_logs`)."""
        message = self._state(job).message
        try:
            logs, _ = self.sdk.get_job_logs(name, is_master=True)
        except RuntimeError as e:
            return failure_text(self.kind, name, message, f"its log is unavailable: {e}")
        lines = [line for pod in sorted(logs) for line in logs[pod].splitlines()]
        return failure_text(self.kind, name, message, lines[-LOG_TAIL:] or "no pod log found")


class TrainJobs(Launcher):
    """TrainJobs through `TrainerClient`: get_runtime (the runtime must exist and run torch), wait_for_job_status,
    get_job_logs, delete_job; the job itself is the builder's typed TrainJob (see the module's docstring)."""

    api = TRAINJOB

    def __init__(self, cluster: Cluster):
        super().__init__(cluster)
        self.sdk = TrainerClient(KubernetesBackendConfig(namespace=self.namespace,
                                                         client_configuration=cluster.api_client.configuration))

    def _create(self, job: trainer.TrainerV1alpha1TrainJob) -> None:
        runtime = job.spec.runtime_ref.name
        try:
            found = self.sdk.get_runtime(runtime)
        except RuntimeError as e:
            error = self.cluster.sdk_error(e, RUNTIME, "get", runtime)
            if isinstance(error, NotFound):
                error = NotFound(f"the TrainJob's runtime {runtime} is not installed: no TrainingRuntime of that name "
                                 f"in namespace {self.namespace} and no ClusterTrainingRuntime either")
            raise error from None
        if found.trainer.framework != "torch":
            raise ConfigError(f"runtime {runtime} runs {found.trainer.framework}, not torch: bincount trains with "
                              "torchrun; name a torch runtime (ClusterConfig.training_runtime)")
        self.cluster.create(job.to_dict(), self.kind)

    def _delete(self, name: str) -> None:
        self.sdk.delete_job(name)

    def _wait(self, name: str, timeout: float, poll: float, watch: PodWatch) -> Any:
        poll = min(poll, timeout / 2)               # the SDK wants a poll shorter than the wait
        return self.sdk.wait_for_job_status(name, status={self.api.succeeded, FAILED}, timeout=_rounds(timeout),
                                            polling_interval=poll, callbacks=[lambda job: watch(self._state(job))])

    def _follow(self, kind: Kind, name: str, on_line: Callback, stop: threading.Event, poll: float) -> None:
        """`get_job_logs(follow=True)` once node 0 has started (before, it yields nothing)."""
        while not stop.is_set():
            streamed = False
            try:
                for line in self.sdk.get_job_logs(name, follow=True):
                    streamed = True
                    on_line(line)
            except RuntimeError as e:
                raise self.cluster.sdk_error(e, kind, "follow the log of", name) from None
            if streamed:
                return
            stop.wait(poll)

    def _state(self, job: Any) -> State:
        """The SDK's status word and its nodes' pod phases (`Running (node-0 Running; node-1 Pending)`)."""
        steps = "; ".join(f"{s.name} {s.status}" for s in job.steps if s.status)
        return State(f"{job.status} ({steps})" if steps else job.status,
                     done=job.status in (self.api.succeeded, FAILED), failed=job.status == FAILED)

    def _failure(self, name: str, job: Any) -> str:
        """One line: the Failed condition's message and reason, from the typed TrainJob (rank 0's log has already
        been streamed, or is a `kubectl logs` away)."""
        obj = trainer.TrainerV1alpha1TrainJob.from_dict(self.cluster.get(self.kind, name))
        failed = next((c for c in reversed((obj.status and obj.status.conditions) or [])
                       if c.type == FAILED and c.status == "True"), None)
        why = " ".join(failed.message.split()) if failed and failed.message else "no reason given"
        return f"TrainJob {name} failed: {why}" + (f" ({failed.reason})" if failed and failed.reason else "")


LAUNCHERS: dict[str, type[Launcher]] = {PyTorchJobs.api.name: PyTorchJobs, TrainJobs.api.name: TrainJobs}


def launcher(cluster: Cluster) -> Launcher:
    """The launcher of the cluster's training API (`ClusterConfig.training_api`)."""
    return LAUNCHERS[training_api(cluster.config).name](cluster)
