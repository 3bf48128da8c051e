"""A time budget (`--time-budget`): turned into a step count once, the schedule ending on that step, the count kept
across a kill and resume, and a budget too small for the run a clear error."""

from __future__ import annotations

import io
import json
import math
import subprocess

import pytest
import torch

from bincount.cli import main
from bincount.errors import ConfigError
from bincount.store import open_store
from bincount.train.budget import parse_duration
from bincount.train.loop import checkpoint_key, train, weights_digest
from training_data import metric_lines, subprocess_env, tiny_args, tiny_config, train_command

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# small checkpoints, dropout that draws random numbers; a warm-up longer than the budget's timing, so the steps
# timed follow the same rates whatever the budget decides
BUDGETED = dict(arch="mobilenet_v3_small", epochs=200, warmup_epochs=2.0, schedule="linear", seed=5)


def _load(store: str, key: str):
    return torch.load(io.BytesIO(open_store(store).get(key)), map_location="cpu", weights_only=True)


def test_durations():
    assert [parse_duration(t) for t in ("45m", "2h", "1h30m", "90s", "600", "0.5h")] == [2700, 7200, 5400, 90, 600,
                                                                                         1800]
    for bad in ("", "soon", "45x", "-5m", "0s", "m"):
        with pytest.raises(ConfigError, match="time budget"):
            parse_duration(bad)


def test_a_budget_becomes_a_step_count_and_the_schedule_ends_on_it(store, cache_dir, capsys):
    result = train(tiny_config(store, "budget", cache_dir, time_budget="8s", **BUDGETED))
    ckpt = _load(store, checkpoint_key("budget"))
    state = ckpt["state"]
    meta = json.loads(open_store(store).get_text("models/budget/model.json"))
    schedule = meta["schedule"]
    per_epoch = schedule["steps_per_epoch"]
    assert 0 < state["steps"] < 200 * per_epoch, "the budget, not the epoch ceiling, ends the run"
    assert state["taken"] == state["steps"] == schedule["steps"] == ckpt["scheduler"]["last_epoch"]
    assert result.epochs == len(state["history"]) == math.ceil(state["steps"] / per_epoch)
    assert schedule["time_budget_s"] == 8 and schedule["step_s"] > 0
    lrs = [h["lr"] for h in state["history"]]
    assert lrs[-1] == 0.0 and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))      # decayed to zero on that step
    assert f"time budget: {state['steps']} steps" in capsys.readouterr().err


def test_a_killed_budgeted_run_resumes_to_its_step_and_the_weights_of_that_many_steps(store, cache_dir, tmp_path):
    args = tiny_args(store, cache_dir, workers=1, time_budget="8s", **BUDGETED)
    env = subprocess_env()
    with open(tmp_path / "stderr", "w+") as err:
        killed = subprocess.Popen(train_command(*args, "--run", "cut"), stdout=subprocess.PIPE, stderr=err, text=True,
                                  env=env)
        for line in killed.stdout:
            if " epoch=1 " in line:
                killed.kill()
                break
        killed.wait(60)
        err.seek(0)
        assert open_store(store).exists(checkpoint_key("cut")), err.read()[-3000:]
    planned = _load(store, checkpoint_key("cut"))["state"]
    assert planned["epoch"] == 1 and planned["steps"] > planned["taken"] > 0

    resumed = subprocess.run(train_command(*args, "--run", "cut"), capture_output=True, text=True, env=env,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"after epoch 1, to end on step {planned['steps']}" in resumed.stderr
    assert "time budget:" not in resumed.stderr                  # decided once, before the kill
    assert metric_lines(resumed.stdout)[-1]["lr"] == 0.0

    # the same number of steps given outright trains the same weights
    fixed = subprocess.run(train_command(*tiny_args(store, cache_dir, workers=1, steps=planned["steps"], **BUDGETED),
                                         "--run", "fixed"), capture_output=True, text=True, env=env, timeout=300)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    cut, whole = _load(store, checkpoint_key("cut")), _load(store, checkpoint_key("fixed"))
    assert cut["state"]["taken"] == whole["state"]["taken"] == planned["steps"]
    assert weights_digest(cut["net"]) == weights_digest(whole["net"])


def test_a_budget_too_small_or_malformed_is_one_clear_error(store, cache_dir, capsys):
    code = main(["train", *tiny_args(store, cache_dir, time_budget="0.01s", **BUDGETED), "--run", "tiny-budget"])
    err = capsys.readouterr().err
    assert code == 1 and "time budget of 0.01 s is too small" in err and "Traceback" not in err
    assert not open_store(store).exists(checkpoint_key("tiny-budget"))
    code = main(["train", *tiny_args(store, cache_dir, **BUDGETED), "--time-budget", "soon", "--run", "x"])
    err = capsys.readouterr().err
    assert code == 1 and "time budget 'soon' is not a duration" in err and len(err.strip().splitlines()) == 1
