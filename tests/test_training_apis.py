"""The two training APIs (bincount.k8s.training): a PyTorchJob and a Trainer v2 TrainJob built from one trainer
container, strictly valid against the real CRDs in ../shared/crds (Training Operator v1.9, Trainer v2.3, Katib
v0.19's OpenAPI), naming the runtime a Trainer install ships, and handing torchrun the rendezvous the way
Trainer's torch plugin sets it (its `PET_*` variables)."""

from __future__ import annotations

import pytest
import yaml
from k8s_validation import CRDS, Validator
from torch.distributed.run import get_args_parser

from bincount.config import ClusterConfig, JobResources
from bincount.k8s.experiment import ExperimentSpec, SearchParameter, experiment
from bincount.k8s.resources import as_dict
from bincount.k8s.training import PYTORCHJOB, TRAINJOB, TRAINING_APIS, pytorchjob, trainjob, training_job
from bincount.train import entry

pytestmark = pytest.mark.skipif(not CRDS.is_dir(), reason=f"the shared CRDs are not at {CRDS}")

ARGS = ["--store", "s3://bincount", "--dataset", "abid", "--run-id", "r-1", "--recipe", "abid"]
SIZES = {
    "cpu": JobResources(),
    "cpu-2x3": JobResources(workers=2, procs_per_worker=3, cpu_request="3", cpu_limit="6", memory_limit="12Gi"),
    "gpu-4x4": JobResources(workers=4, procs_per_worker=4, gpus_per_worker=4, cpu_request="16", cpu_limit="32",
                            memory_request="96Gi", memory_limit="128Gi", shm_size="16Gi"),
}
# What Trainer's torch plugin sets for torchrun, and so refuses in a TrainJob's env.
TORCH_PLUGIN_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")


@pytest.fixture(scope="module")
def validator() -> Validator:
    return Validator()


@pytest.fixture(scope="module")
def runtime() -> dict:
    return yaml.safe_load((CRDS / "runtimes" / "torch-distributed.yaml").read_text())


def trainer_of_pytorchjob(job: dict) -> tuple[dict, dict, int]:
    """(container, pod spec, nodes) that a PyTorchJob runs on each of its pods."""
    replicas = job["spec"]["pytorchReplicaSpecs"]
    pods = [r["template"]["spec"] for r in replicas.values()]
    assert all(pod == pods[0] for pod in pods)
    return pods[0]["containers"][0], pods[0], sum(r["replicas"] for r in replicas.values())


def trainer_of_trainjob(job: dict) -> tuple[dict, dict, int]:
    """(container, pod spec, nodes) that a TrainJob's node runs: the trainer's fields plus the runtime patch."""
    spec = job["spec"]
    [patch] = spec["runtimePatches"]
    [node] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    trainer = spec["trainer"]
    return ({**container, **{k: trainer[k] for k in ("image", "command", "args", "env")},
             "resources": trainer["resourcesPerNode"]}, pod, trainer["numNodes"])


@pytest.mark.parametrize("size", SIZES)
def test_both_apis_run_one_trainer_container_with_the_same_settings(size):
    resources = SIZES[size]
    py, py_pod, py_nodes = trainer_of_pytorchjob(as_dict(pytorchjob("r-1", ARGS, resources)))
    tj, tj_pod, tj_nodes = trainer_of_trainjob(as_dict(trainjob("r-1", ARGS, resources)))

    assert (py["name"], tj["name"]) == (PYTORCHJOB.container, TRAINJOB.container) == ("pytorch", "node")
    for key in ("image", "command", "args", "env", "resources", "volumeMounts", "securityContext"):
        assert py[key] == tj[key], key
    for key in ("volumes", "securityContext", "serviceAccountName"):
        assert py_pod[key] == tj_pod[key], key
    assert py["command"] == ["torchrun", "-m", "bincount.train"] and py["args"] == ARGS
    assert py_nodes == tj_nodes == resources.workers
    job = as_dict(trainjob("r-1", ARGS, resources))["spec"]["trainer"]
    assert job["numProcPerNode"] == resources.procs_per_worker
    assert as_dict(pytorchjob("r-1", ARGS, resources))["spec"]["nprocPerNode"] == str(resources.procs_per_worker)
    env = {e["name"]: e.get("value") for e in py["env"]}
    assert env == {"S3_ENDPOINT": ClusterConfig().s3_endpoint, "S3_SECURE": "0", "AWS_REGION": "us-east-1",
                   "AWS_ACCESS_KEY_ID_FILE": "/etc/bincount/s3/AWS_ACCESS_KEY_ID",
                   "AWS_SECRET_ACCESS_KEY_FILE": "/etc/bincount/s3/AWS_SECRET_ACCESS_KEY",
                   "OMP_NUM_THREADS": str(resources.cpu_threads),
                   **({"NCCL_DEBUG": "WARN"} if resources.gpus_per_worker else {})}
    assert not set(env) & set(TORCH_PLUGIN_ENV), "Trainer's torch plugin refuses a TrainJob that sets its variables"


def validated(validator: Validator, objects: list[dict]) -> dict[str, int]:
    """Strict validation of every object; how many of each kind (a Katib trial counted as its kind too)."""
    counts: dict[str, int] = {}
    for obj in objects:
        assert validator.errors(obj) == []
        for kind in (obj["kind"], *([f"trial {obj['spec']['trialTemplate']['trialSpec']['kind']}"]
                                    if obj["kind"] == "Experiment" else [])):
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def test_every_training_job_and_trial_template_of_both_apis_is_strictly_valid(validator):
    spec = ExperimentSpec("t", "val_accuracy", (SearchParameter("lr", "double", "--lr", min="0.001", max="0.01"),
                                                SearchParameter("arch", "categorical", "--arch",
                                                                values=("resnet18", "efficientnet_lite0"))),
                          ("--store", "s3://bincount", "--dataset", "abid"), SIZES["gpu-4x4"],
                          early_stopping="medianstop", early_stopping_settings={"min_trials_required": "3"})
    objects = []
    for api in TRAINING_APIS:
        cluster = ClusterConfig(training_api=api)
        objects += [as_dict(training_job("r-1", ARGS, resources, cluster)) for resources in SIZES.values()]
        objects.append(as_dict(experiment(spec, cluster)))

    counts = validated(validator, objects)

    assert counts == {"PyTorchJob": 3, "TrainJob": 3, "Experiment": 2, "trial PyTorchJob": 1, "trial TrainJob": 1}


@pytest.mark.parametrize("kind, plant, typo", [
    ("TrainJob", lambda o: o["spec"]["trainer"].update(resourcesPerNodes={}), "resourcesPerNodes"),
    ("TrainJob", lambda o: o["spec"]["runtimeRef"].update(namespace="x"), "namespace"),
    ("Experiment", lambda o: o["spec"]["trialTemplate"]["trialSpec"]["spec"]["trainer"].update(numNode=2), "numNode"),
])
def test_a_typo_in_a_trainjob_or_its_trial_template_is_caught(validator, kind, plant, typo):
    cluster = ClusterConfig(training_api="trainjob")
    obj = as_dict(trainjob("r-1", ARGS, JobResources(), cluster)) if kind == "TrainJob" else as_dict(experiment(
        ExperimentSpec("t", "val_accuracy", (SearchParameter("lr", "double", "--lr", min="0.001", max="0.01"),),
                       (), JobResources()), cluster))
    plant(obj)
    errors = validator.errors(obj)
    assert errors and all(typo in e for e in errors), errors


def test_the_trainjob_names_the_runtime_a_trainer_install_ships_and_patches_only_what_it_has(validator, runtime):
    assert validator.errors(runtime) == []         # the runtime itself, strictly, against its CRD
    job = as_dict(trainjob("r-1", ARGS, JobResources(workers=2)))
    ref = job["spec"]["runtimeRef"]
    assert (ref["apiGroup"], ref["kind"], ref["name"]) == ("trainer.kubeflow.org", runtime["kind"],
                                                           runtime["metadata"]["name"])
    assert runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"
    assert "torch" in runtime["spec"]["mlPolicy"]
    shipped = {rjob["name"]: [c["name"] for c in rjob["template"]["spec"]["template"]["spec"]["containers"]]
               for rjob in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
    [patch] = job["spec"]["runtimePatches"]
    for rjob in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
        assert rjob["name"] in shipped
        for container in rjob["template"]["spec"]["template"]["spec"]["containers"]:
            assert container["name"] in shipped[rjob["name"]]
            assert "env" not in container, "the node container's env belongs in spec.trainer.env"


def test_katibs_own_trainjob_example_validates_and_our_trials_run_where_it_does(validator):
    """Katib's example of TrainJob trials (../shared/crds/examples): the validator takes it, and our template
    names the same primary container; our rank-0 labels narrow Katib's default (every node) to the one pod that
    prints metric lines."""
    example = yaml.safe_load((CRDS / "examples" / "katib-trainjob-pytorch.yaml").read_text())
    assert validator.errors(example) == []
    ours = as_dict(experiment(ExperimentSpec(
        "t", "val_accuracy", (SearchParameter("lr", "double", "--lr", min="0.001", max="0.01"),), (),
        JobResources(workers=2)), ClusterConfig(training_api="trainjob")))["spec"]["trialTemplate"]
    theirs = example["spec"]["trialTemplate"]
    assert ours["primaryContainerName"] == theirs["primaryContainerName"] == "node"
    assert ours["trialSpec"]["spec"]["runtimeRef"]["name"] == theirs["trialSpec"]["spec"]["runtimeRef"]["name"]
    assert ours["successCondition"] == 'status.conditions.#(type=="Complete")#|#(status=="True")#'
    assert ours["primaryPodLabels"] == {"jobset.sigs.k8s.io/replicatedjob-name": "node",
                                        "batch.kubernetes.io/job-completion-index": "0"}


def test_torchrun_takes_its_rendezvous_from_the_torch_plugins_variables(monkeypatch):
    """What Trainer's torch plugin sets on node 1 of 2 (and the Training Operator on a PyTorchJob's worker) is all
    torchrun needs: the TrainJob's command reads as `torchrun` with 2 nodes of 3 processes, node rank 1, the
    rendezvous at node 0, and the trainer's own arguments, which the trainer's parser takes."""
    job = as_dict(trainjob("r-1", ARGS, JobResources(workers=2, procs_per_worker=3, cpu_limit="6",
                                                    memory_limit="12Gi")))["spec"]["trainer"]
    plugin = {"PET_NNODES": str(job["numNodes"]), "PET_NPROC_PER_NODE": str(job["numProcPerNode"]),
              "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "r-1-node-0-0.r-1", "PET_MASTER_PORT": "29400"}
    for name, value in plugin.items():
        monkeypatch.setenv(name, value)

    assert job["command"][0] == "torchrun"
    torchrun = get_args_parser().parse_args(job["command"][1:] + job["args"])

    assert (torchrun.nnodes, torchrun.nproc_per_node, torchrun.node_rank) == ("2", "3", 1)
    assert (torchrun.master_addr, torchrun.master_port) == ("r-1-node-0-0.r-1", 29400)
    assert torchrun.module and torchrun.training_script == "bincount.train"
    assert torchrun.training_script_args == ARGS
    cfg = entry.config(entry.parser().parse_args(torchrun.training_script_args))
    assert (cfg.store, cfg.dataset, cfg.run, cfg.recipe) == ("s3://bincount", "abid", "r-1", "abid")
