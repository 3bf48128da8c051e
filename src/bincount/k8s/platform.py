"""The platform the stages run on (manifests/base): namespace, service accounts and RBAC, MinIO and its bucket.

The S3 Secret itself is made by kustomize's secretGenerator in each overlay (its values never live in Python or
in committed YAML); `s3_secret_annotations` gives it the KServe annotations.
"""

from __future__ import annotations

from typing import Any

from bincount.config import ClusterConfig
from bincount.k8s.conventions import CREDENTIALS_DIR, labels, store_settings
from bincount.k8s.resources import as_dict, container_security, credentials_volume, pod_security, scratch_volume

# Third-party images are pinned by tag and digest (the multi-arch index), so `Always` only re-verifies them.
MINIO_IMAGE = ("quay.io/minio/minio:RELEASE.2025-09-07T16-13-09Z"
               "@sha256:14cea493d9a34af32f524e538b8346cf79f3321eff8e708c1e2960462bd8936e")
MC_IMAGE = ("quay.io/minio/mc:RELEASE.2025-08-13T08-35-41Z"
            "@sha256:a7fe349ef4bd8521fb8497f55c6042871b2ae640607cf99d9bede5e9bdf11727")
MINIO_PORT = 9000
CONSOLE_PORT = 9001

# What the pipeline's launchers do: create and follow the stage resources (a finished training job is deleted before
# its run starts again), read their pods' state and logs. The TrainerClient also reads the TrainJob's runtime:
# a namespaced TrainingRuntime here, or a ClusterTrainingRuntime, which a Trainer install lets every authenticated
# user read (as it lets them read its version, the kubeflow-trainer-public ConfigMap).
PIPELINE_RULES = [
    {"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs", "experiments"],
     "verbs": ["create", "get", "list", "watch", "delete"]},
    {"apiGroups": ["kubeflow.org"], "resources": ["trials"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"],
     "verbs": ["create", "get", "list", "watch", "delete"]},
    {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainingruntimes"], "verbs": ["get", "list"]},
    {"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"],
     "verbs": ["create", "get", "list", "watch", "update", "patch", "delete"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "watch", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
]


def s3_secret_annotations(cluster: ClusterConfig) -> dict[str, str]:
    """How KServe's storage initializer reaches MinIO: host:port without a scheme, plain HTTP."""
    return {"serving.kserve.io/s3-endpoint": cluster.s3_endpoint,
            "serving.kserve.io/s3-usehttps": "0",
            "serving.kserve.io/s3-region": cluster.region}


def _meta(name: str, cluster: ClusterConfig, component: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": cluster.namespace, "labels": labels(component), **extra}


def _ingress_policy(name: str, cluster: ClusterConfig, component: str, pods: dict[str, str],
                    ingress: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _meta(name, cluster, component),
            "spec": {"podSelector": {"matchLabels": pods}, "policyTypes": ["Ingress"], "ingress": ingress}}


def audit_policy(cluster: ClusterConfig) -> dict[str, Any]:
    """Audit pods (the nightly CronJob's and those of every `bincount audit --backend kubernetes` Job) serve
    nothing: no ingress. It lives in the platform, so a launched Job is covered without the audit stage."""
    return _ingress_policy("bincount-audit", cluster, "audit", labels("audit"), [])


def monitor_policy(cluster: ClusterConfig) -> dict[str, Any]:
    """The nightly drift report's pods serve nothing either."""
    return _ingress_policy("bincount-monitor", cluster, "monitor", labels("monitor"), [])


def namespace(cluster: ClusterConfig) -> dict[str, Any]:
    """Katib injects its metrics collector only into pods of labelled namespaces. Pod Security `baseline`
    is enforced (not `restricted`): Katib's and Knative's injected sidecars are outside our control."""
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": cluster.namespace,
                         "labels": {**labels("platform"),
                                    "katib.kubeflow.org/metrics-collector-injection": "enabled",
                                    "pod-security.kubernetes.io/enforce": "baseline",
                                    "pod-security.kubernetes.io/warn": "restricted"}}}


def store_config(cluster: ClusterConfig) -> dict[str, Any]:
    """The store's endpoint settings for pods that take their environment by reference: the pipeline's steps
    (kfp.local must not inherit cluster addresses, so the compiled pipeline cannot carry them as values)."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(cluster.store_config, cluster, "platform"),
            "data": store_settings(cluster)}


def access(cluster: ClusterConfig) -> list[dict[str, Any]]:
    """Service accounts: the pipeline's (may launch stages), the workloads' and KServe's (no API access)."""
    role = cluster.pipeline_service_account
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(role, cluster, "pipeline")},
        {"apiVersion": "v1", "kind": "ServiceAccount", "automountServiceAccountToken": False,
         "metadata": _meta(cluster.workload_service_account, cluster, "training")},
        {"apiVersion": "v1", "kind": "ServiceAccount", "automountServiceAccountToken": False,
         "metadata": _meta(cluster.serving_service_account, cluster, "serving"),
         "secrets": [{"name": cluster.s3_secret}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": _meta(role, cluster, "pipeline"), "rules": PIPELINE_RULES},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": _meta(role, cluster, "pipeline"),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
         "subjects": [{"kind": "ServiceAccount", "name": role, "namespace": cluster.namespace}]},
    ]


def minio(cluster: ClusterConfig, storage: str) -> list[dict[str, Any]]:
    """One MinIO server on a PVC; its root credentials are the S3 Secret's keys. Only its two ports are
    reachable, from any namespace: KFP steps, trials and KServe's storage initializer all use the store."""
    scratch, scratch_mount = as_dict(scratch_volume())
    secret, secret_mount = as_dict(credentials_volume(cluster))
    selector = labels("storage")
    health = {"port": MINIO_PORT, "scheme": "HTTP"}
    container = {
        "name": "minio",
        "image": MINIO_IMAGE,
        "imagePullPolicy": "Always",
        "args": ["server", "/data", "--address", f":{MINIO_PORT}", "--console-address", f":{CONSOLE_PORT}",
                 "--certs-dir", "/tmp/certs"],
        "env": [{"name": "MINIO_ROOT_USER_FILE", "value": f"{CREDENTIALS_DIR}/AWS_ACCESS_KEY_ID"},
                {"name": "MINIO_ROOT_PASSWORD_FILE", "value": f"{CREDENTIALS_DIR}/AWS_SECRET_ACCESS_KEY"},
                {"name": "HOME", "value": "/tmp"}],
        "ports": [{"name": "s3", "containerPort": MINIO_PORT, "protocol": "TCP"},
                  {"name": "console", "containerPort": CONSOLE_PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "2Gi"}},
        "livenessProbe": {"httpGet": {"path": "/minio/health/live", **health},
                          "initialDelaySeconds": 10, "periodSeconds": 10},
        "readinessProbe": {"httpGet": {"path": "/minio/health/ready", **health}, "periodSeconds": 5},
        "securityContext": as_dict(container_security()),
        "volumeMounts": [{"name": "data", "mountPath": "/data"}, secret_mount, scratch_mount],
    }
    ports = [{"protocol": "TCP", "port": port} for port in (MINIO_PORT, CONSOLE_PORT)]
    return [
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta("minio-data", cluster, "storage"),
         "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": storage}}}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta("minio", cluster, "storage"),
         "spec": {"replicas": 1, "strategy": {"type": "Recreate"},
                  "selector": {"matchLabels": selector},
                  "template": {"metadata": {"labels": selector},
                               "spec": {"automountServiceAccountToken": False,
                                        "securityContext": as_dict(pod_security()),
                                        "containers": [container],
                                        "volumes": [{"name": "data",
                                                     "persistentVolumeClaim": {"claimName": "minio-data"}},
                                                    secret, scratch]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta("minio", cluster, "storage"),
         "spec": {"selector": selector,
                  "ports": [{"name": "s3", "port": MINIO_PORT, "targetPort": "s3", "protocol": "TCP"},
                            {"name": "console", "port": CONSOLE_PORT, "targetPort": "console",
                             "protocol": "TCP"}]}},
        _ingress_policy("minio", cluster, "storage", selector, [{"from": [{"namespaceSelector": {}}], "ports": ports}]),
    ]


def bucket_job(cluster: ClusterConfig) -> list[dict[str, Any]]:
    """Creates the store's bucket once MinIO answers; idempotent, so re-applying the overlay is harmless. Its
    pod accepts no connections."""
    scratch, scratch_mount = as_dict(scratch_volume())
    secret, secret_mount = as_dict(credentials_volume(cluster))
    pods = labels("storage-bootstrap")
    script = (f'until mc alias set store "http://{cluster.s3_endpoint}" "$(cat {CREDENTIALS_DIR}/AWS_ACCESS_KEY_ID)" '
              f'"$(cat {CREDENTIALS_DIR}/AWS_SECRET_ACCESS_KEY)"; do sleep 5; done\n'
              f"mc mb --ignore-existing store/{cluster.bucket}\n")
    container = {
        "name": "mc",
        "image": MC_IMAGE,
        "imagePullPolicy": "Always",
        "command": ["/bin/sh", "-ec", script],
        "env": [{"name": "MC_CONFIG_DIR", "value": "/tmp/mc"}],
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"cpu": "200m", "memory": "128Mi"}},
        "securityContext": as_dict(container_security()),
        "volumeMounts": [secret_mount, scratch_mount],
    }
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta("minio-bucket", cluster, "storage-bootstrap"),
           "spec": {"backoffLimit": 6, "activeDeadlineSeconds": 900, "ttlSecondsAfterFinished": 600,
                    "template": {"metadata": {"labels": pods},
                                 "spec": {"restartPolicy": "OnFailure",
                                          "automountServiceAccountToken": False,
                                          "securityContext": as_dict(pod_security()),
                                          "containers": [container],
                                          "volumes": [secret, scratch]}}}}
    return [job, _ingress_policy("minio-bucket", cluster, "storage-bootstrap", pods, [])]
