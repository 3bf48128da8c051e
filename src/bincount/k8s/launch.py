"""Create, follow and delete bincount's resources through the Kubernetes API, where no Kubeflow SDK does it.

Katib Experiments and Trials, InferenceServices and the audit's batch Jobs go through the CustomObjects API (its
generic paths serve batch/v1 as well), so one `Cluster` handles them; a `Kind` says where each lives, who serves it
and how to read its state. `Cluster.run` is what the backends call: create, stream the main pod's log, wait on the
conditions, return the final object, or raise one error a user can act on (operator missing, RBAC, image pull,
a failed job with its last log lines). The training jobs go through Kubeflow's SDKs (`training_jobs.py`), which
lean on the parts here that the SDKs lack: the pod watch, the log stream and the mapping of API errors.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes import config as kube_config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from bincount.config import ClusterConfig
from bincount.errors import BincountError
from bincount.k8s.resources import AUDIT_CONTAINER, SERVING_CONTAINER

Callback = Callable[[str], None]
Follow = Callable[["Kind", str, Callback, threading.Event, float], None]   # streams a pod log until it ends
LOG_TAIL = 20
FINAL_LOG_WAIT = 30.0
IMAGE_FAILURES = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"}
START_FAILURES = {"CreateContainerConfigError", "CreateContainerError"}


class LaunchError(BincountError):
    """A cluster-side failure, described so that a user knows what to fix."""


class NotInstalled(LaunchError):
    """The operator that serves a kind (Training Operator, Trainer, Katib, KServe) is not installed."""


class NotFound(LaunchError):
    """The named resource does not exist (its kind does)."""


class Forbidden(LaunchError):
    """RBAC does not let this identity do what the launcher needs."""


class JobFailed(LaunchError):
    """The resource reached a failed state."""


class LaunchTimeout(LaunchError):
    """The resource did not finish within the time allowed."""


@dataclass(frozen=True)
class State:
    summary: str
    done: bool = False
    failed: bool = False
    message: str = ""


def _condition_state(obj: dict[str, Any]) -> State:
    """PyTorchJob and Experiment: the latest true condition; Succeeded and Failed are final."""
    true = [c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
    if not true:
        return State("Pending")
    last = true[-1]
    kind = last.get("type", "Unknown")
    return State(kind, done=kind in ("Succeeded", "Failed"), failed=kind == "Failed",
                 message=last.get("message") or last.get("reason") or "")


def _experiment_state(obj: dict[str, Any]) -> State:
    state = _condition_state(obj)
    status = obj.get("status") or {}
    spec = obj.get("spec") or {}
    trials = ", ".join(f"{status.get(f'trials{k}', 0)} {k.lower()}" for k in ("Succeeded", "Running", "Failed"))
    summary = f"{state.summary}; trials: {trials} of {spec.get('maxTrialCount', '?')}"
    metric = (spec.get("objective") or {}).get("objectiveMetricName")
    observed = ((status.get("currentOptimalTrial") or {}).get("observation") or {}).get("metrics") or []
    best = next((m for m in observed if m.get("name") == metric), None)
    if best:
        summary += f"; best {metric}={best.get('latest')}"
    return State(summary, state.done, state.failed, state.message)


def _serving_state(obj: dict[str, Any]) -> State:
    """InferenceService: Ready is success; a model that cannot load or an invalid spec is final failure."""
    status = obj.get("status") or {}
    model = status.get("modelStatus") or {}
    if model.get("transitionStatus") in ("BlockedByFailedLoad", "InvalidSpec"):
        info = model.get("lastFailureInfo") or {}
        return State(model["transitionStatus"], done=True, failed=True,
                     message=info.get("message") or info.get("reason") or "")
    generation, seen = (obj.get("metadata") or {}).get("generation"), status.get("observedGeneration")
    if generation is not None and seen is not None and seen < generation:
        return State(f"not ready (KServe has not reconciled generation {generation} yet)")
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    if ready.get("status") == "True":
        return State(f"Ready at {status.get('url', '?')}", done=True)
    why = ": ".join(x for x in (ready.get("reason"), ready.get("message")) if x)
    return State(f"not ready ({why})" if why else "not ready")


def _batch_job_state(obj: dict[str, Any]) -> State:
    """A batch Job: Complete is success, Failed final; the summary counts its pods (an indexed Job's indexes)."""
    status = obj.get("status") or {}
    true = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    counts = ", ".join(f"{status.get(k, 0)} {k}" for k in ("succeeded", "active", "failed"))
    summary = f"{(obj.get('spec') or {}).get('completions', '?')} pod(s): {counts}"
    if "Failed" in true:
        c = true["Failed"]
        return State(f"Failed ({summary})", done=True, failed=True, message=c.get("message") or c.get("reason") or "")
    if "Complete" in true:
        return State(f"Complete ({summary})", done=True)
    return State(f"Running ({summary})" if status.get("active") else f"Pending ({summary})")


@dataclass(frozen=True)
class Kind:
    """Where a custom resource lives, who serves it and how to read it. The selectors find its pods (to see
    pull failures) and its main pod (whose log tells the story). Kinds without a `state` are launched by the
    Kubeflow SDKs (`training_jobs.py`), which read the state themselves."""

    group: str
    version: str
    plural: str
    kind: str
    operator: str
    state: Callable[[dict[str, Any]], State] | None = None
    pods: str | None = None
    main_pod: str | None = None
    container: str | None = None

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


EXPERIMENT = Kind("kubeflow.org", "v1beta1", "experiments", "Experiment", "Katib", _experiment_state)
TRIAL = Kind("kubeflow.org", "v1beta1", "trials", "Trial", "Katib", _condition_state)
INFERENCE_SERVICE = Kind("serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService", "KServe",
                         _serving_state, pods="serving.kserve.io/inferenceservice={name}",
                         main_pod="serving.kserve.io/inferenceservice={name}", container=SERVING_CONTAINER)
BATCH_JOB = Kind("batch", "v1", "jobs", "Job", "Kubernetes batch API", _batch_job_state,
                 pods="batch.kubernetes.io/job-name={name}",
                 main_pod="batch.kubernetes.io/job-name={name},batch.kubernetes.io/job-completion-index=0",
                 container=AUDIT_CONTAINER)
KINDS = {(k.api_version, k.kind): k for k in (EXPERIMENT, INFERENCE_SERVICE, BATCH_JOB)}


def kind_of(body: dict[str, Any]) -> Kind:
    key = (body.get("apiVersion"), body.get("kind"))
    if key not in KINDS:
        raise LaunchError(f"cannot launch {key[1]} of {key[0]} here: only {', '.join(KINDS[k].kind for k in KINDS)} "
                          "(training jobs go through bincount.k8s.training_jobs)")
    return KINDS[key]


class PodWatch:
    """Called with the resource's state at every poll: a progress line whenever the state or its pods change, and
    an error when a pod can never start (an image it cannot pull, a missing Secret), which a wait on the
    resource's conditions alone would never see. An unschedulable pod is only a note: the autoscaler may help."""

    def __init__(self, cluster: Cluster, kind: Kind, name: str, progress: Callback | None):
        self.cluster, self.kind, self.name, self.progress = cluster, kind, name, progress
        self.summary, self._line = "Pending", None

    def __call__(self, state: State) -> None:
        fatal, note = self.cluster.pod_problems(self.kind, self.name)
        line = f"{self.kind.kind} {self.name}: {state.summary}" + (f" [{note}]" if note else "")
        if self.progress and line != self._line:
            self.progress(line)
        self.summary, self._line = state.summary, line
        if fatal and not state.done:
            raise LaunchError(f"{self.kind.kind} {self.name} cannot start: {fatal}")

    def timeout(self, timeout: float) -> LaunchTimeout:
        kind = self.kind
        return LaunchTimeout(
            f"{kind.kind} {self.name} did not finish within {timeout:g} s (last state: {self.summary}); it is still "
            f"on the cluster: `kubectl -n {self.cluster.namespace} describe {kind.plural}.{kind.group} {self.name}`")


def failure_text(kind: Kind, name: str, message: str, log: list[str] | str) -> str:
    """`KIND NAME failed: MESSAGE` and the last lines of its main pod's log (or why there are none)."""
    text = f"{kind.kind} {name} failed: {message or 'no reason given'}"
    if isinstance(log, str):
        return f"{text} ({log})"
    lines = log[-LOG_TAIL:]
    return f"{text}\nlast {len(lines)} log line(s) of its {kind.container} container:\n" + "\n".join(
        f"  {line}" for line in lines)


class Cluster:
    """One namespace of one cluster, reached through an authenticated `kubernetes.client.ApiClient`."""

    def __init__(self, api_client: client.ApiClient, config: ClusterConfig | None = None):
        self.config = config or ClusterConfig()
        self.namespace = self.config.namespace
        self.api_client = api_client
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)

    @classmethod
    def connect(cls, config: ClusterConfig | None = None, context: str | None = None) -> Cluster:
        """In a pod, its service account; elsewhere the kubeconfig (KUBECONFIG or ~/.kube/config)."""
        try:
            kube_config.load_incluster_config()
        except kube_config.ConfigException:
            try:
                kube_config.load_kube_config(context=context)
            except (kube_config.ConfigException, OSError) as e:
                raise LaunchError(f"no Kubernetes access: not inside a cluster, no usable kubeconfig ({e})") from None
        return cls(client.ApiClient(), config)

    def create(self, body: dict[str, Any], kind: Kind | None = None) -> dict[str, Any]:
        kind = kind or kind_of(body)
        return self._call(kind, "create", body["metadata"]["name"], self._custom.create_namespaced_custom_object,
                          kind.group, kind.version, self.namespace, kind.plural, body)

    def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        """Creates the resource, or replaces the spec of the one of that name (an InferenceService rolled to
        another model), which its operator then reconciles."""
        kind = kind_of(body)
        name = body["metadata"]["name"]
        try:
            current = self.get(kind, name)
        except NotFound:
            return self.create(body)
        body = {**body, "metadata": {**body["metadata"],
                                     "resourceVersion": current["metadata"].get("resourceVersion")}}
        return self._call(kind, "replace", name, self._custom.replace_namespaced_custom_object,
                          kind.group, kind.version, self.namespace, kind.plural, name, body)

    def get(self, kind: Kind, name: str) -> dict[str, Any]:
        return self._call(kind, "get", name, self._custom.get_namespaced_custom_object,
                          kind.group, kind.version, self.namespace, kind.plural, name)

    def list(self, kind: Kind, selector: str = "") -> list[dict[str, Any]]:
        """The kind's objects in the namespace, e.g. an experiment's trials (`katib.kubeflow.org/experiment=X`)."""
        found = self._call(kind, "list", None, self._custom.list_namespaced_custom_object,
                           kind.group, kind.version, self.namespace, kind.plural, label_selector=selector)
        return found.get("items") or []

    def delete(self, kind: Kind, name: str) -> bool:
        """Deletes the resource and, through the operator, its pods. False when it was already gone."""
        try:
            self._call(kind, "delete", name, self._custom.delete_namespaced_custom_object,
                       kind.group, kind.version, self.namespace, kind.plural, name,
                       body=client.V1DeleteOptions(propagation_policy="Foreground"))
        except NotFound:
            return False
        return True

    def installed(self, kind: Kind) -> bool:
        """Whether the API server serves the kind at all (its CRD is installed)."""
        try:
            found = _json(self._custom.get_api_resources(kind.group, kind.version, _preload_content=False))
        except ApiException as e:
            if e.status == 404:
                return False
            raise self.error(e, kind, "discover", None) from None
        except (HTTPError, OSError) as e:
            raise self.unreachable(e) from None
        return any(r.get("name") == kind.plural for r in found.get("resources") or [])

    def wait(self, kind: Kind, name: str, *, timeout: float, poll: float = 5.0,
             progress: Callback | None = None) -> dict[str, Any]:
        """Polls until the resource succeeds (returned) or fails, a pod cannot start, or `timeout` passes
        (raised). `progress` gets a line whenever the state changes."""
        deadline = time.monotonic() + timeout
        watch = PodWatch(self, kind, name, progress)
        while True:
            obj = self.get(kind, name)
            state = kind.state(obj)
            watch(state)
            if state.failed:
                raise JobFailed(self._failure(kind, name, state))
            if state.done:
                return obj
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise watch.timeout(timeout)
            time.sleep(min(poll, remaining))

    def logs(self, kind: Kind, name: str, tail: int | None = None) -> list[str]:
        """The main pod's log (its last `tail` lines), from the container that does the work."""
        pod = self._main_pod(kind, name)
        if pod is None:
            return []
        text = self._call(kind, "read the log of", name, self._core.read_namespaced_pod_log,
                          pod["metadata"]["name"], self.namespace, container=kind.container,
                          tail_lines=tail, _preload_content=False).data.decode("utf-8", "replace")
        return text.splitlines()

    def follow(self, kind: Kind, name: str, on_line: Callback, stop: threading.Event, poll: float = 5.0) -> None:
        """Streams the main pod's log line by line once the pod has started, until it ends or `stop` is set."""
        while not stop.is_set():
            pod = self._main_pod(kind, name)
            if pod and (pod.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed"):
                stream = self._call(kind, "follow the log of", name, self._core.read_namespaced_pod_log,
                                    pod["metadata"]["name"], self.namespace, container=kind.container,
                                    follow=True, _preload_content=False)
                pending = b""
                for chunk in stream.stream(4096):
                    *lines, pending = (pending + chunk).split(b"\n")
                    for line in lines:
                        on_line(line.decode("utf-8", "replace"))
                    if stop.is_set():
                        break
                if pending:
                    on_line(pending.decode("utf-8", "replace"))
                return
            stop.wait(poll)

    def run(self, body: dict[str, Any], *, timeout: float, poll: float = 5.0, progress: Callback | None = None,
            on_log: Callback | None = None) -> dict[str, Any]:
        """Create, stream the main pod's log to `on_log` while waiting, and return the finished object."""
        kind = kind_of(body)
        name = body["metadata"]["name"]
        self.create(body)
        with self.streaming(kind, name, on_log, poll, progress):
            return self.wait(kind, name, timeout=timeout, poll=poll, progress=progress)

    @contextmanager
    def streaming(self, kind: Kind, name: str, on_log: Callback | None, poll: float, progress: Callback | None,
                  follow: Follow | None = None) -> Iterator[None]:
        """While the block runs, a thread streams the main pod's log to `on_log` (with `follow`, by default
        `self.follow`); a finished pod's log may still be arriving, so the block's end waits a little for it."""
        if not (on_log and kind.main_pod):
            yield
            return
        stop = threading.Event()
        follower = threading.Thread(target=self._follow_reporting, daemon=True,
                                    args=(follow or self.follow, kind, name, on_log, stop, poll, progress))
        follower.start()
        try:
            yield
        except BaseException:
            stop.set()
            raise
        finally:
            follower.join(timeout=FINAL_LOG_WAIT)
            stop.set()

    @staticmethod
    def _follow_reporting(follow: Follow, kind: Kind, name: str, on_line: Callback, stop: threading.Event,
                          poll: float, progress: Callback | None) -> None:
        try:
            follow(kind, name, on_line, stop, poll)
        except (LaunchError, HTTPError, OSError) as e:
            if progress:
                progress(f"log stream of {kind.kind} {name} ended: {e}")

    def _pods(self, selector: str) -> list[dict[str, Any]]:
        found = _json(self._core.list_namespaced_pod(self.namespace, label_selector=selector,
                                                     _preload_content=False))
        return sorted(found.get("items") or [], key=lambda p: p["metadata"].get("creationTimestamp") or "")

    def _main_pod(self, kind: Kind, name: str) -> dict[str, Any] | None:
        if not kind.main_pod:
            return None
        pods = self._call(kind, "list the pods of", name, self._pods, kind.main_pod.format(name=name))
        return pods[-1] if pods else None

    def pod_problems(self, kind: Kind, name: str) -> tuple[str | None, str | None]:
        """(a reason the pods can never start, a note worth showing): pull and config errors are the first,
        an unschedulable pod (the autoscaler may still help) the second."""
        if not kind.pods:
            return None, None
        try:
            pods = self._call(kind, "list the pods of", name, self._pods, kind.pods.format(name=name))
        except Forbidden:
            return None, "cannot read its pods: forbidden"
        note = None
        for pod in pods:
            pod_name = pod["metadata"]["name"]
            status = pod.get("status") or {}
            for c in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
                waiting = (c.get("state") or {}).get("waiting") or {}
                reason, message = waiting.get("reason"), waiting.get("message", "")
                if reason in IMAGE_FAILURES:
                    return f"pod {pod_name} cannot pull image {c.get('image')!r} ({reason}): {message}", None
                if reason in START_FAILURES:
                    return f"pod {pod_name} container {c.get('name')} ({reason}): {message}", None
                if reason == "CrashLoopBackOff":
                    note = f"pod {pod_name} container {c.get('name')} keeps crashing"
            for cond in status.get("conditions") or []:
                if cond.get("type") == "PodScheduled" and cond.get("reason") == "Unschedulable":
                    note = f"pod {pod_name} unschedulable: {cond.get('message', '')}"
        return None, note

    def _failure(self, kind: Kind, name: str, state: State) -> str:
        if not kind.main_pod:
            return f"{kind.kind} {name} failed: {state.message or 'no reason given'}"
        try:
            lines: list[str] | str = self.logs(kind, name, tail=LOG_TAIL) or "no pod log found"
        except LaunchError as e:
            lines = f"its log is unavailable: {e}"
        return failure_text(kind, name, state.message, lines)

    def _call(self, kind: Kind, action: str, name: str | None, fn: Callable[..., Any], *args: Any,
              **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ApiException as e:
            raise self.error(e, kind, action, name) from None
        except (HTTPError, OSError) as e:
            raise self.unreachable(e) from None

    def sdk_error(self, e: Exception, kind: Kind, action: str, name: str | None) -> LaunchError:
        """What a Kubeflow SDK's error means: the SDKs wrap every API error in a RuntimeError; the one under it
        becomes ours (the operator missing, RBAC, a conflict, the API unreachable)."""
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ApiException):
            return self.error(cause, kind, action, name)
        if isinstance(cause, (HTTPError, OSError)):
            return self.unreachable(cause)
        return LaunchError(f"cannot {action} {kind.kind} {name}: {e}")

    def error(self, e: ApiException, kind: Kind, action: str, name: str | None) -> LaunchError:
        message = _status_message(e)
        what = f"{kind.kind} {name}" if name else kind.plural
        if e.status == 404:
            if not self.installed(kind):
                return NotInstalled(f"{kind.operator} is not installed: no {kind.api_version} {kind.plural}")
            return NotFound(f"{kind.kind} {name} not found in namespace {self.namespace}")
        if e.status == 403:
            return Forbidden(
                f"forbidden to {action} {what} in namespace {self.namespace} (RBAC): {message}; run as the "
                f"{self.config.pipeline_service_account} service account or bind its Role (manifests/base) to you")
        if e.status == 401:
            return LaunchError("the Kubernetes API rejected the credentials (401 Unauthorized); "
                               "refresh the kubeconfig or the service account token")
        if e.status == 409 and action == "replace":
            return LaunchError(f"{what} changed on the cluster while it was being replaced; run the step again")
        if e.status == 409:
            return LaunchError(f"{what} already exists in namespace {self.namespace}; delete it or pick another name")
        if e.status == 422:
            return LaunchError(f"the API server rejected {what} as invalid: {message}")
        return LaunchError(f"cannot {action} {what}: HTTP {e.status} {e.reason}: {message}")

    def unreachable(self, e: Exception) -> LaunchError:
        return LaunchError(f"cannot reach the Kubernetes API at {self.api_client.configuration.host}: {e}")


def _json(response: Any) -> dict[str, Any]:
    return json.loads(response.data or b"{}")


def _status_message(e: ApiException) -> str:
    try:
        return json.loads(e.body).get("message") or e.reason or ""
    except (TypeError, ValueError, AttributeError):
        return e.reason or str(e.body or "")
