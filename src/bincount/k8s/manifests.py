"""manifests/ rendered from the builders, so what `kubectl apply -k` applies and what the launchers create agree.

Layout: base/ (platform) and training/, tuning/, serving/, audit/, monitor/ hold the default objects; each overlay has a
kustomization for the platform plus one per stage whose patch is the merge patch from the default objects to the
overlay's (computed here, never written by hand), or, where the overlay's object is of another kind (trainer-v2's
TrainJob in place of the PyTorchJob), the object itself. `render` returns every file; `write` and `drift` are the
`bincount manifests render [--check]` command.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from bincount.config import ClusterConfig, JobResources, ServingResources
from bincount.errors import BincountError
from bincount.k8s import platform
from bincount.k8s.conventions import RUN_FLAG
from bincount.k8s.experiment import ExperimentSpec, experiment
from bincount.k8s.resources import as_dict, audit_cronjob, inference_service, monitor_cronjob
from bincount.k8s.training import TRAINING_APIS, training_job
from bincount.tune.space import SearchSpace, load_space, trainer_args

HEADER = ("# Rendered by `bincount manifests render` from src/bincount/k8s/. Edit the builders and re-render:\n"
          "# a test fails when this file and the builders disagree.\n")
HAND_WRITTEN = {"README.md"}
CREDENTIALS_FILE = "s3-credentials.env"
DATASET = "abid"
TRAIN_RUN = "bincount-train"
SERVE_NAME = "bincount"
STAGE_FILES = {"tuning": "experiment.yaml", "serving": "inferenceservice.yaml", "audit": "cronjob.yaml",
               "monitor": "cronjob.yaml", **{api: f"{api}.yaml" for api in TRAINING_APIS}}
AUDIT_NAME = "bincount-audit"
AUDIT_SCHEDULE = "0 2 * * *"                    # nightly, 02:00 in the cluster's time zone
MONITOR_NAME = "bincount-monitor"
MONITOR_SCHEDULE = "30 1 * * *"                 # nightly, 01:30, over the day before
MONITOR = JobResources(cpu_request="1", cpu_limit="2", memory_request="2Gi", memory_limit="3Gi", shm_size="512Mi")


@dataclass(frozen=True)
class Profile:
    """What one kustomize layer deploys: every stage's size and arguments, and MinIO's disk."""

    name: str
    train_args: tuple[str, ...]
    training: JobResources
    experiment: ExperimentSpec
    serving: ServingResources
    audit: JobResources                         # the nightly audit's pod; `workers` processes in it
    minio_storage: str
    dev_credentials: bool = False
    training_api: str = "pytorchjob"            # the training job's and the trials' API (ClusterConfig.training_api)


def profiles(cluster: ClusterConfig) -> dict[str, Profile]:
    """`default` fills training/, tuning/ and serving/; the overlays patch it. Tuning is the default search
    space (tuning.yaml), resized per profile."""
    store = ("--store", cluster.store, "--dataset", DATASET, RUN_FLAG, TRAIN_RUN)
    search = load_space()

    def tuning(space: SearchSpace) -> ExperimentSpec:
        return space.experiment_spec(space.name, cluster.store, DATASET)

    default = Profile(
        name="default",
        train_args=(*store, *trainer_args({"recipe": "abid", "epochs": 20, "precision": "bf16"})),
        training=JobResources(workers=2, procs_per_worker=1, gpus_per_worker=1, cpu_request="4", cpu_limit="8",
                              memory_request="16Gi", memory_limit="32Gi", shm_size="4Gi"),
        experiment=tuning(search),
        serving=ServingResources(),
        audit=JobResources(workers=4, cpu_request="4", cpu_limit="8", memory_request="8Gi", memory_limit="16Gi"),
        minio_storage="100Gi")
    cpu = JobResources(workers=1, procs_per_worker=2, gpus_per_worker=0, cpu_request="2", cpu_limit="2",
                       memory_request="3Gi", memory_limit="4Gi", shm_size="1Gi")
    # a kind cluster on a laptop: the smallest pretrained model at 224 px, a short run, the lr x batch search
    small = {"arch": "efficientnet_lite0", "image_size": 224, "epochs": 3, "precision": "fp32"}
    dev_cpu = Profile(
        name="dev-cpu",
        train_args=(*store, *trainer_args({"recipe": "abid", **small})),
        training=cpu,
        experiment=tuning(replace(
            search, parameters=tuple(p for p in search.parameters if p.name not in small),
            trial={**search.trial, **small}, max_trials=4, parallel_trials=1,
            resources=JobResources(procs_per_worker=1, cpu_request="1", cpu_limit="2", memory_request="2Gi",
                                   memory_limit="3Gi", shm_size="512Mi"))),
        serving=ServingResources(min_replicas=1, max_replicas=1, cpu_request="500m", cpu_limit="1",
                                 memory_request="1Gi", memory_limit="2Gi"),
        audit=JobResources(workers=1, cpu_request="1", cpu_limit="2", memory_request="2Gi", memory_limit="3Gi",
                           shm_size="512Mi"),
        minio_storage="10Gi", dev_credentials=True)
    gpu_training = JobResources(workers=4, procs_per_worker=4, gpus_per_worker=4, cpu_request="16", cpu_limit="32",
                                memory_request="96Gi", memory_limit="128Gi", shm_size="16Gi")
    # each rank streams shards: its CPUs less the training process's own and one spare decode and augment, with
    # four batches each in flight to cover MinIO's latency
    loader = {"workers": gpu_training.cpu_threads - 2, "prefetch_factor": 4}
    gpu = Profile(
        name="gpu",
        train_args=(*store, *trainer_args({"recipe": "abid", "epochs": 20, "precision": "bf16", **loader})),
        training=gpu_training,
        experiment=tuning(replace(search, parallel_trials=4, trial={**search.trial, **loader})),
        serving=ServingResources(min_replicas=1, max_replicas=5),
        audit=JobResources(workers=1, gpus_per_worker=1, cpu_request="8", cpu_limit="16", memory_request="16Gi",
                           memory_limit="32Gi"),
        minio_storage="500Gi")
    # a cluster with Kubeflow Trainer v2 in place of the Training Operator: the default sizes, TrainJobs for the
    # training and the Katib trials
    trainer_v2 = replace(default, name="trainer-v2", training_api="trainjob")
    return {p.name: p for p in (default, dev_cpu, gpu, trainer_v2)}


def stages(profile: Profile, cluster: ClusterConfig) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Each kustomize folder's objects by file name."""
    cluster = replace(cluster, training_api=profile.training_api)
    return {
        "base": {"namespace.yaml": [platform.namespace(cluster)],
                 "rbac.yaml": platform.access(cluster),
                 "store.yaml": [platform.store_config(cluster)],
                 "minio.yaml": platform.minio(cluster, profile.minio_storage),
                 "bucket-job.yaml": platform.bucket_job(cluster),
                 "audit-policy.yaml": [platform.audit_policy(cluster)],
                 "monitor-policy.yaml": [platform.monitor_policy(cluster)]},
        "training": {STAGE_FILES[profile.training_api]: [
            as_dict(training_job(TRAIN_RUN, profile.train_args, profile.training, cluster))]},
        "tuning": {STAGE_FILES["tuning"]: [as_dict(experiment(profile.experiment, cluster))]},
        "serving": {STAGE_FILES["serving"]: [inference_service(
            SERVE_NAME, f"{cluster.store}/models/{TRAIN_RUN}", profile.serving, cluster, version=TRAIN_RUN,
            log_store=cluster.store)]},
        "audit": {STAGE_FILES["audit"]: [audit_cronjob(AUDIT_NAME, AUDIT_SCHEDULE, audit_args(profile.audit, cluster),
                                                       profile.audit, cluster)]},
        "monitor": {STAGE_FILES["monitor"]: [monitor_cronjob(MONITOR_NAME, MONITOR_SCHEDULE, monitor_args(cluster),
                                                             MONITOR, cluster)]},
    }


def audit_args(resources: JobResources, cluster: ClusterConfig) -> list[str]:
    """Each night: every photo written in the last day, counted by the trained model, as audits/nightly-<date>/."""
    return ["audit", "--store", cluster.store, "--model", TRAIN_RUN, "--all", "--modified-after", "1d",
            "--name", "nightly-{date}", "--workers", str(resources.workers), "--device",
            "cuda" if resources.gpus_per_worker else "cpu"]


def monitor_args(cluster: ClusterConfig) -> list[str]:
    """Each night: the endpoint's last day of predictions against the training split of the dataset it learned."""
    return ["monitor", "--store", cluster.store, "--endpoint", SERVE_NAME, "--since", "1d", "--reference", DATASET]


def merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The RFC 7386 merge patch that turns `old` into `new`: changed keys, null for removed ones, lists whole."""
    patch: dict[str, Any] = {}
    for key in [*new, *(k for k in old if k not in new)]:
        if key not in new:
            patch[key] = None
        elif key not in old or type(old[key]) is not type(new[key]):
            patch[key] = new[key]
        elif isinstance(new[key], dict):
            sub = merge_patch(old[key], new[key])
            if sub:
                patch[key] = sub
        elif old[key] != new[key]:
            patch[key] = new[key]
    return patch


def _patches(defaults: list[dict[str, Any]], wanted: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for old, new in zip(defaults, wanted, strict=True):
        diff = merge_patch(old, new)
        if diff:
            head = {"apiVersion": new["apiVersion"], "kind": new["kind"],
                    "metadata": {"name": new["metadata"]["name"], "namespace": new["metadata"]["namespace"]}}
            out.append(_merge(head, diff))
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(merged.get(key), dict) and isinstance(
            value, dict) else value
    return merged


def _kustomization(resources: list[str], patches: Sequence[str] = (), **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                            "resources": resources}
    if patches:
        body["patches"] = [{"path": p} for p in patches]
    return {**body, **extra}


def _secret_generator(cluster: ClusterConfig, source: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": cluster.s3_secret, "namespace": cluster.namespace, **source,
             "options": {"disableNameSuffixHash": True, "labels": platform.labels("storage"),
                         "annotations": platform.s3_secret_annotations(cluster)}}]


DEV_SECRET_NOTE = ("# DEV ONLY: the MinIO/S3 credentials below are public and obviously fake, for a throwaway\n"
                   "# kind or minikube cluster. overlays/gpu reads real ones from an uncommitted s3-credentials.env.\n")
FILE_SECRET_NOTE = (f"# The MinIO/S3 credentials come from {CREDENTIALS_FILE} beside this file (git-ignored; copy\n"
                    f"# {CREDENTIALS_FILE}.example and choose a strong password). Nothing secret is committed.\n")
DEV_CREDENTIALS = ["AWS_ACCESS_KEY_ID=bincount-dev", "AWS_SECRET_ACCESS_KEY=dev-only-not-a-secret"]


def render(cluster: ClusterConfig | None = None) -> dict[str, str]:
    """Every generated file under manifests/, by relative path."""
    cluster = cluster or ClusterConfig()
    profs = profiles(cluster)
    default = stages(profs["default"], cluster)
    files: dict[str, str] = {}
    for folder, objects in default.items():
        for name, docs in objects.items():
            files[f"{folder}/{name}"] = _yaml(docs)
        files[f"{folder}/kustomization.yaml"] = _yaml([_kustomization(list(objects))])
    for name, profile in profs.items():
        if name != "default":
            files.update(_overlay(f"overlays/{name}", default, stages(profile, cluster), profile, cluster))
    return files


def _overlay(root: str, default: dict[str, dict[str, list[dict[str, Any]]]],
             wanted: dict[str, dict[str, list[dict[str, Any]]]], profile: Profile,
             cluster: ClusterConfig) -> dict[str, str]:
    """The platform kustomization at `root` (with the S3 Secret) and one per stage below it."""
    files: dict[str, str] = {}
    for folder, objects in default.items():
        here, up = (root, "../..") if folder == "base" else (f"{root}/{folder}", "../../..")
        if _kinds(objects) == _kinds(wanted[folder]):
            written = {f: p for f in objects if (p := _patches(objects[f], wanted[folder][f]))}
            resources, patches = [f"{up}/{folder}"], list(written)
        else:                                   # another kind (a TrainJob for a PyTorchJob) cannot be a patch
            written = wanted[folder]
            resources, patches = list(written), []
        for file, docs in written.items():
            files[f"{here}/{file}"] = _yaml(docs)
        extra: dict[str, Any] = {}
        note = ""
        if folder == "base":
            source = {"literals": DEV_CREDENTIALS} if profile.dev_credentials else {"envs": [CREDENTIALS_FILE]}
            extra["secretGenerator"] = _secret_generator(cluster, source)
            note = DEV_SECRET_NOTE if profile.dev_credentials else FILE_SECRET_NOTE
            if not profile.dev_credentials:
                files[f"{here}/{CREDENTIALS_FILE}.example"] = (
                    "AWS_ACCESS_KEY_ID=bincount\nAWS_SECRET_ACCESS_KEY=CHANGE-ME-to-a-long-random-password\n")
                files[f"{here}/.gitignore"] = f"{CREDENTIALS_FILE}\n"
        files[f"{here}/kustomization.yaml"] = _yaml(
            [_kustomization(resources, patches, **extra)], note)
    return files


def _kinds(objects: dict[str, list[dict[str, Any]]]) -> dict[str, list[tuple[str, str]]]:
    return {file: [(d["apiVersion"], d["kind"]) for d in docs] for file, docs in objects.items()}


class _Dumper(yaml.SafeDumper):
    """Block style, multi-line strings as literals, and no anchors: the files are for people to read."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def dump(docs: list[dict[str, Any]]) -> str:
    """Objects as readable multi-document YAML, in the builders' key order (also what `tune render` prints)."""
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120,
                         explicit_start=True)


def _yaml(docs: list[dict[str, Any]], note: str = "") -> str:
    return HEADER + note + dump(docs)


def write(out: Path, cluster: ClusterConfig | None = None) -> list[str]:
    """Writes every rendered file (each atomically) and returns the paths that changed."""
    changed = []
    for rel, text in render(cluster).items():
        path = out / rel
        if path.is_file() and path.read_text() == text:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        changed.append(rel)
    return changed


def drift(out: Path, cluster: ClusterConfig | None = None) -> list[str]:
    """What differs between `out` and a fresh render: missing, changed and unexpected files."""
    if not out.is_dir():
        raise BincountError(f"{out} is not a directory; render it with `bincount manifests render --out {out}`")
    wanted = render(cluster)
    problems = [f"missing {rel}" for rel in wanted if not (out / rel).is_file()]
    problems += [f"changed {rel}" for rel, text in wanted.items()
                 if (out / rel).is_file() and (out / rel).read_text() != text]
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        if rel not in wanted and path.name not in HAND_WRITTEN and path.name != CREDENTIALS_FILE:
            problems.append(f"unexpected {rel}")
    return problems
