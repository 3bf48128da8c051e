"""The training job, in either of the two APIs a cluster may run it with: a PyTorchJob (Kubeflow Training Operator
v1, the default) or a TrainJob (Kubeflow Trainer v2, the `torch-distributed` runtime). Both are built from one
trainer container, so they run the same image, command, resources, store settings and credentials.

The builders return the SDKs' typed models: `KubeflowOrgV1PyTorchJob` (kubeflow-training, on the kubernetes client's
models) and `TrainerV1alpha1TrainJob` (kubeflow-trainer-api). The launchers submit them as they are, `manifests/` is
rendered from them, and the Katib trial templates embed them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubeflow.training import models as training
from kubeflow_trainer_api import models as trainer
from kubernetes import client as k8s

from bincount.config import ClusterConfig, JobResources
from bincount.k8s.conventions import labels
from bincount.k8s.resources import (as_dict, container_security, credentials_volume, file_store_env, pod_security,
                                    scratch_volume)

TRAIN_COMMAND = ["torchrun", "-m", "bincount.train"]
SHARED_MEMORY = "dshm"
TTL_SECONDS = 7 * 24 * 3600                     # finished jobs (and their pods' logs) stay a week
NODE = "node"                                   # the trainer's replicated job and container in a Trainer v2 runtime
RUNTIME_KIND = "ClusterTrainingRuntime"
# Who owns the TrainJob's runtime patch (its list is keyed by manager; Kueue and the SDK write their own).
PATCH_MANAGER = "bincount"


@dataclass(frozen=True)
class TrainingAPI:
    """One way a cluster runs the trainer: the resource, the container the trainer runs in, and the pods' labels.
    `main_pod` picks rank 0's pod among a job's pods (`job_label`=name): its stdout has the metric lines, so it is
    the log the launchers stream and the pod Katib's metrics collector reads."""

    name: str
    group: str
    version: str
    plural: str
    kind: str
    operator: str
    container: str
    job_label: str
    main_pod: Mapping[str, str]
    succeeded: str                              # the condition type of a finished job; "Failed" is the other
    job: Callable[[str, Sequence[str], JobResources, ClusterConfig], Any]
    spec: Callable[[Sequence[str], JobResources, ClusterConfig], Any]

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    def trial_spec(self, train_args: Sequence[str], resources: JobResources, cluster: ClusterConfig) -> dict[str, Any]:
        """The job as a Katib trial template holds it: no metadata, since Katib names each trial's job."""
        return {"apiVersion": self.api_version, "kind": self.kind,
                "spec": as_dict(self.spec(train_args, resources, cluster))}


def trainer_container(name: str, train_args: Sequence[str], resources: JobResources,
                      cluster: ClusterConfig) -> k8s.V1Container:
    """`torchrun -m bincount.train ARGS`: the operator (PyTorchJob) or the torch plugin (TrainJob) hands torchrun
    the node count, rank and rendezvous as `PET_*` variables. The store's keys are mounted files."""
    _, scratch_mount = scratch_volume()
    _, secret_mount = credentials_volume(cluster)
    env = file_store_env(cluster) + [k8s.V1EnvVar(name="OMP_NUM_THREADS", value=str(resources.cpu_threads))]
    if resources.gpus_per_worker:
        env.append(k8s.V1EnvVar(name="NCCL_DEBUG", value="WARN"))
    return k8s.V1Container(
        name=name, image=resources.image, image_pull_policy="IfNotPresent", command=list(TRAIN_COMMAND),
        args=list(train_args), env=env,
        resources=k8s.V1ResourceRequirements(requests=resources.requests(), limits=resources.limits()),
        security_context=container_security(),
        volume_mounts=[k8s.V1VolumeMount(name=SHARED_MEMORY, mount_path="/dev/shm"), scratch_mount, secret_mount])


def trainer_volumes(resources: JobResources, cluster: ClusterConfig) -> list[k8s.V1Volume]:
    """A memory-backed /dev/shm for the DataLoader workers, /tmp, and the S3 Secret."""
    shm = k8s.V1Volume(name=SHARED_MEMORY,
                       empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=resources.shm_size))
    return [shm, scratch_volume()[0], credentials_volume(cluster)[0]]


def pytorchjob(name: str, train_args: Sequence[str], resources: JobResources,
               cluster: ClusterConfig | None = None) -> training.KubeflowOrgV1PyTorchJob:
    cluster = cluster or ClusterConfig()
    return training.KubeflowOrgV1PyTorchJob(
        api_version=PYTORCHJOB.api_version, kind=PYTORCHJOB.kind,
        metadata=k8s.V1ObjectMeta(name=name, namespace=cluster.namespace, labels=labels("training")),
        spec=pytorchjob_spec(train_args, resources, cluster))


def pytorchjob_spec(train_args: Sequence[str], resources: JobResources,
                    cluster: ClusterConfig) -> training.KubeflowOrgV1PyTorchJobSpec:
    """Master + (workers - 1) Workers; `nprocPerNode` is the processes per pod. cleanPodPolicy None keeps finished
    pods, so a failed master's log stays readable; the TTL tidies up."""
    def replicas(count: int) -> training.KubeflowOrgV1ReplicaSpec:
        pod = k8s.V1PodSpec(service_account_name=cluster.workload_service_account,
                            automount_service_account_token=False, security_context=pod_security(),
                            containers=[trainer_container(PYTORCHJOB.container, train_args, resources, cluster)],
                            volumes=trainer_volumes(resources, cluster))
        return training.KubeflowOrgV1ReplicaSpec(
            replicas=count, restart_policy="OnFailure",
            template=k8s.V1PodTemplateSpec(metadata=k8s.V1ObjectMeta(labels=labels("training")), spec=pod))

    specs = {"Master": replicas(1)}
    if resources.workers > 1:
        specs["Worker"] = replicas(resources.workers - 1)
    return training.KubeflowOrgV1PyTorchJobSpec(
        nproc_per_node=str(resources.procs_per_worker), pytorch_replica_specs=specs,
        run_policy=training.KubeflowOrgV1RunPolicy(clean_pod_policy="None", backoff_limit=resources.backoff_limit,
                                                   ttl_seconds_after_finished=TTL_SECONDS))


def trainjob(name: str, train_args: Sequence[str], resources: JobResources,
             cluster: ClusterConfig | None = None) -> trainer.TrainerV1alpha1TrainJob:
    cluster = cluster or ClusterConfig()
    return trainer.TrainerV1alpha1TrainJob(
        api_version=TRAINJOB.api_version, kind=TRAINJOB.kind,
        metadata=trainer.IoK8sApimachineryPkgApisMetaV1ObjectMeta(name=name, namespace=cluster.namespace,
                                                                   labels=labels("training")),
        spec=trainjob_spec(train_args, resources, cluster))


def trainjob_spec(train_args: Sequence[str], resources: JobResources,
                  cluster: ClusterConfig) -> trainer.TrainerV1alpha1TrainJobSpec:
    """`workers` nodes of the runtime's `node` job, `procs_per_worker` processes each (set, not the runtime's
    `auto`, which on a CPU node would start one process per CPU of the limit). What a TrainJob leaves to its
    runtime: the restart policy, backoff and TTL (the PyTorchJob's runPolicy), and imagePullPolicy, which the
    Kubernetes default for a tagged image makes IfNotPresent as well; the workload service account already
    mounts no API token. The pod's volumes, security context, service account and labels, and the container's
    mounts and security context, travel as a runtime patch: the patch fields Trainer v2.3 allows."""
    container = trainer_container(NODE, train_args, resources, cluster)
    pod = trainer.TrainerV1alpha1PodSpecPatch(
        service_account_name=cluster.workload_service_account,
        security_context=_trainer_model(trainer.IoK8sApiCoreV1PodSecurityContext, pod_security()),
        volumes=[_trainer_model(trainer.IoK8sApiCoreV1Volume, v) for v in trainer_volumes(resources, cluster)],
        containers=[trainer.TrainerV1alpha1ContainerPatch(
            name=NODE,
            volume_mounts=[_trainer_model(trainer.IoK8sApiCoreV1VolumeMount, m) for m in container.volume_mounts],
            security_context=_trainer_model(trainer.IoK8sApiCoreV1SecurityContext, container.security_context))])
    node = trainer.TrainerV1alpha1ReplicatedJobPatch(name=NODE, template=trainer.TrainerV1alpha1JobTemplatePatch(
        spec=trainer.TrainerV1alpha1JobSpecPatch(template=trainer.TrainerV1alpha1PodTemplatePatch(
            metadata=trainer.IoK8sApimachineryPkgApisMetaV1ObjectMeta(labels=labels("training")), spec=pod))))
    patch = trainer.TrainerV1alpha1RuntimePatch(
        manager=PATCH_MANAGER, training_runtime_spec=trainer.TrainerV1alpha1TrainingRuntimeSpecPatch(
            template=trainer.TrainerV1alpha1JobSetTemplatePatch(
                spec=trainer.TrainerV1alpha1JobSetSpecPatch(replicated_jobs=[node]))))
    return trainer.TrainerV1alpha1TrainJobSpec(
        runtime_ref=trainer.TrainerV1alpha1RuntimeRef(api_group=TRAINJOB.group, kind=RUNTIME_KIND,
                                                      name=cluster.training_runtime),
        trainer=trainer.TrainerV1alpha1Trainer(
            image=container.image, command=container.command, args=container.args,
            env=[_trainer_model(trainer.IoK8sApiCoreV1EnvVar, e) for e in container.env],
            num_nodes=resources.workers, num_proc_per_node=resources.procs_per_worker,
            resources_per_node=_trainer_model(trainer.IoK8sApiCoreV1ResourceRequirements, container.resources)),
        runtime_patches=[patch])


def _trainer_model(model: type, part: Any) -> Any:
    """A kubernetes client model as the same object of kubeflow-trainer-api (its own copy of the core types)."""
    return model.from_dict(as_dict(part))


PYTORCHJOB = TrainingAPI(
    name="pytorchjob", group="kubeflow.org", version="v1", plural="pytorchjobs", kind="PyTorchJob",
    operator="Kubeflow Training Operator", container="pytorch", job_label="training.kubeflow.org/job-name",
    main_pod={"training.kubeflow.org/job-role": "master"}, succeeded="Succeeded", job=pytorchjob,
    spec=pytorchjob_spec)
# JobSet names the node job's pods; rank 0 is completion index 0 (Kubernetes labels an indexed Job's pods with it).
TRAINJOB = TrainingAPI(
    name="trainjob", group="trainer.kubeflow.org", version="v1alpha1", plural="trainjobs", kind="TrainJob",
    operator="Kubeflow Trainer", container=NODE, job_label="jobset.sigs.k8s.io/jobset-name",
    main_pod={"jobset.sigs.k8s.io/replicatedjob-name": NODE, "batch.kubernetes.io/job-completion-index": "0"},
    succeeded="Complete", job=trainjob, spec=trainjob_spec)
TRAINING_APIS = {api.name: api for api in (PYTORCHJOB, TRAINJOB)}


def training_api(cluster: ClusterConfig) -> TrainingAPI:
    return TRAINING_APIS[cluster.training_api]


def training_job(name: str, train_args: Sequence[str], resources: JobResources, cluster: ClusterConfig) -> Any:
    """The training job in the cluster's training API."""
    return training_api(cluster).job(name, train_args, resources, cluster)
