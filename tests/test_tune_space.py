"""The search space: one tuning.yaml → a Katib Experiment that is valid against the real schemas and runs the
trainer as the local twin does, and optuna distributions equal to Katib's feasible spaces for every type."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import optuna
import pytest
import yaml
from k8s_validation import CRDS, Validator
from torch.distributed.run import get_args_parser

from bincount import cli
from bincount.config import ClusterConfig, JobResources, TuneJob, load_train_config
from bincount.errors import ConfigError
from bincount.k8s.conventions import RUN_FLAG
from bincount.k8s.resources import as_dict
from bincount.train import entry
from bincount.train.loop import METRIC_KEYS, metric_line
from bincount.tune import local
from bincount.tune.space import ALGORITHMS, Parameter, SearchSpace, load_space

REPO = Path(__file__).resolve().parents[1]
TRIAL_PARAMETER = re.compile(r"\$\{trialParameters\.(\w+)\}")
PARAMETERS = {
    "double": dict(name="weight_decay", type="double", min=0.0, max=0.3),
    "double-log": dict(name="lr", type="double", min=1e-5, max=0.1, log=True),
    "double-step": dict(name="label_smoothing", type="double", min=0.0, max=0.2, step=0.05),
    "int-step": dict(name="epochs", type="int", min=2, max=10, step=2),
    "int-log": dict(name="batch_size", type="int", min=8, max=256, log=True),
    "categorical": dict(name="arch", type="categorical", values=["resnet18", "resnet50", "resnext101_32x8d"]),
    "discrete": dict(name="warmup_epochs", type="discrete", values=[0, 0.5, 1]),
}


def full_space(**changes) -> SearchSpace:
    """Every parameter type at once, with every optional field set."""
    base = dict(
        name="full", objective={"metric": "val_loss", "goal": "minimize", "target": 0.5},
        additional_metrics=["val_accuracy", "val_mae"], algorithm="tpe",
        algorithm_settings={"random_state": 7, "n_startup_trials": 3}, max_trials=6, parallel_trials=3,
        max_failed_trials=2, parameters=[PARAMETERS[k] for k in ("double-log", "int-step", "categorical",
                                                                  "discrete")],
        early_stopping={"min_trials": 2, "start_step": 3},
        trial={"weights": "none", "freeze": "backbone", "image_size": 96, "augment": "flip",
               "feature_cache": True, "classes": [1, 2, 3]},
        resources={"workers": 2, "procs_per_worker": 2, "cpu_request": "2", "cpu_limit": "4"})
    from bincount.config import from_dict
    return from_dict(SearchSpace, {**base, **changes})


def katib_contains(parameter: dict, value) -> bool:
    """Katib's semantics of a feasibleSpace, written from its API: text bounds, an optional step from min."""
    space = parameter["feasibleSpace"]
    kind = parameter["parameterType"]
    if kind in ("categorical", "discrete"):
        return str(value) in space["list"] if kind == "categorical" else float(value) in map(float, space["list"])
    low, high = float(space["min"]), float(space["max"])
    if kind == "int" and value != int(value):
        return False
    if not low <= value <= high:
        return False
    if "step" in space:
        steps = (value - low) / float(space["step"])
        return math.isclose(steps, round(steps), abs_tol=1e-9)
    return True


# --- the rendered Experiment ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def validator() -> Validator:
    return Validator()


@pytest.mark.skipif(not CRDS.is_dir(), reason=f"the shared CRDs are not at {CRDS}")
@pytest.mark.parametrize("space", [load_space(), full_space()], ids=["default", "full"])
def test_rendered_experiment_is_valid_against_katib_and_pytorchjob_schemas_strictly(space, validator):
    body = as_dict(space.render("bincount-tune", "s3://bincount", "abid"))
    assert validator.errors(body) == []
    typo = json.loads(json.dumps(body))
    typo["spec"]["parameters"][0]["feasibleSpace"]["maximum"] = "1"
    typo["spec"]["trialTemplate"]["trialSpec"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
        "containers"][0]["agrs"] = []
    found = "\n".join(validator.errors(typo))
    assert "'maximum' was unexpected" in found and "'agrs' was unexpected" in found


def test_default_space_is_the_seeds_search_over_the_pretrained_lite_models_on_validation():
    space = load_space()
    assert (space.objective.metric, space.objective.goal) == ("val_balanced_accuracy", "maximize")
    assert space.max_trials == 8
    lr, batch, arch = space.parameters
    assert (lr.name, lr.log) == ("lr", True) and batch.name == "batch_size"
    assert arch.values == ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
    assert space.trial["recipe"] == "abid" and not space.shares_features
    trial = load_train_config(None, {"store": "s", "dataset": "d", "run": "r", **space.settings(
        {"lr": 0.001, "batch_size": 32, "arch": "efficientnet_lite2"})})
    assert (trial.arch, trial.weights, trial.freeze) == ("efficientnet_lite2", "imagenet", "none")


@pytest.mark.parametrize("space", [load_space(), full_space()], ids=["default", "full"])
def test_trial_command_reaches_the_trainer_as_the_local_trial_does(space, monkeypatch):
    """Katib's trial container, its trialParameters substituted, parsed by torchrun and then by the trainer's
    entry (what `-m bincount.train` runs), gives the trainer config of those values; the local twin runs the very
    same arguments."""
    body = as_dict(space.render("exp", "s3://bincount", "abid", ClusterConfig()))
    template = body["spec"]["trialTemplate"]
    defined = {p["name"]: p["reference"] for p in template["trialParameters"]}
    used = set(TRIAL_PARAMETER.findall(json.dumps(template["trialSpec"])))
    assert used == set(defined)
    assert {p["name"] for p in body["spec"]["parameters"]} == {r for r in defined.values() if "$" not in r}

    values = {p.name: p.grid()[-1] if p.type != "double" or p.step else p.max for p in space.parameters}
    substitute = {name: "exp-x7k2q9vb" if ref == "${trialSpec.Name}" else local_text(values[ref])
                  for name, ref in defined.items()}
    replicas = template["trialSpec"]["spec"]["pytorchReplicaSpecs"]
    for replica in replicas.values():
        container = replica["template"]["spec"]["containers"][0]
        argv = [TRIAL_PARAMETER.sub(lambda m: substitute[m[1]], a) for a in container["command"] + container["args"]]
        assert argv[0] == "torchrun"
        torchrun = get_args_parser().parse_args(argv[1:])
        assert torchrun.module and torchrun.training_script == "bincount.train"

        seen = []
        monkeypatch.setattr("bincount.train.loop.train", lambda cfg: seen.append(cfg) or _NotMain())
        assert entry.main(torchrun.training_script_args) == 0
        wanted = load_train_config(None, {"store": "s3://bincount", "dataset": "abid", "run": "exp-x7k2q9vb",
                                          **space.settings(values)})
        assert seen == [wanted]

        local_argv = local.trial_argv(space, TuneJob(store="s3://bincount", dataset="abid"), values, "exp-x7k2q9vb")
        prefix = space.resources.torchrun_argv()
        assert local_argv[:len(prefix)] == prefix
        assert local_argv[len(prefix):] == torchrun.training_script_args
        assert local_argv[len(prefix) - 1] == torchrun.training_script
        # in the pod, the operator passes the process count to torchrun as PET_NPROC_PER_NODE
        assert prefix[prefix.index("--nproc_per_node") + 1] == template["trialSpec"]["spec"]["nprocPerNode"]
    assert RUN_FLAG in container["args"]


def local_text(value) -> str:
    from bincount.tune.space import text
    return text(value)


class _NotMain:
    is_main = False


def test_objective_and_metrics_format_match_the_trainers_metric_line():
    space = full_space()
    body = as_dict(space.render("exp", "s3://b", "d"))
    objective = body["spec"]["objective"]
    assert objective["objectiveMetricName"] in METRIC_KEYS
    assert set(objective["additionalMetricNames"]) <= set(METRIC_KEYS)
    pattern = body["spec"]["metricsCollectorSpec"]["source"]["filter"]["metricsFormat"][0]
    record = {"epoch": 12, "train_loss": 1.2345e-07, "train_accuracy": 1.0, "val_loss": 12.5,
              "val_accuracy": 0.4125, "val_balanced_accuracy": 0.4, "val_mae": 0.0, "lr": 3.3e-05}
    line = metric_line(record)
    found = {m[0]: float(m[1]) for m in re.findall(pattern, line)}
    assert found == {k: float(v) for k, v in record.items()}, line
    assert local.METRIC.pattern == pattern


def test_tune_render_prints_the_committed_experiment_and_takes_a_space(tmp_path, capsys):
    assert cli.main(["tune", "render"]) == 0
    committed = (REPO / "manifests" / "tuning" / "experiment.yaml").read_text()
    assert capsys.readouterr().out == committed.split("\n", 2)[2]
    path = tmp_path / "tuning.yaml"
    path.write_text(yaml.safe_dump({"name": "mine", "parameters": [PARAMETERS["discrete"]],
                                    "trial": {"arch": "resnet18"}}))
    assert cli.main(["tune", "render", "--space", str(path), "--experiment", "other", "--store", "s3://x",
                     "--dataset", "d"]) == 0
    body = yaml.safe_load(capsys.readouterr().out)
    assert body["metadata"]["name"] == "other"
    assert body["spec"]["parameters"] == [{"name": "warmup_epochs", "parameterType": "discrete",
                                           "feasibleSpace": {"list": ["0.0", "0.5", "1.0"]}}]
    args = body["spec"]["trialTemplate"]["trialSpec"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"][
        "spec"]["containers"][0]["args"]
    assert args[:6] == ["--store", "s3://x", "--dataset", "d", "--arch", "resnet18"]

    assert cli.main(["tune", "render", "--space", str(path), "--experiment", "other", "--store", "s3://x",
                     "--dataset", "d", "--training-api", "trainjob"]) == 0
    template = yaml.safe_load(capsys.readouterr().out)["spec"]["trialTemplate"]
    assert (template["trialSpec"]["kind"], template["primaryContainerName"]) == ("TrainJob", "node")
    assert template["trialSpec"]["spec"]["trainer"]["args"] == args
    assert cli.main(["tune", "render", "--training-api", "trainjobs"]) == 1
    assert capsys.readouterr().err == ("bincount: error: training API 'trainjobs' is not one of pytorchjob, "
                                       "trainjob\n")


# --- parity: Katib feasible space ↔ optuna distribution --------------------------------------------------------

@pytest.mark.parametrize("case", PARAMETERS)
def test_katib_feasible_space_and_optuna_distribution_are_the_same_values(case):
    parameter = Parameter(**{k: tuple(v) if k == "values" else v for k, v in PARAMETERS[case].items()})
    katib = as_dict(parameter.katib().katib())
    dist = parameter.distribution()
    space = katib["feasibleSpace"]
    if parameter.type in ("double", "int"):
        assert (dist.low, dist.high) == (float(space["min"]), float(space["max"]))
        assert dist.log == (space.get("distribution") == "logUniform")
        assert (dist.step is None and "step" not in space) or dist.step == float(space.get("step", 1))
    else:
        assert [local_text(c) for c in dist.choices] == space["list"]
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(sampler=sampler)
    drawn = []
    for _ in range(200):
        trial = study.ask({parameter.name: dist})
        drawn.append(trial.params[parameter.name])
        study.tell(trial, 0.0)
    assert all(katib_contains(katib, v) for v in drawn), [v for v in drawn if not katib_contains(katib, v)]
    finite = parameter.type in ("categorical", "discrete") or parameter.step is not None
    if finite:
        # every Katib value is reachable, and only those (stepped doubles snapped: optuna adds float noise)
        assert {parameter.snap(v) for v in drawn} == set(parameter.grid())
        assert all(katib_contains(katib, v) for v in parameter.grid())
    if parameter.log:                                       # log-uniform: the geometric middle splits the draws
        middle = math.sqrt(dist.low * dist.high)
        assert 0.35 < sum(v < middle for v in drawn) / len(drawn) < 0.65


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_katib_algorithm_has_a_sampler_that_stays_in_the_space(algorithm):
    changes = {"algorithm": algorithm, "algorithm_settings": {"random_state": 1} if algorithm != "grid" else {},
               "parameters": [PARAMETERS[k] for k in ("double-step", "int-step", "categorical", "discrete")]}
    space = full_space(**changes)
    body = as_dict(space.render("exp", "s3://b", "d"))
    assert body["spec"]["algorithm"]["algorithmName"] == algorithm
    katib = {p["name"]: p for p in body["spec"]["parameters"]}
    study = optuna.create_study(sampler=local.sampler(space), direction="minimize")
    seen = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                     # cmaes: categorical dimensions fall back to random
        for i in range(5):
            trial = study.ask(space.distributions())
            assert all(katib_contains(katib[k], v) for k, v in trial.params.items()), trial.params
            seen.add(tuple(sorted(trial.params.items())))
            study.tell(trial, float(i))
    if algorithm == "grid":
        assert len(seen) == 5                               # grid points are not repeated


def test_median_stop_settings_become_the_pruners_startup_and_warmup():
    space = full_space(early_stopping={"min_trials": 2, "start_step": 3})
    body = as_dict(space.render("exp", "s3://b", "d"))
    assert body["spec"]["earlyStopping"] == {"algorithmName": "medianstop", "algorithmSettings": [
        {"name": "min_trials_required", "value": "2"}, {"name": "start_step", "value": "3"}]}
    study = optuna.create_study(direction="minimize", pruner=local.pruner(space))

    def bad_trial_pruned_at(steps: int) -> int | None:
        trial = study.ask()
        for step in range(1, steps + 1):
            trial.report(100.0, step)
            if trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                return step
        study.tell(trial, 100.0)
        return None

    good = study.ask()
    for step in range(1, 6):
        good.report(1.0, step)
    study.tell(good, 1.0)
    assert bad_trial_pruned_at(5) is None                   # one finished trial: fewer than min_trials
    good = study.ask()
    for step in range(1, 6):
        good.report(1.0, step)
    study.tell(good, 1.0)
    assert bad_trial_pruned_at(5) == 3                      # never before start_step
    assert isinstance(local.pruner(full_space(early_stopping=None)), optuna.pruners.NopPruner)


# --- bad input -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"parameters": [{"name": "momentum", "type": "double", "min": 0.1, "max": 0.9}]}, "not a tunable"),
    ({"parameters": [{"name": "batch_size", "type": "double", "min": 8, "max": 64}]}, "whole number"),
    ({"parameters": [{"name": "lr", "type": "double", "min": 0.1, "max": 0.01}]}, "must be below max"),
    ({"parameters": [{"name": "lr", "type": "double", "min": 0.1, "max": 1, "step": 0.1, "log": True}]},
     "step and log"),
    ({"parameters": [{"name": "lr", "type": "double", "min": 0, "max": 1, "log": True}]}, "needs min > 0"),
    ({"parameters": [{"name": "lr", "type": "double", "min": 0, "max": 1, "step": 0.3}]}, "whole number of steps"),
    ({"parameters": [{"name": "arch", "type": "categorical", "min": 1, "max": 2}]}, "takes a list of values"),
    ({"parameters": [{"name": "arch", "type": "discrete", "values": ["a", "b"]}]}, "must be numbers"),
    ({"parameters": [{"name": "batch_size", "type": "categorical", "values": [32, "32"]}]}, "values repeat"),
    ({"parameters": [{"name": "batch_size", "type": "categorical", "values": [32, "big"]}]}, "expected an integer"),
    ({"parameters": [{"name": "lr", "type": "float", "min": 0.1, "max": 1}]}, "is not one of"),
    ({"parameters": []}, "no parameters"),
    ({"objective": {"metric": "val_acc"}}, "printed by the trainer"),
    ({"objective": {"metric": "val_loss", "goal": "lower"}}, "maximize or minimize"),
    ({"additional_metrics": ["val_loss", "val_loss"]}, "distinct"),
    ({"algorithm": "hyperband"}, "not one of"),
    ({"algorithm_settings": {"gamma": 0.25}}, "has no setting"),
    ({"algorithm": "grid", "algorithm_settings": {}}, "needs a step"),
    ({"trial": {"lr": 0.1}}, "must not set lr"),
    ({"trial": {"store": "x"}}, "must not set store"),
    ({"trial": {"epoch": 3}}, "unknown key(s) epoch"),
    ({"trial": {"optimizer": "adamax"}}, "unknown optimizer 'adamax'"),
    ({"parameters": [{"name": "arch", "type": "categorical", "values": ["resnet18", "resnet99"]}]},
     "with arch=resnet99: train: unknown architecture 'resnet99'"),
    ({"parameters": [{"name": "epochs", "type": "int", "min": 0, "max": 4}]},
     "with epochs=0: train: epochs must be at least 1"),
    ({"parallel_trials": 7}, "parallel_trials"),
    ({"name": "Bincount_Tune"}, "DNS label"),
    ({"early_stopping": {"algorithm": "asha"}}, "early_stopping"),
    ({"resources": {"gpus_per_worker": 2}}, "must equal gpus_per_worker"),
    ({"bogus": 1}, "unknown key(s) bogus"),
])
def test_bad_spaces_are_rejected_with_a_message_naming_the_problem(change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        full_space(**change)


def test_cli_reports_a_bad_space_in_one_line(tmp_path, capsys):
    path = tmp_path / "tuning.yaml"
    path.write_text(yaml.safe_dump({"parameters": [{"name": "lr", "type": "double", "min": 1, "max": 0.1}]}))
    assert cli.main(["tune", "render", "--space", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "min 1.0 must be below max 0.1" in err
    assert cli.main(["tune", "--store", str(tmp_path), "--dataset", "missing", "--space", str(path)]) == 1
    assert "must be below max" in capsys.readouterr().err
    assert cli.main(["tune", "--store", str(tmp_path), "--dataset", "missing"]) == 1
    assert "dataset 'missing' has no train split" in capsys.readouterr().err


def test_job_resources_of_the_space_render_the_trial_pods():
    space = full_space()
    spec = as_dict(space.render("exp", "s3://b", "d"))["spec"]["trialTemplate"]["trialSpec"]["spec"]
    assert spec["nprocPerNode"] == "2" and spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    assert space.resources == JobResources(workers=2, procs_per_worker=2, cpu_request="2", cpu_limit="4")
