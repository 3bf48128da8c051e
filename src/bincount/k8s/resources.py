"""What every bincount pod shares as the kubernetes client's typed models (security, the store's settings and
credentials as files, scratch space), and the builders of the resources that no Kubeflow SDK types: the
InferenceService, the audit's indexed Job and CronJob, and the drift report's CronJob. The training jobs are in
`training.py`, the Katib Experiment in `experiment.py`; the plain conventions (labels, store settings, the run
flag) in `conventions.py`.

The training jobs embed the shared models as they are; the plain dicts below (what the CustomObjects API and
kustomize take) embed their `as_dict` form. Either way there is one source: the launchers create what the builders
return, and `bincount manifests render` writes the same objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from kubernetes import client as k8s

from bincount.config import ClusterConfig, JobResources, ServingResources
from bincount.errors import ALERT_EXIT, ConfigError
from bincount.k8s.conventions import CREDENTIALS_DIR, S3_CREDENTIALS, labels, store_settings

SERVING_CONTAINER = "kserve-container"
AUDIT_CONTAINER = "audit"
MONITOR_CONTAINER = "monitor"
BINCOUNT = ["bincount"]
SERVING_PORT = 8080
SERVING_HOST = "0.0.0.0"                        # every interface: KServe routes to the pod's own address
MODEL_DIR = "/mnt/models"
RUN_AS = 10001


@cache
def _serializer() -> k8s.ApiClient:
    return k8s.ApiClient()


def as_dict(obj: Any) -> Any:
    """A typed object as the API server's JSON: the kubernetes client's models (and the Training SDK's, which are
    built the same way) or the pydantic models of kubeflow-trainer-api and kubeflow-katib-api (`model_dump`).
    Unset fields are left out, as kubectl would leave them."""
    if hasattr(obj, "model_dump"):
        return obj.to_dict()
    return _serializer().sanitize_for_serialization(obj)


def pod_security() -> k8s.V1PodSecurityContext:
    """Every bincount pod runs as an unprivileged user; fsGroup lets it write its mounted volumes."""
    return k8s.V1PodSecurityContext(run_as_non_root=True, run_as_user=RUN_AS, run_as_group=RUN_AS, fs_group=RUN_AS,
                                    seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"))


def container_security(standalone: bool = False) -> k8s.V1SecurityContext:
    """`standalone` carries the user and seccomp settings in the container itself, for pods whose spec may not
    have a securityContext (Knative, under KServe, rejects one unless its operator enables the feature)."""
    security = k8s.V1SecurityContext(run_as_non_root=True, allow_privilege_escalation=False,
                                     read_only_root_filesystem=True, capabilities=k8s.V1Capabilities(drop=["ALL"]))
    if standalone:
        security.run_as_user = security.run_as_group = RUN_AS
        security.seccomp_profile = k8s.V1SeccompProfile(type="RuntimeDefault")
    return security


def credentials_volume(cluster: ClusterConfig) -> tuple[k8s.V1Volume, k8s.V1VolumeMount]:
    """The S3 Secret as read-only files (group-readable through fsGroup), not as environment variables."""
    return (k8s.V1Volume(name="s3-credentials",
                         secret=k8s.V1SecretVolumeSource(secret_name=cluster.s3_secret, default_mode=0o440)),
            k8s.V1VolumeMount(name="s3-credentials", mount_path=CREDENTIALS_DIR, read_only=True))


def file_store_env(cluster: ClusterConfig) -> list[k8s.V1EnvVar]:
    """The store's settings, and where the mounted Secret's files are (the store reads `NAME_FILE`)."""
    return ([k8s.V1EnvVar(name=k, value=v) for k, v in store_settings(cluster).items()]
            + [k8s.V1EnvVar(name=f"{name}_FILE", value=f"{CREDENTIALS_DIR}/{name}") for name in S3_CREDENTIALS])


def secret_store_env(cluster: ClusterConfig) -> list[dict[str, Any]]:
    """The store's settings with its keys as Secret-referenced env, for the one pod that cannot read them as files:
    Knative sets no fsGroup, so a mounted Secret is not readable by the predictor's non-root user."""
    return ([{"name": k, "value": v} for k, v in store_settings(cluster).items()]
            + [{"name": name, "valueFrom": {"secretKeyRef": {"name": cluster.s3_secret, "key": name}}}
               for name in S3_CREDENTIALS])


def scratch_volume() -> tuple[k8s.V1Volume, k8s.V1VolumeMount]:
    """A writable /tmp (HOME and caches point there in the images) beside a read-only root filesystem."""
    return (k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource()),
            k8s.V1VolumeMount(name="tmp", mount_path="/tmp"))


def inference_service(name: str, storage_uri: str, serving: ServingResources, cluster: ClusterConfig | None = None,
                      *, version: str = "", canary_percent: int | None = None, log_store: str = "",
                      logger: dict[str, str] | None = None) -> dict[str, Any]:
    """A custom KServe predictor: our serving image as `kserve-container`. KServe takes a custom container's
    model location from its STORAGE_URI env; the storage initializer fetches it to /mnt/models with the
    credentials of the ServiceAccount's S3 Secret.

    `version` is the run every answer names. `canary_percent` is KServe's canaryTrafficPercent: this spec's
    revision gets that share and the last rolled-out one keeps the rest (Knative mode only). With `log_store` the
    predictor appends its prediction log there, with the S3 Secret as env: Knative sets no fsGroup, so mounted
    Secret files would not be readable by the non-root user. `logger` is KServe's own request/response logger."""
    cluster = cluster or ClusterConfig()
    if not storage_uri.startswith("s3://"):
        raise ConfigError(f"storage URI {storage_uri!r} must be s3://bucket/path (the model directory)")
    scratch, scratch_mount = as_dict(scratch_volume())
    health = {"port": SERVING_PORT, "scheme": "HTTP"}
    args = ["--model", MODEL_DIR, "--host", SERVING_HOST, "--port", str(SERVING_PORT), "--name", name]
    env = [{"name": "STORAGE_URI", "value": storage_uri}]
    if version:
        args += ["--version", version]
    if log_store:
        args += ["--log-store", log_store]
        env += secret_store_env(cluster)
    container = {
        "name": SERVING_CONTAINER,
        "image": serving.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["bincount", "serve"],
        "args": args,
        "env": env,
        "ports": [{"name": "http1", "containerPort": SERVING_PORT, "protocol": "TCP"}],
        "resources": {"requests": serving.requests(), "limits": serving.limits()},
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", **health}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", **health},
                          "initialDelaySeconds": 30, "periodSeconds": 10},
        "securityContext": as_dict(container_security(standalone=True)),
        "volumeMounts": [scratch_mount],
    }
    predictor: dict[str, Any] = {"serviceAccountName": cluster.serving_service_account,
                                 "automountServiceAccountToken": False,
                                 "minReplicas": serving.min_replicas,
                                 "maxReplicas": serving.max_replicas}
    if canary_percent is not None:
        predictor["canaryTrafficPercent"] = canary_percent
    if logger:
        predictor["logger"] = dict(logger)
    predictor.update(containers=[container], volumes=[scratch])
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": name, "namespace": cluster.namespace, "labels": labels("serving")},
            "spec": {"predictor": predictor}}


# checkov's skip annotation, justified in place: the audit and monitor pods run bincount's own image
OWN_IMAGE_TAG = {"checkov.io/skip1": "CKV_K8S_43=bincount's own image is built here and named by its release tag; its "
                                     "digest exists only once a user pushes it, and imagePullPolicy Always re-resolves the tag"}


def audit_job(name: str, worker_args: Sequence[str], resources: JobResources,
              cluster: ClusterConfig | None = None) -> dict[str, Any]:
    """An indexed Job of `resources.workers` pods over a planned audit: pod i runs `bincount audit worker`, which
    reads i from JOB_COMPLETION_INDEX (Kubernetes sets it in an indexed Job's pods) and audits the shards i,
    i + workers, …. A failed pod is retried alone (backoffLimitPerIndex), and its rerun skips the shards it wrote."""
    cluster = cluster or ClusterConfig()
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": cluster.namespace, "labels": labels("audit"),
                         "annotations": dict(OWN_IMAGE_TAG)},
            "spec": {"completionMode": "Indexed", "completions": resources.workers, "parallelism": resources.workers,
                     "backoffLimitPerIndex": resources.backoff_limit, "ttlSecondsAfterFinished": 7 * 24 * 3600,
                     "template": _batch_pod("audit", AUDIT_CONTAINER, worker_args, resources, cluster, "Never")}}


def audit_cronjob(name: str, schedule: str, audit_args: Sequence[str], resources: JobResources,
                  cluster: ClusterConfig | None = None) -> dict[str, Any]:
    """The scheduled audit: each run is one pod doing the whole `bincount audit` (plan, `--workers` processes, report),
    never two at once."""
    cluster = cluster or ClusterConfig()
    job = {"backoffLimit": resources.backoff_limit, "ttlSecondsAfterFinished": 7 * 24 * 3600,
           "template": _batch_pod("audit", AUDIT_CONTAINER, audit_args, resources, cluster, "OnFailure")}
    return _cronjob(name, "audit", schedule, job, cluster)


def monitor_cronjob(name: str, schedule: str, monitor_args: Sequence[str], resources: JobResources,
                    cluster: ClusterConfig | None = None) -> dict[str, Any]:
    """The scheduled drift report. `bincount monitor` exits ALERT_EXIT on drift: a pod failure policy fails the Job
    at once on that code (the failed Job is the alert), while other failures are retried up to the backoff limit."""
    cluster = cluster or ClusterConfig()
    job = {"backoffLimit": resources.backoff_limit, "ttlSecondsAfterFinished": 7 * 24 * 3600,
           "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
               "containerName": MONITOR_CONTAINER, "operator": "In", "values": [ALERT_EXIT]}}]},
           "template": _batch_pod("monitor", MONITOR_CONTAINER, monitor_args, resources, cluster, "Never")}
    return _cronjob(name, "monitor", schedule, job, cluster)


def _cronjob(name: str, component: str, schedule: str, job: dict[str, Any], cluster: ClusterConfig) -> dict[str, Any]:
    return {"apiVersion": "batch/v1", "kind": "CronJob",
            "metadata": {"name": name, "namespace": cluster.namespace, "labels": labels(component),
                         "annotations": dict(OWN_IMAGE_TAG)},
            "spec": {"schedule": schedule, "concurrencyPolicy": "Forbid", "successfulJobsHistoryLimit": 3,
                     "failedJobsHistoryLimit": 3,
                     "jobTemplate": {"metadata": {"labels": labels(component)}, "spec": job}}}


def _batch_pod(component: str, container_name: str, args: Sequence[str], resources: JobResources,
               cluster: ClusterConfig, restart: str) -> dict[str, Any]:
    """A pod of bincount's own command over the store, which it reaches with the S3 Secret mounted as files."""
    scratch, scratch_mount = as_dict(scratch_volume())
    secret, secret_mount = as_dict(credentials_volume(cluster))
    container = {
        "name": container_name,
        "image": resources.image,
        "imagePullPolicy": "Always",
        "command": list(BINCOUNT),
        "args": list(args),
        "env": [*as_dict(file_store_env(cluster)), {"name": "OMP_NUM_THREADS", "value": str(resources.cpu_threads)}],
        "resources": {"requests": resources.requests(), "limits": resources.limits()},
        "securityContext": as_dict(container_security()),
        "volumeMounts": [scratch_mount, secret_mount],
    }
    return {"metadata": {"labels": labels(component)},
            "spec": {"serviceAccountName": cluster.workload_service_account,
                     "automountServiceAccountToken": False,
                     "restartPolicy": restart,
                     "securityContext": as_dict(pod_security()),
                     "containers": [container],
                     "volumes": [scratch, secret]}}
