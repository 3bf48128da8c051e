"""Local tuning end to end on tiny synthetic data: real trainer trials (single processes forked from the tuner's
fork server, or torchrun's), their stdout metric lines, optuna's median pruner, parallel trials, and a tuner killed
mid-trial that resumes from the study in the store.

The datasets have no test split at all: tuning must never need it."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from bincount.config import PrepareConfig, SyntheticConfig, TuneJob
from bincount.data.prepare import dataset_key, prepare
from bincount.data.synthetic import generate
from bincount.store import open_store
from bincount.train.loop import checkpoint_key
from bincount.tune.local import TuneFailed, run_local
from training_data import DATASET, TINY, make_store, subprocess_env

pytestmark = pytest.mark.slow


def drop_test_split(store: str) -> str:
    open_store(store).delete(dataset_key(DATASET, "test.jsonl"))
    return store


@pytest.fixture(scope="module")
def local_store(tmp_path_factory) -> str:
    return drop_test_split(make_store(tmp_path_factory.mktemp("store"), n=60))


def space_file(path: Path, cache_dir: Path, searches_epochs: bool = False, **changes) -> str:
    trial = {k: v for k, v in TINY.items() if k != "dataset" and not (searches_epochs and k == "epochs")}
    body = {"objective": {"metric": "val_loss", "goal": "minimize"},
            "additional_metrics": ["val_accuracy", "train_loss"],
            "algorithm": "random", "algorithm_settings": {"random_state": 0},
            "parameters": [{"name": "lr", "type": "double", "min": 1e-4, "max": 10.0, "log": True}],
            "trial": {"arch": "mobilenet_v3_small", "freeze": "backbone", **trial, "cache_dir": str(cache_dir)},
            "resources": {"procs_per_worker": 1, "cpu_request": "1", "cpu_limit": "1", "memory_request": "1Gi",
                          "memory_limit": "2Gi", "shm_size": "256Mi"},
            **changes}
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return str(path)


def trainer_log(store: str, run: str) -> list[dict]:
    """The trainer's own record of a run's epochs (what it printed as metric lines)."""
    text = open_store(store).get_text(checkpoint_key(run, "metrics.jsonl"))
    return [json.loads(line) for line in text.splitlines()]


def stored_study(store: str, name: str, tmp_path: Path) -> optuna.Study:
    path = tmp_path / f"{name}-copy.db"
    open_store(store).get_file(f"tuning/{name}/study.db", path)
    return optuna.load_study(study_name=name, storage=f"sqlite:///{path}")


def test_local_search_runs_parallel_trials_prunes_a_bad_one_and_picks_the_best(local_store, tmp_path):
    """Four enqueued trials, two at a time: the fourth (lr 5, 2000 epochs) is far worse at epoch 1 than the two
    finished ones, so median stop must end it; were it not killed, the trainer would log 2000 epochs. (A head
    epoch on tiny features takes milliseconds, so a few dozen pass before the tuner's signal lands.)"""
    name = "tiny-search"
    space = space_file(tmp_path / "tuning.yaml", tmp_path / "cache", True, name=name, max_trials=4, parallel_trials=2,
                       max_failed_trials=1, early_stopping={"min_trials": 2, "start_step": 1},
                       parameters=[{"name": "lr", "type": "double", "min": 1e-4, "max": 10.0, "log": True},
                                   {"name": "epochs", "type": "categorical", "values": [2, 2000]}])
    seed = tmp_path / "seed.db"       # the trials to run first, put where a resumed search reads its study
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{seed}", direction="minimize")
    for lr, epochs in ((1e-3, 2), (3e-3, 2), (2e-3, 2), (5.0, 2000)):
        study.enqueue_trial({"lr": lr, "epochs": epochs})
    open_store(local_store).put_file(f"tuning/{name}/study.db", seed)
    lines = []

    result = run_local(TuneJob(store=local_store, dataset=DATASET, space=space, workdir=str(tmp_path / "work")),
                       progress=lines.append)

    by_lr = {t.parameters["lr"]: t for t in result.trials}
    assert sorted(by_lr) == [1e-3, 2e-3, 3e-3, 5.0]
    assert by_lr[1e-3].state == by_lr[3e-3].state == "succeeded"
    bad = by_lr[5.0]
    assert bad.state == "early-stopped" and bad.parameters["epochs"] == 2000
    assert any(line.startswith(f"trial {bad.name} early-stopped at epoch 1") for line in lines), lines
    assert len(trainer_log(local_store, bad.name)) < 200, "the pruned trial's trainer was not stopped"

    for t in result.trials:             # each trial's value is its best epoch as the trainer logged it
        if t.state == "succeeded":
            assert t.value == min(r["val_loss"] for r in trainer_log(local_store, t.name))
            assert t.metrics["val_loss"] == trainer_log(local_store, t.name)[-1]["val_loss"]
    succeeded = [t for t in result.trials if t.state == "succeeded"]
    assert result.best == min(succeeded, key=lambda t: t.value)

    store = open_store(local_store)
    best = json.loads(store.get_text(f"tuning/{name}/best.json"))
    assert best["trial"] == result.best.name and best["objective"] == {
        "metric": "val_loss", "goal": "minimize", "value": result.best.value}
    assert best["train"]["lr"] == result.best.parameters["lr"] and best["train"]["freeze"] == "backbone"
    rows = list(csv.DictReader(io.StringIO(store.get_text(f"tuning/{name}/trials.csv"))))
    assert {r["trial"]: r["state"] for r in rows} == {t.name: t.state for t in result.trials}
    for png in ("optimization_history.png", "param_importances.png"):
        assert store.stat(f"tuning/{name}/report/{png}").size > 10_000
    assert result.best.name in result.table() and "early-stopped" in result.table()

    trials = stored_study(local_store, name, tmp_path).trials
    spans = [(t.datetime_start, t.datetime_complete) for t in trials]
    most = max(sum(start <= at < end for start, end in spans) for at, _ in spans)
    assert most == 2, f"{most} trials ran at once; the space allows 2"
    assert not store.exists(dataset_key(DATASET, "test.jsonl"))


@pytest.fixture
def s3_store(s3_env) -> str:
    store = f"s3://{s3_env.new_bucket('tune')}"
    generate(SyntheticConfig(dest=store, n=60, seed=0, width=(160, 200), height=(128, 160)))
    prepare(PrepareConfig(store=store, name=DATASET, workers=4))
    return drop_test_split(store)


def test_a_killed_search_resumes_from_the_store_without_rerunning_finished_trials(s3_store, tmp_path):
    """The tuner (the CLI) is killed with its trials at the first epoch of its second trial; a rerun on
    another work directory (another machine) reads the study from the S3 store and finishes the search."""
    name = "resume-search"
    space = space_file(tmp_path / "tuning.yaml", tmp_path / "cache", name=name, max_trials=2, parallel_trials=1)
    command = [sys.executable, "-m", "bincount.cli", "tune", "--store", s3_store, "--dataset", DATASET,
               "--space", space, "--backend", "local", "--workdir", str(tmp_path / "first")]
    tuner = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                             env=subprocess_env(), start_new_session=True)
    seen, finished = [], None
    try:
        for line in tuner.stderr:
            seen.append(line)
            if " succeeded in " in line:
                finished = line.split()[3]
            if finished and " epoch 1: " in line and finished not in line:
                interrupted = line.split()[3]
                break
        else:
            pytest.fail("the tuner ended before its second trial's first epoch:\n" + "".join(seen))
    finally:
        os.killpg(tuner.pid, signal.SIGKILL)        # the tuner and its trial, as a lost machine would
        tuner.wait()
    store = open_store(s3_store)
    model_before = store.get(f"models/{finished}/model.json")
    store.delete(checkpoint_key(interrupted, "metrics.jsonl"))   # a kill between the checkpoint and its metric log
    lines = []

    result = run_local(TuneJob(store=s3_store, dataset=DATASET, space=space, workdir=str(tmp_path / "second")),
                       progress=lines.append)

    states = [(t.name, t.state) for t in result.trials]
    assert states == [(finished, "succeeded"), (interrupted, "interrupted"), (interrupted, "succeeded")]
    assert sum(f"trial {finished} " in line for line in lines) == 0, "a finished trial ran again"
    assert store.get(f"models/{finished}/model.json") == model_before
    assert result.trials[1].parameters == result.trials[2].parameters
    resumed_log = (tmp_path / "second" / "logs" / f"{interrupted}.log").read_text()
    assert f"resuming run {interrupted}" in resumed_log         # the trainer went on from its checkpoint
    assert result.trials[2].value == min(r["val_loss"] for r in trainer_log(s3_store, interrupted))
    study = stored_study(s3_store, name, tmp_path)
    assert sorted(study.trials[2].intermediate_values) == [1, 2]  # checkpointed epochs, replayed by the trainer
    assert json.loads(store.get_text(f"tuning/{name}/best.json"))["trial"] == result.best.name
    assert all(isinstance(t.seconds, float) for t in result.trials if t.state == "succeeded")


def test_failed_trials_count_against_max_failed_trials(local_store, tmp_path):
    """A trial whose trainer exits with an error fails the search once more trials failed than the space allows
    (none here); the outputs still say which trial failed and why (the trainer's own one-line error)."""
    name = "failing-search"
    space = space_file(tmp_path / "tuning.yaml", tmp_path / "cache", name=name, max_trials=3, parallel_trials=1,
                       max_failed_trials=0)
    body = yaml.safe_load(Path(space).read_text())
    body["trial"]["weights"] = str(tmp_path / "missing.pt")
    Path(space).write_text(yaml.safe_dump(body))

    with pytest.raises(TuneFailed, match=r"1 trial\(s\) failed, more than max_failed_trials \(0\)"):
        run_local(TuneJob(store=local_store, dataset=DATASET, space=space, workdir=str(tmp_path / "work")),
                  progress=lambda line: None)

    rows = list(csv.DictReader(io.StringIO(open_store(local_store).get_text(f"tuning/{name}/trials.csv"))))
    assert [r["state"] for r in rows] == ["failed"]
    assert f"cannot read weights file {tmp_path / 'missing.pt'}" in rows[0]["message"]
    assert not open_store(local_store).exists(f"tuning/{name}/best.json")


def test_a_trial_of_two_processes_runs_under_torchrun(local_store, tmp_path):
    """procs_per_worker 2: the trial is torchrun's two ranks, as in a Katib trial's pod, and is judged by rank 0's
    metric lines like a forked one."""
    name = "ddp-search"
    space = space_file(tmp_path / "tuning.yaml", tmp_path / "cache", name=name, max_trials=1, parallel_trials=1,
                       resources={"procs_per_worker": 2, "cpu_request": "1", "cpu_limit": "2",
                                  "memory_request": "1Gi", "memory_limit": "2Gi", "shm_size": "256Mi"})

    result = run_local(TuneJob(store=local_store, dataset=DATASET, space=space, workdir=str(tmp_path / "work")),
                       progress=lambda line: None)

    [trial] = result.trials
    assert trial.state == "succeeded", trial.message
    assert trial.value == min(r["val_loss"] for r in trainer_log(local_store, trial.name))
    log = (tmp_path / "work" / "logs" / f"{trial.name}.log").read_text()
    assert "2 process(es) on cpu" in log and "rank 1: final weights" in log
