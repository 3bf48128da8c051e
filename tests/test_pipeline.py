"""The Kubeflow pipeline: compiled specs in sync with the definitions, and the real kfp.local runner executing the
whole graph (`bincount pipeline run`) on tiny synthetic data, down to a request to the deployed predictor."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from bincount.processes import free_port
from serve_support import listening_addresses

from bincount import cli
from bincount.config import TRAINER_IMAGE, ClusterConfig
from bincount.k8s.conventions import S3_CREDENTIALS, store_settings
from bincount.kfp import stages
from bincount.kfp.compile import AUDIT_PIPELINE_FILE, COMPONENTS_DIR, MONITOR_PIPELINE_FILE, PIPELINE_FILE, compiled, drift
from bincount.kfp.components import COMPONENTS
from bincount.kfp.pipeline import bin_counting
from bincount.kfp.submit import cron_expression
from bincount.model.exported import ExportedModel
from bincount.rollout import registry
from bincount.store import open_store
from bincount.tune.space import load_space

REPO = Path(__file__).resolve().parents[1]
STEPS = ("download", "prepare", "shard", "tune", "train", "evaluate", "gate", "deploy", "skip-deploy", "monitor",
         "drift-alert", "audit-plan", "audit-count", "audit-report")
PIPELINE_FILES = (PIPELINE_FILE, AUDIT_PIPELINE_FILE, MONITOR_PIPELINE_FILE)


def test_committed_specs_equal_a_fresh_compile():
    assert drift(REPO) == []
    assert set(compiled()) == {*PIPELINE_FILES, *(COMPONENTS_DIR / s.replace("-", "_") / "component.yaml" for s in STEPS)}


def test_a_changed_definition_is_drift(tmp_path):
    for path, text in compiled().items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    assert drift(tmp_path) == []
    train = tmp_path / COMPONENTS_DIR / "train" / "component.yaml"
    train.write_text(train.read_text().replace("epochs", "epoch"))
    (tmp_path / PIPELINE_FILE).unlink()
    assert sorted(drift(tmp_path)) == [f"changed {COMPONENTS_DIR / 'train' / 'component.yaml'}",
                                       f"missing {PIPELINE_FILE}"]


def test_check_outside_a_checkout_says_the_files_are_missing_and_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["pipeline", "compile", "--check"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bincount: error: ") and err.count("\n") == 1, err
    assert f"missing under {tmp_path}" in err and str(PIPELINE_FILE) in err and "differ" not in err, err


def _specs() -> dict[str, dict]:
    return {str(p): list(yaml.safe_load_all((REPO / p).read_text())) for p in compiled()}


def test_every_step_runs_the_configured_trainer_image_without_installing_kfp():
    executors = {}
    for path, docs in _specs().items():
        for name, executor in docs[0]["deploymentSpec"]["executors"].items():
            executors[f"{path}:{name}"] = executor["container"]
    assert len(executors) == 2 * len(STEPS)      # each step in the pipeline and in its own component.yaml
    for where, container in executors.items():
        assert container["image"] == TRAINER_IMAGE, where
        assert not any("pip install" in part for part in container["command"]), where
        assert "from bincount.kfp import stages" in container["command"][-1], where


def test_steps_get_the_store_settings_from_the_platform_manifests():
    """Settings by reference on a cluster, so kfp.local never inherits a cluster address."""
    pipelines = [list(yaml.safe_load_all((REPO / path).read_text())) for path in PIPELINE_FILES]
    executors = {f"{p[0]['pipelineInfo']['name']}:{name}": spec for p in pipelines
                 for name, spec in p[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items()}
    assert len(executors) == len(STEPS)
    cluster = ClusterConfig()
    for name, spec in executors.items():
        (config_map,), (secret,) = spec["configMapAsEnv"], spec["secretAsEnv"]
        assert config_map["configMapName"] == cluster.store_config and not config_map["optional"], name
        assert config_map["keyToEnv"] == [{"configMapKey": k, "envVar": k} for k in store_settings(cluster)], name
        assert secret["secretName"] == cluster.s3_secret and not secret["optional"], name
        assert secret["keyToEnv"] == [{"secretKey": k, "envVar": k} for k in S3_CREDENTIALS], name
    for container in (e["container"] for p in pipelines for e in p[0]["deploymentSpec"]["executors"].values()):
        assert "env" not in container
    config_map = yaml.safe_load((REPO / "manifests" / "base" / "store.yaml").read_text())
    assert config_map["metadata"]["name"] == cluster.store_config and config_map["data"] == store_settings(cluster)
    assert "store.yaml" in yaml.safe_load((REPO / "manifests" / "base" / "kustomization.yaml").read_text())[
        "resources"]


def test_the_training_api_reaches_the_tune_and_train_steps():
    """One pipeline parameter picks PyTorchJobs or TrainJobs for the training job and the Katib trials alike."""
    spec = next(yaml.safe_load_all((REPO / PIPELINE_FILE).read_text()))
    assert spec["root"]["inputDefinitions"]["parameters"]["training_api"]["defaultValue"] == "pytorchjob"
    for step in ("tune", "train"):
        assert spec["root"]["dag"]["tasks"][step]["inputs"]["parameters"]["training_api"] == {
            "componentInputParameter": "training_api"}


def test_deploy_is_conditional_on_the_gate():
    spec = next(yaml.safe_load_all((REPO / PIPELINE_FILE).read_text()))
    gate = spec["root"]["dag"]["tasks"]["gate"]
    assert set(gate["dependentTasks"]) == {"evaluate", "prepare", "train"}
    assert gate["inputs"]["parameters"]["accuracy"]["taskOutputParameter"] == {"outputParameterKey": "Output",
                                                                               "producerTask": "evaluate"}
    assert gate["inputs"]["parameters"]["deploy_threshold"] == {"componentInputParameter": "deploy_threshold"}
    assert spec["root"]["dag"]["tasks"]["condition-branches-1"]["dependentTasks"] == ["gate", "train"]
    tasks = spec["components"]
    conditions = {name: " ".join(task["triggerPolicy"]["condition"].split())
                  for name, task in tasks["comp-condition-branches-1"]["dag"]["tasks"].items()}
    assert conditions == {
        "condition-2": "inputs.parameter_values['pipelinechannel--gate-passed'] == true",
        "condition-3": "!(inputs.parameter_values['pipelinechannel--gate-passed'] == true)"}
    for name, step in (("condition-2", "deploy"), ("condition-3", "skip-deploy")):
        inputs = tasks[f"comp-{name}"]["dag"]["tasks"][step]["inputs"]["parameters"]
        assert inputs["decision"] == {"componentInputParameter": "pipelinechannel--gate-decision"}


def test_the_monitor_pipeline_fails_its_run_only_on_drift():
    spec = next(yaml.safe_load_all((REPO / MONITOR_PIPELINE_FILE).read_text()))
    (condition,) = spec["components"]["comp-condition-1"]["dag"]["tasks"].values()
    assert condition["taskInfo"]["name"] == "drift-alert"
    trigger = spec["root"]["dag"]["tasks"]["condition-1"]["triggerPolicy"]["condition"]
    assert " ".join(trigger.split()) == "inputs.parameter_values['pipelinechannel--monitor-drifted'] == true"


def test_component_files_load_as_kfp_users_load_them():
    from kfp import components

    for name in STEPS:
        loaded = components.load_component_from_file(str(REPO / COMPONENTS_DIR / name.replace("-", "_") /
                                                          "component.yaml"))
        assert loaded.name == name
        assert loaded.component_spec.inputs.keys() == COMPONENTS[name].component_spec.inputs.keys()
    pipeline = components.load_component_from_file(str(REPO / PIPELINE_FILE))
    assert pipeline.name == "bin-counting"
    assert pipeline.component_spec.inputs.keys() == bin_counting.component_spec.inputs.keys()


def test_the_package_adds_no_top_level_components_or_pipelines_module():
    """The compiled specs live beside the package; an installed wheel carries only `bincount`."""
    from setuptools import find_packages

    assert {p.split(".")[0] for p in find_packages(str(REPO / "src"))} == {"bincount"}
    assert "bincount.kfp" in find_packages(str(REPO / "src"))


def test_run_names_are_dns_labels():
    assert stages.run_id("", "0F3A9C21-77aa-4b3e") == "bc-0f3a9c21"
    assert stages.run_id("nightly-7", "ignored") == "nightly-7"
    for bad in ("Nightly", "7-nightly", "a" * 31, "under_score"):
        with pytest.raises(stages.ConfigError, match="DNS label"):
            stages.run_id(bad, "x")


@pytest.mark.filterwarnings("ignore:.*non-Python base image")
def test_skip_deploy_and_drift_alert_run_under_kfp_local_and_say_why(tmp_path):
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path))
    task = COMPONENTS["skip-deploy"](decision="refused by the mae rule: …")
    assert json.loads(task.output) == {"deployed": False, "reason": "refused by the mae rule: …"}
    with pytest.raises(RuntimeError, match="drift-alert"):
        COMPONENTS["drift-alert"](decision="endpoint bincount drifted: brightness PSI 1.2 > 0.25")


def _pipeline(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, BINCOUNT_CACHE=str(tmp / "cache"))
    return subprocess.run([sys.executable, "-m", "bincount.cli", "pipeline", "run", "--store", str(tmp / "store"),
                           "--pipeline-root", str(tmp / "kfp"), *args], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=600)


def _only_run_dir(root: Path) -> Path:
    (run,) = root.iterdir()
    return run


@pytest.mark.slow
def test_pipeline_run_end_to_end_deploys_a_model_that_answers(tmp_path):
    done = _pipeline(tmp_path, "--images", "60", "--image-size", "64", "--trials", "2", "--trial-epochs", "1",
                     "--epochs", "1", "--deploy-threshold", "0", "--run-name", "e2e")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout[done.stdout.index("pipeline finished in"):]
    deployment = None
    try:
        run = _only_run_dir(tmp_path / "kfp")

        # the console: one line per step and the steps' own output; kfp's whole log in the run's folder
        assert_terse(done, ["download", "prepare", "shard", "tune", "train", "evaluate", "gate", "deploy"],
                     "succeeded")
        assert re.search(r"^  tune \| bincount tune: trial e2e-hpo-000-\w+ started", done.stdout, re.M), done.stdout
        assert re.search(r"^  train \| \S+Z epoch=1 train_loss=", done.stdout, re.M), done.stdout
        assert re.findall(r"^  download \| synthetic: +(\d+)%", done.stdout, re.M) == ["100"], done.stdout
        assert f"  log         {run / 'pipeline.log'}" in summary
        log = (run / "pipeline.log").read_text()
        assert all(f"Executing task \x1b[96m'{step}'" in log for step in ("download", "deploy"))
        assert log.count("Got executor_input") == 8 and "have no effect in the current local runner" in log
        store = tmp_path / "store"

        # data: 60 synthetic bins, balanced and split; the manifests in the artifact are the store's
        raw = json.loads((run / "download" / "raw").read_text())
        assert raw["source"] == "synthetic" and sum(raw["per_class"].values()) == 60
        assert len(list((store / "raw" / "bin-images").glob("*.jpg"))) == 60
        splits = run / "prepare" / "splits"
        rows = {s: [json.loads(line) for line in (splits / f"{s}.jsonl").read_text().splitlines()]
                for s in ("train", "val", "test")}
        for s, items in rows.items():
            assert (splits / f"{s}.jsonl").read_text() == (store / "datasets/quickstart" / f"{s}.jsonl").read_text()
            for item in items:
                meta = json.loads((store / "raw" / "metadata" / f"{item['key']}.json").read_text())
                assert item["label"] == meta["EXPECTED_QUANTITY"]
        assert not {i["key"] for i in rows["test"]} & {i["key"] for s in ("train", "val") for i in rows[s]}
        assert (f"train {len(rows['train'])}, val {len(rows['val'])}, test {len(rows['test'])}") in summary
        html = (run / "prepare" / "eda_html").read_text()
        assert "quickstart" in html and html.count('src="data:image/png;base64,') >= 5
        assert (run / "prepare" / "eda_markdown").read_text() == (
            store / "reports" / "quickstart" / "eda" / "report.md").read_text()

        # shards: skipped for a dataset this small, and the step says why
        assert "skipped: " in (run / "shard" / "shard_report").read_text()
        assert not (store / "datasets" / "quickstart" / "shards").exists()

        # tuning: two trials in the quick start's space, the best one's settings handed to training
        best = json.loads((run / "tune" / "best").read_text())
        assert best["experiment"] == "e2e-hpo" and best["objective"]["metric"] == "val_accuracy"
        lr, batch_size = load_space("quickstart.yaml").parameters
        assert lr.min <= best["parameters"]["lr"] <= lr.max and best["parameters"]["batch_size"] in batch_size.values
        assert best["train"]["recipe"] == "quickstart" and best["train"]["image_size"] == 64
        assert "e2e-hpo-" in (run / "tune" / "tuning_report").read_text()
        trials = (store / "tuning" / "e2e-hpo" / "trials.csv").read_text().splitlines()
        assert len(trials) == 3 and [t.split(",")[1] for t in trials[1:]] == ["succeeded", "succeeded"]

        # training: the exported model, copied into the Model artifact, trained with the best lr
        model_dir = run / "train" / "model"
        meta = ExportedModel.load(str(model_dir)).meta
        assert meta["arch"] == "resnet18" and meta["preprocessing"]["size"] == 64 and meta["epochs"] == 1
        assert meta["config"]["lr"] == best["parameters"]["lr"]
        assert (model_dir / "model.pt").read_bytes() == (store / "models" / "e2e" / "model.pt").read_bytes()
        validation = executor_output(run, "train")["artifacts"]["metrics"]["artifacts"][0]["metadata"]
        assert validation == pytest.approx(meta["metrics"]) and "val_accuracy" in validation

        # evaluation: the Metrics and ClassificationMetrics artifacts say what metrics.json says
        evaluation = json.loads((store / "reports" / "e2e" / "evaluation" / "metrics.json").read_text())
        assert evaluation["samples"] == len(rows["test"])
        executor = executor_output(run, "evaluate")
        logged = executor["artifacts"]["test_metrics"]["artifacts"][0]["metadata"]
        assert logged["accuracy"] == pytest.approx(evaluation["accuracy"])
        assert logged["mae"] == pytest.approx(evaluation["mae"])
        matrix = executor["artifacts"]["confusion_matrix"]["artifacts"][0]["metadata"]["confusionMatrix"]
        assert [a["displayName"] for a in matrix["annotationSpecs"]] == ["1", "2", "3", "4", "5"]
        assert [r["row"] for r in matrix["rows"]] == evaluation["confusion_matrix"]
        assert f"accuracy {evaluation['accuracy']:.4f}" in summary
        assert f"| 1 | {evaluation['per_class']['1']['precision']:.3f} |" in (run / "evaluate" /
                                                                            "evaluation_report").read_text()

        # deployment: a live local predictor that counts a test photo
        deployment = json.loads(executor_output(run, "deploy")["parameterValues"]["Output"])
        assert deployment["deployed"] and deployment["model"] == str(store / "models" / "e2e")
        assert deployment["predict_url"] in summary and deployment["stop"] in summary
        assert listening_addresses(urllib.parse.urlsplit(deployment["url"]).port) == {"127.0.0.1"}
        photo = (store / "raw" / "bin-images" / f"{rows['test'][0]['key']}.jpg").read_bytes()
        body = json.dumps({"instances": [{"image": {"b64": base64.b64encode(photo).decode()}}]}).encode()
        request = urllib.request.Request(deployment["predict_url"], body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            prediction = json.loads(response.read())["predictions"][0]
        assert prediction["count"] in (1, 2, 3, 4, 5)
        assert sum(prediction["probabilities"].values()) == pytest.approx(1, abs=1e-3)
    finally:
        if deployment:
            os.kill(int(deployment["stop"].split()[1]), signal.SIGTERM)


@pytest.mark.slow
def test_pipeline_runs_real_photos_from_an_abid_mirror_with_the_abid_recipe(tmp_path, abid_mirror):
    """The real-data quick path: real ABID photos from an S3 mirror, every image kept (class weights instead of
    undersampling), the abid recipe's pretrained Lite model searched, trained, calibrated and evaluated. Sizes
    are cut to seconds; the model parameters override the recipe where given."""
    done = _pipeline(tmp_path, "--source", "abid", "--source-endpoint", abid_mirror.endpoint, "--source-bucket",
                     abid_mirror.bucket, "--images", "50", "--balance", "none", "--recipe", "abid",
                     "--space", "quickstart.yaml", "--trials", "1", "--trial-epochs", "1", "--epochs", "1",
                     "--image-size", "64", "--deploy-threshold", "1.01", "--run-name", "real", "--dataset", "real",
                     "--shard-min-images", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    store = tmp_path / "store"
    run = _only_run_dir(tmp_path / "kfp")
    packed = {row["split"]: row for row in json.loads((run / "shard" / "shard_index").read_text())}
    assert [packed[s]["samples"] for s in ("train", "val", "test")] == [35, 10, 5]
    assert "| train | 1 | 35 |" in (run / "shard" / "shard_report").read_text()
    assert "data: shards, streamed from the store" in (run / "pipeline.log").read_text()
    meta = json.loads((store / "models" / "real" / "model.json").read_text())
    assert meta["arch"] == "efficientnet_lite0" and meta["config"]["recipe"] == "abid"
    assert meta["config"]["weights"] == "imagenet" and meta["config"]["loss"] == "ordinal"
    assert meta["config"]["class_weights"] == "balanced" and meta["epochs"] == 1
    assert meta["preprocessing"] == {"size": 64, "mean": [0.5] * 3, "std": [0.5] * 3, "resize": "stretch"}
    assert meta["inference"]["tta"] == "dihedral" and meta["inference"]["temperature"] > 0
    labels = {json.loads(line)["key"]: json.loads(line)["label"]
              for split in ("train", "val", "test")
              for line in (store / "datasets" / "real" / f"{split}.jsonl").read_text().splitlines()}
    assert len(labels) == 50 and all(abid_mirror.labels[k] == v for k, v in labels.items())
    evaluation = json.loads((store / "reports" / "real" / "evaluation" / "metrics.json").read_text())
    assert evaluation["inference"] == meta["inference"] and evaluation["samples"] == 5
    assert re.search(r"^  gate        refused by the min_accuracy rule: no champion serves endpoint bincount yet, so "
                     r"real is its first model; test accuracy \d\.\d{4} < the deploy threshold 1\.0100", done.stdout, re.M)
    assert "\n  not deployed\n" in done.stdout


@pytest.mark.slow
def test_a_worse_challenger_is_stopped_by_the_gate_and_the_champion_keeps_serving(tmp_path):
    """The champion: a head on a frozen ImageNet backbone, trained 20 epochs and deployed to the endpoint. The
    pipeline then trains the same recipe for one epoch on the same data; the gate compares the two on the same test
    photos, refuses the new model, and the champion's server is the one still answering."""
    env = dict(os.environ, BINCOUNT_CACHE=str(tmp_path / "cache"))
    store = str(tmp_path / "store")
    recipe = ["--recipe", "abid", "--freeze", "backbone", "--image-size", "96"]

    def bincount(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "bincount.cli", *args], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    bincount("data", "synthetic", "--n", "300", "--dest", store, "--seed", "0")
    bincount("data", "prepare", "--store", store, "--name", "quickstart", "--balance", "undersample")
    bincount("train", "--store", store, "--dataset", "quickstart", "--run", "champ", *recipe, "--epochs", "20")
    bincount("evaluate", "--store", store, "--model", "champ", "--dataset", "quickstart", "--split", "test", "--out",
             f"{store}/reports/champ/evaluation")
    bincount("deploy", "--store", store, "--model", "champ")
    pid_file = tmp_path / "cache" / "serving" / "bincount" / "serve.pid"
    champion_pid = int(pid_file.read_text())
    try:
        done = _pipeline(tmp_path, "--images", "300", *recipe, "--space", "quickstart.yaml", "--trials", "1",
                         "--trial-epochs", "1", "--epochs", "1", "--deploy-threshold", "0", "--run-name", "worse")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert_terse(done, ["download", "prepare", "shard", "tune", "train", "evaluate", "gate", "skip-deploy"],
                     "succeeded")
        assert not re.search(r"^deploy ", done.stdout, re.M)
        summary = done.stdout[done.stdout.index("pipeline finished in"):]
        assert re.search(r"^  gate        refused by the mae rule: challenger MAE − champion MAE is \+\d\.\d{4} ",
                         summary, re.M), summary
        assert "\n  not deployed; champion champ keeps serving\n" in summary

        run = _only_run_dir(tmp_path / "kfp")
        assert "REFUSED" in (run / "gate" / "gate_report").read_text()
        result = json.loads(open_store(store).get_text("reports/worse/compare-champ/summary.json"))
        assert not result["passed"] and result["differences"]["mae"]["delta"] > 0
        record = registry.load(open_store(store), "bincount")
        assert record.champion.run == "champ" and record.challenger is None
        assert [(e.action, e.run) for e in record.history] == [("deploy", "champ"), ("refused", "worse")]
        assert record.history[-1].reason == result["decision"]

        assert int(pid_file.read_text()) == champion_pid and os.kill(champion_pid, 0) is None
        photo = base64.b64encode((Path(store) / "raw" / "bin-images").glob("*.jpg").__next__().read_bytes())
        request = urllib.request.Request(f"{record.url}/v1/models/bincount:predict", json.dumps(
            {"instances": [{"image": {"b64": photo.decode()}}]}).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.headers["X-Model-Version"] == "champ"
            assert json.loads(response.read())["model_version"] == "champ"
    finally:
        os.kill(champion_pid, signal.SIGTERM)


def executor_output(run: Path, step: str) -> dict:
    return json.loads((run / step / "executor_output.json").read_text())


def assert_terse(done: subprocess.CompletedProcess, steps: list[str], status: str) -> None:
    """One line per step, the steps' own output under their names, none of kfp.local's JSON or warnings."""
    for step in steps:
        assert len(re.findall(rf"^{step} +{status} +\d+\.\d s", done.stdout, re.M)) == 1, (step, done.stdout)
    for noise in ("executor_input", "KFP Executor", "Executing task", "outputs:", "-" * 20):
        assert noise not in done.stdout, (noise, done.stdout)
    assert "Warning" not in done.stderr, done.stderr
    assert len(done.stdout.splitlines()) < 90, done.stdout


def test_a_failing_step_stops_the_pipeline_with_its_own_error(tmp_path):
    done = _pipeline(tmp_path, "--images", "0")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == ("bincount: error: pipeline step download failed: synthetic: "
                                                    "n must be at least 1, got 0")
    assert "Traceback" not in done.stderr + done.stdout
    assert_terse(done, ["download"], "failed")
    assert "prepare" not in done.stdout
    log = _only_run_dir(tmp_path / "kfp") / "pipeline.log"
    assert f"full log: {log}" in done.stdout
    assert "Got executor_input" in log.read_text() and "Executing task \x1b[96m'prepare'" not in log.read_text()
    assert not (tmp_path / "store" / "datasets").exists()


def test_verbose_shows_kfp_locals_whole_output(tmp_path):
    done = _pipeline(tmp_path, "--images", "0", "--verbose")
    assert done.returncode == 1
    assert "Executing task \x1b[96m'download'" in done.stdout and "Got executor_input" in done.stdout
    assert "Got executor_input" in (_only_run_dir(tmp_path / "kfp") / "pipeline.log").read_text()


def test_an_empty_dataset_stops_the_pipeline_at_prepare(tmp_path, s3_server):
    """An ABID mirror with nothing in it: the download copies no pair, and prepare says so."""
    bucket = s3_server.new_bucket("empty-mirror")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": "*", "Action": "s3:*",
                                                      "Resource": [f"arn:aws:s3:::{bucket}",
                                                                   f"arn:aws:s3:::{bucket}/*"]}]}
    s3_server.client().set_bucket_policy(bucket, json.dumps(policy))
    done = _pipeline(tmp_path, "--source", "abid", "--source-endpoint", s3_server.endpoint, "--source-bucket", bucket,
                     "--images", "20")
    assert done.returncode == 1, done.stdout[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last == (f"bincount: error: pipeline step prepare failed: no metadata under {tmp_path}/store/raw/metadata/; "
                    "run `bincount data synthetic` or `bincount data download` first")
    assert "Traceback" not in done.stderr + done.stdout


def test_submit_takes_the_audit_pipeline_with_its_own_parameters(tmp_path):
    port = free_port()
    submit = [sys.executable, "-m", "bincount.cli", "pipeline", "submit", "--host", f"http://127.0.0.1:{port}"]
    done = subprocess.run([*submit, "--pipeline", "bin_audit", "--ids", "00221,221", "--all-images", "false",
                           "--workers", "8"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"bincount: error: cannot reach the KFP server at http://127.0.0.1:{port}: ")
    foreign = subprocess.run([*submit, "--pipeline", "bin_audit", "--images", "10"], capture_output=True, text=True,
                             timeout=120)
    assert foreign.returncode == 2 and "unrecognized arguments: --images 10" in foreign.stderr
    wrong = subprocess.run([*submit, "--pipeline", "bin_audit", "--all-images", "maybe"], capture_output=True,
                           text=True, timeout=120)
    assert wrong.returncode == 2 and "argument --all-images: expected true or false, got 'maybe'" in wrong.stderr
    unknown = subprocess.run([*submit, "--pipeline", "bin_auditing"], capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "invalid choice: 'bin_auditing'" in unknown.stderr
    helped = subprocess.run([*submit, "--pipeline", "bin_audit", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert helped.returncode == 0 and "bin_audit parameters" in helped.stdout and "--shard-size" in helped.stdout
    assert "--images" not in helped.stdout
    assert "Traceback" not in done.stderr + foreign.stderr + wrong.stderr + unknown.stderr


def test_a_schedule_is_crontab_or_kfp_cron_and_nothing_else():
    assert cron_expression("0 2 * * *") == "0 0 2 * * *"
    assert cron_expression(" 30  0 2 ? * 1-5 ") == "30 0 2 ? * 1-5"
    assert cron_expression("*/15 * * * MON,FRI") == "0 */15 * * * MON,FRI"
    for bad in ("0 2 * *", "0 0 2 * * * 2027", "0 2 * * 1;reboot", ""):
        with pytest.raises(ValueError, match="expected a cron expression of 5 fields"):
            cron_expression(bad)
    done = subprocess.run([sys.executable, "-m", "bincount.cli", "pipeline", "submit", "--pipeline", "bin_audit",
                           "--host", "http://127.0.0.1:9", "--schedule", "every night"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(
        "argument --schedule: expected a cron expression of 5 fields (minute hour day month weekday) or 6 "
        "(seconds first), got 'every night'")


def test_bad_pipeline_flags_are_refused_before_anything_runs(tmp_path):
    done = _pipeline(tmp_path, "--images", "many")
    assert done.returncode == 2 and "argument --images: invalid int value: 'many'" in done.stderr
    assert not (tmp_path / "kfp").exists()


def test_submit_to_an_unreachable_server_is_one_clear_error(tmp_path):
    port = free_port()
    done = subprocess.run([sys.executable, "-m", "bincount.cli", "pipeline", "submit", "--host",
                           f"http://127.0.0.1:{port}", "--images", "10"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"bincount: error: cannot reach the KFP server at http://127.0.0.1:{port}: "
        f"HTTPConnection(host='127.0.0.1', port={port}): Failed to establish a new connection: "
        "[Errno 111] Connection refused"]
    missing = subprocess.run([sys.executable, "-m", "bincount.cli", "pipeline", "submit", "--host",
                              f"http://127.0.0.1:{port}", "--package", str(tmp_path / "nope.yaml")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"bincount: error: no compiled pipeline at {tmp_path / 'nope.yaml'}"
