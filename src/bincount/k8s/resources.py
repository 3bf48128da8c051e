"""Builders of the resources bincount runs on a cluster: PyTorchJob, Katib Experiment, InferenceService, the
audit's indexed Job and CronJob, and the drift report's CronJob.

They are the one source: the launchers create what these return, and `bincount manifests render` writes the same
objects to manifests/. Plain dicts, because that is what both the CustomObjects API and kustomize take.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bincount.config import ClusterConfig, JobResources, ServingResources
from bincount.errors import ALERT_EXIT, ConfigError

TRAIN_COMMAND = ["torchrun", "-m", "bincount.train"]
TRAINER_CONTAINER = "pytorch"
SERVING_CONTAINER = "kserve-container"
AUDIT_CONTAINER = "audit"
MONITOR_CONTAINER = "monitor"
BINCOUNT = ["bincount"]
SERVING_PORT = 8080
SERVING_HOST = "0.0.0.0"                        # every interface: KServe routes to the pod's own address
MODEL_DIR = "/mnt/models"
RUN_AS = 10001
# Katib's StdOut collector default; the trainer's metric lines (`epoch=3 val_accuracy=0.41`) match it.
METRICS_FORMAT = r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"
MASTER_POD_LABELS = {"training.kubeflow.org/job-role": "master"}
JOB_SUCCEEDED = 'status.conditions.#(type=="Succeeded")#|#(status=="True")#'
JOB_FAILED = 'status.conditions.#(type=="Failed")#|#(status=="True")#'
PARAMETER_TYPES = ("double", "int", "categorical", "discrete")
DISTRIBUTIONS = ("uniform", "logUniform", "normal", "logNormal")
TRIAL_NAME = "trialName"
# The trainer's run flag for a launcher: torchrun rejects `--run` after the module as an abbreviation of its own
# `--run-path`, so everything started through torchrun passes `--run-id`.
RUN_FLAG = "--run-id"


def labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "bincount", "app.kubernetes.io/component": component}


def pod_security() -> dict[str, Any]:
    """Every bincount pod runs as an unprivileged user; fsGroup lets it write its mounted volumes."""
    return {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security(standalone: bool = False) -> dict[str, Any]:
    """`standalone` carries the user and seccomp settings in the container itself, for pods whose spec may not
    have a securityContext (Knative, under KServe, rejects one unless its operator enables the feature)."""
    security: dict[str, Any] = {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    if standalone:
        security.update(runAsUser=RUN_AS, runAsGroup=RUN_AS, seccompProfile={"type": "RuntimeDefault"})
    return security


def secret_env(name: str, secret: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": name}}}


S3_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def store_settings(cluster: ClusterConfig) -> dict[str, str]:
    """Where the store is (DESIGN: S3_ENDPOINT, S3_SECURE, AWS_REGION); its credentials live in the S3 Secret."""
    return {"S3_ENDPOINT": cluster.s3_endpoint, "S3_SECURE": "0", "AWS_REGION": cluster.region}


def store_env(cluster: ClusterConfig) -> list[dict[str, Any]]:
    return ([{"name": k, "value": v} for k, v in store_settings(cluster).items()]
            + [secret_env(name, cluster.s3_secret) for name in S3_CREDENTIALS])


CREDENTIALS_DIR = "/etc/bincount/s3"


def credentials_volume(cluster: ClusterConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The S3 Secret as read-only files (group-readable through fsGroup), not as environment variables."""
    return ({"name": "s3-credentials", "secret": {"secretName": cluster.s3_secret, "defaultMode": 0o440}},
            {"name": "s3-credentials", "mountPath": CREDENTIALS_DIR, "readOnly": True})


def file_store_env(cluster: ClusterConfig) -> list[dict[str, Any]]:
    """The store's settings, and where the mounted Secret's files are (the store reads `NAME_FILE`)."""
    return ([{"name": k, "value": v} for k, v in store_settings(cluster).items()]
            + [{"name": f"{name}_FILE", "value": f"{CREDENTIALS_DIR}/{name}"} for name in S3_CREDENTIALS])


def scratch_volume() -> tuple[dict[str, Any], dict[str, Any]]:
    """A writable /tmp (HOME and caches point there in the images) beside a read-only root filesystem."""
    return {"name": "tmp", "emptyDir": {}}, {"name": "tmp", "mountPath": "/tmp"}


def pytorchjob(name: str, train_args: Sequence[str], resources: JobResources,
               cluster: ClusterConfig | None = None) -> dict[str, Any]:
    cluster = cluster or ClusterConfig()
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": name, "namespace": cluster.namespace, "labels": labels("training")},
            "spec": pytorchjob_spec(train_args, resources, cluster)}


def pytorchjob_spec(train_args: Sequence[str], resources: JobResources, cluster: ClusterConfig) -> dict[str, Any]:
    """Master + (workers - 1) Workers running `torchrun -m bincount.train`; the operator's PET_* env gives
    torchrun the node count, rank and rendezvous, `nprocPerNode` the processes per pod."""
    template = {"metadata": {"labels": labels("training")}, "spec": _trainer_pod(train_args, resources, cluster)}
    replicas = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template}}
    if resources.workers > 1:
        replicas["Worker"] = {"replicas": resources.workers - 1, "restartPolicy": "OnFailure",
                              "template": copy.deepcopy(template)}
    # cleanPodPolicy None keeps finished pods, so a failed master's logs stay readable; the TTL tidies up.
    return {"nprocPerNode": str(resources.procs_per_worker),
            "pytorchReplicaSpecs": replicas,
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": resources.backoff_limit,
                          "ttlSecondsAfterFinished": 7 * 24 * 3600}}


def _trainer_pod(train_args: Sequence[str], resources: JobResources, cluster: ClusterConfig) -> dict[str, Any]:
    scratch, scratch_mount = scratch_volume()
    env = store_env(cluster) + [{"name": "OMP_NUM_THREADS", "value": str(resources.cpu_threads)}]
    if resources.gpus_per_worker:
        env.append({"name": "NCCL_DEBUG", "value": "WARN"})
    container = {
        "name": TRAINER_CONTAINER,
        "image": resources.image,
        "imagePullPolicy": "IfNotPresent",
        "command": list(TRAIN_COMMAND),
        "args": list(train_args),
        "env": env,
        "resources": {"requests": resources.requests(), "limits": resources.limits()},
        "securityContext": container_security(),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, scratch_mount],
    }
    return {"serviceAccountName": cluster.workload_service_account,
            "automountServiceAccountToken": False,
            "securityContext": pod_security(),
            "containers": [container],
            "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": resources.shm_size}},
                        scratch]}


@dataclass(frozen=True)
class SearchParameter:
    """One search dimension in Katib's vocabulary, and the trainer flag its value is passed to."""

    name: str
    type: str
    flag: str
    min: str | None = None
    max: str | None = None
    step: str | None = None
    values: tuple[str, ...] = ()
    distribution: str | None = None

    def __post_init__(self) -> None:
        where = f"search parameter {self.name!r}"
        if self.type not in PARAMETER_TYPES:
            raise ConfigError(f"{where}: type {self.type!r} is not one of {', '.join(PARAMETER_TYPES)}")
        ranged = self.type in ("double", "int")
        if ranged and (self.min is None or self.max is None or self.values):
            raise ConfigError(f"{where}: a {self.type} parameter takes min and max, not a list of values")
        if not ranged and (not self.values or self.min is not None or self.max is not None):
            raise ConfigError(f"{where}: a {self.type} parameter takes a list of values, not min/max")
        if self.distribution is not None and self.distribution not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: distribution {self.distribution!r} is not one of {', '.join(DISTRIBUTIONS)}")
        if not self.flag.startswith("--"):
            raise ConfigError(f"{where}: flag {self.flag!r} must be a trainer option such as --lr")

    def feasible_space(self) -> dict[str, Any]:
        space = {"min": self.min, "max": self.max, "step": self.step,
                 "list": list(self.values) or None, "distribution": self.distribution}
        return {k: v for k, v in space.items() if v is not None}


@dataclass(frozen=True)
class ExperimentSpec:
    """What a Katib Experiment needs, independent of where the search space came from (tuning.yaml fills it).

    Each trial runs the trainer with `trial_args`, then `flag value` per parameter, then `--run-id <trial name>`.
    """

    name: str
    objective: str
    parameters: tuple[SearchParameter, ...]
    trial_args: tuple[str, ...]
    resources: JobResources
    goal_type: str = "maximize"
    goal: float | None = None
    additional_metrics: tuple[str, ...] = ()
    algorithm: str = "tpe"
    algorithm_settings: Mapping[str, str] = field(default_factory=dict)
    max_trials: int = 8
    parallel_trials: int = 2
    max_failed_trials: int = 3
    early_stopping: str | None = None
    early_stopping_settings: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"experiment {self.name!r}"
        if self.goal_type not in ("maximize", "minimize"):
            raise ConfigError(f"{where}: goal type {self.goal_type!r} must be maximize or minimize")
        if not self.parameters:
            raise ConfigError(f"{where}: the search space has no parameters")
        names = [p.name for p in self.parameters]
        duplicates = sorted({n for n in names if names.count(n) > 1} | ({TRIAL_NAME} & set(names)))
        if duplicates:
            raise ConfigError(f"{where}: parameter name(s) used twice or reserved: {', '.join(duplicates)}")
        if {"--run", RUN_FLAG} & set(self.trial_args):
            raise ConfigError(f"{where}: trial_args must not set --run or {RUN_FLAG}; every trial runs under its "
                              "own name")
        if not 1 <= self.parallel_trials <= self.max_trials:
            raise ConfigError(f"{where}: need 1 <= parallel_trials ({self.parallel_trials}) <= max_trials "
                              f"({self.max_trials})")
        if self.max_failed_trials < 0:
            raise ConfigError(f"{where}: max_failed_trials must not be negative")


def experiment(spec: ExperimentSpec, cluster: ClusterConfig | None = None) -> dict[str, Any]:
    """A Katib Experiment whose trials are PyTorchJobs built like `pytorchjob`, metrics read from stdout."""
    cluster = cluster or ClusterConfig()
    args = list(spec.trial_args)
    for p in spec.parameters:
        args += [p.flag, f"${{trialParameters.{p.name}}}"]
    args += [RUN_FLAG, f"${{trialParameters.{TRIAL_NAME}}}"]
    trial_parameters = [{"name": p.name, "description": f"trainer {p.flag}", "reference": p.name}
                        for p in spec.parameters]
    trial_parameters.append({"name": TRIAL_NAME, "description": "trainer --run-id: each trial is its own run",
                             "reference": "${trialSpec.Name}"})
    objective: dict[str, Any] = {"type": spec.goal_type, "objectiveMetricName": spec.objective}
    if spec.goal is not None:
        objective["goal"] = spec.goal
    if spec.additional_metrics:
        objective["additionalMetricNames"] = list(spec.additional_metrics)
    body: dict[str, Any] = {
        "objective": objective,
        "algorithm": {"algorithmName": spec.algorithm, **_settings("algorithmSettings", spec.algorithm_settings)},
        "parallelTrialCount": spec.parallel_trials,
        "maxTrialCount": spec.max_trials,
        "maxFailedTrialCount": spec.max_failed_trials,
        "metricsCollectorSpec": {"collector": {"kind": "StdOut"},
                                 "source": {"filter": {"metricsFormat": [METRICS_FORMAT]}}},
        "parameters": [{"name": p.name, "parameterType": p.type, "feasibleSpace": p.feasible_space()}
                       for p in spec.parameters],
        "trialTemplate": {
            "primaryContainerName": TRAINER_CONTAINER,
            "primaryPodLabels": dict(MASTER_POD_LABELS),
            "successCondition": JOB_SUCCEEDED,
            "failureCondition": JOB_FAILED,
            "trialParameters": trial_parameters,
            "trialSpec": {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
                          "spec": pytorchjob_spec(args, spec.resources, cluster)},
        },
    }
    if spec.early_stopping:
        body["earlyStopping"] = {"algorithmName": spec.early_stopping,
                                 **_settings("algorithmSettings", spec.early_stopping_settings)}
    return {"apiVersion": "kubeflow.org/v1beta1", "kind": "Experiment",
            "metadata": {"name": spec.name, "namespace": cluster.namespace, "labels": labels("tuning")},
            "spec": body}


def _settings(key: str, settings: Mapping[str, str]) -> dict[str, Any]:
    return {key: [{"name": k, "value": str(v)} for k, v in settings.items()]} if settings else {}


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
    scratch, scratch_mount = scratch_volume()
    health = {"port": SERVING_PORT, "scheme": "HTTP"}
    args = ["--model", MODEL_DIR, "--host", SERVING_HOST, "--port", str(SERVING_PORT), "--name", name]
    env = [{"name": "STORAGE_URI", "value": storage_uri}]
    if version:
        args += ["--version", version]
    if log_store:
        args += ["--log-store", log_store]
        env += store_env(cluster)
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
        "securityContext": container_security(standalone=True),
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
    scratch, scratch_mount = scratch_volume()
    secret, secret_mount = credentials_volume(cluster)
    container = {
        "name": container_name,
        "image": resources.image,
        "imagePullPolicy": "Always",
        "command": list(BINCOUNT),
        "args": list(args),
        "env": file_store_env(cluster) + [{"name": "OMP_NUM_THREADS", "value": str(resources.cpu_threads)}],
        "resources": {"requests": resources.requests(), "limits": resources.limits()},
        "securityContext": container_security(),
        "volumeMounts": [scratch_mount, secret_mount],
    }
    return {"metadata": {"labels": labels(component)},
            "spec": {"serviceAccountName": cluster.workload_service_account,
                     "automountServiceAccountToken": False,
                     "restartPolicy": restart,
                     "securityContext": pod_security(),
                     "containers": [container],
                     "volumes": [scratch, secret]}}
