"""The trainer end to end on tiny synthetic data: DDP under torchrun, kill and resume, the frozen backbone and
its feature cache, and bad input (one clear error, non-zero exit, checkpoints untouched)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

from bincount.cli import main
from bincount.store import open_store
from bincount.train.loop import METRIC_KEYS, checkpoint_key, train, weights_digest
from bincount.train.losses import CountLoss
from bincount.model.zoo import build_model, head_name
from training_data import (DATASET, KATIB_METRIC, make_store, metric_lines, subprocess_env, tiny_args, tiny_config,
                           train_command, train_full_and_kill_resumed, with_bins)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(store: str, key: str):
    return torch.load(io.BytesIO(open_store(store).get(key)), map_location="cpu", weights_only=True)


def _final_digests(stderr: str) -> dict[int, str]:
    return {int(line.split("rank ")[1].split(":")[0]): line.rsplit(" ", 1)[1]
            for line in stderr.splitlines() if "final weights sha256" in line}


def test_torchrun_two_processes_learn_in_lockstep_and_print_katib_metric_lines(store, cache_dir):
    args = tiny_args(store, cache_dir, epochs=3, batch_size=4, lr=0.002, schedule="constant")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "bincount.train", *args, "--run-id", "ddp"],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    lines = [line for line in proc.stdout.splitlines() if "=" in line]
    assert [line.split()[1] for line in lines] == ["epoch=1", "epoch=2", "epoch=3"]
    for line in lines:      # after the time, Katib's default regex reads every field, whole
        assert [f"{name}={value}" for name, value, *_ in KATIB_METRIC.findall(line)] == line.split()[1:]
    metrics = metric_lines(proc.stdout)
    assert [list(m) for m in metrics] == [list(METRIC_KEYS)] * 3
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert len(proc.stdout.splitlines()) == 4 and "run ddp: 3 epoch(s)" in proc.stdout  # the summary, no pairs

    log = [json.loads(line) for line in open_store(store).get_text(checkpoint_key("ddp", "metrics.jsonl")).splitlines()]
    assert [{k: r[k] for k in METRIC_KEYS} for r in log] == metrics
    assert all(r["step_time_mean_s"] > 0 and 0 <= r["data_wait_share"] < 1 for r in log)

    digests = _final_digests(proc.stderr)
    assert set(digests) == {0, 1} and digests[0] == digests[1]
    assert digests[0] == weights_digest(_load(store, checkpoint_key("ddp"))["net"])

    meta = json.loads(open_store(store).get_text("models/ddp/model.json"))
    assert meta["arch"] == "resnet18" and meta["classes"] == [1, 2, 3, 4, 5]
    assert meta["preprocessing"] == {"size": 48, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                     "resize": "stretch"}
    assert meta["inference"] == {"tta": "none", "temperature": 1.0, "decode": "argmax"}
    assert meta["metrics"]["val_accuracy"] == max(m["val_accuracy"] for m in metrics)
    assert meta["config"]["run"] == "ddp" and meta["config"]["lr"] == 0.002
    model, _ = build_model("resnet18", 5, "none")
    model.load_state_dict(_load(store, "models/ddp/model.pt"))
    for name in ("report.json", "curves.png"):
        assert open_store(store).exists(f"reports/ddp/train/{name}")


def test_torchrun_ranks_share_whole_bins_and_stay_in_lockstep(store, cache_dir):
    twins = with_bins(store)
    args = tiny_args(store, cache_dir, dataset=f"{DATASET}-bins", epochs=2, batch_size=4, same_bin_rank_weight=1.0)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "bincount.train", *args, "--run-id", "ddp-bins"],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"same-bin ranking: {2 * twins} training photos in {twins} bins" in proc.stderr
    assert [m["epoch"] for m in metric_lines(proc.stdout)] == [1, 2]
    digests = _final_digests(proc.stderr)
    assert set(digests) == {0, 1} and digests[0] == digests[1]


def test_killed_run_resumes_at_the_next_epoch_with_the_weights_of_an_uninterrupted_run(store, cache_dir):
    # mobilenet: its dropout draws random numbers too, and its checkpoints are small
    args = tiny_args(store, cache_dir, arch="mobilenet_v3_small", epochs=3, workers=1, seed=3)
    env = subprocess_env()
    train_full_and_kill_resumed(args)
    assert _load(store, checkpoint_key("resumed"))["state"]["epoch"] == 1
    assert not open_store(store).exists("models/resumed/model.json")

    rerun = subprocess.run(train_command(*args, "--run", "resumed"), capture_output=True, text=True, env=env,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming run resumed" in rerun.stderr and "after epoch 1" in rerun.stderr
    # epoch 1's line again, from the checkpoint (a restarted pod's collector sees every epoch), then the new ones
    assert [line.split()[1] for line in rerun.stdout.splitlines() if "=" in line] == ["epoch=1", "epoch=2", "epoch=3"]

    full_ckpt, resumed_ckpt = _load(store, checkpoint_key("full")), _load(store, checkpoint_key("resumed"))
    assert weights_digest(resumed_ckpt["net"]) == weights_digest(full_ckpt["net"])
    assert [{k: h[k] for k in METRIC_KEYS} for h in resumed_ckpt["state"]["history"]] == \
           [{k: h[k] for k in METRIC_KEYS} for h in full_ckpt["state"]["history"]]
    exported = [weights_digest(_load(store, f"models/{run}/model.pt")) for run in ("full", "resumed")]
    assert exported[0] == exported[1]


def test_frozen_backbone_is_bit_identical_and_the_feature_cache_trains_the_same_head(store, cache_dir, tmp_path,
                                                                                     capsys):
    torch.manual_seed(11)
    start, _ = build_model("resnet18", 5, "none")
    weights = tmp_path / "start.pt"
    torch.save(start.state_dict(), weights)
    common = dict(weights=str(weights), freeze="backbone", augment="none", epochs=3, lr=0.01)

    slow = train(tiny_config(store, "frozen-slow", cache_dir, feature_cache=False, **common))
    exported = _load(store, "models/frozen-slow/model.pt")
    head = head_name(start) + "."
    backbone = [k for k in exported if not k.startswith(head)]
    assert any("running_mean" in k for k in backbone)
    assert all(torch.equal(exported[k], start.state_dict()[k]) for k in backbone)
    assert not torch.equal(exported[head + "weight"], start.state_dict()[head + "weight"])

    capsys.readouterr()
    fast = train(tiny_config(store, "frozen-fast", cache_dir, feature_cache=True, **common))
    assert "features: computed" in capsys.readouterr().err
    features = [o.key for o in open_store(store).list(f"datasets/{DATASET}/cache/features/resnet18/")]
    assert len(features) == 2 and all("-48px-fp32/" in k for k in features)
    exported_fast = _load(store, "models/frozen-fast/model.pt")
    assert all(torch.equal(exported_fast[k], start.state_dict()[k]) for k in backbone)

    slow_history = _load(store, checkpoint_key("frozen-slow"))["state"]["history"]
    fast_history = _load(store, checkpoint_key("frozen-fast"))["state"]["history"]
    for s, f in zip(slow_history, fast_history, strict=True):
        assert f["val_accuracy"] == pytest.approx(s["val_accuracy"], abs=0.1)
        assert f["val_loss"] == pytest.approx(s["val_loss"], rel=1e-3)
    assert fast.best["val_accuracy"] == pytest.approx(slow.best["val_accuracy"], abs=0.1)

    again = train(tiny_config(store, "frozen-fast-again", cache_dir, feature_cache=True, **common))
    err = capsys.readouterr().err
    assert "features: computed" not in err and err.count("features: ") == 2
    assert again.best == fast.best


def _cli(capsys, *args: str) -> tuple[int, list[str]]:
    code = main(["train", *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("bincount: error:")]


def test_missing_manifest_empty_split_and_unknown_arch_fail_with_one_clear_error(store, cache_dir, capsys):
    code, errors = _cli(capsys, *tiny_args(store, cache_dir), "--dataset", "nosuch", "--run", "bad1")
    assert code == 1 and len(errors) == 1 and "dataset 'nosuch' has no train split" in errors[0]

    s = open_store(store)
    s.put_text("datasets/emptyval/train.jsonl", s.get_text(f"datasets/{DATASET}/train.jsonl"))
    s.put_text("datasets/emptyval/val.jsonl", "")
    code, errors = _cli(capsys, *tiny_args(store, cache_dir), "--dataset", "emptyval", "--run", "bad2")
    assert code == 1 and len(errors) == 1 and "split 'val' of dataset 'emptyval' is empty" in errors[0]

    code, errors = _cli(capsys, *tiny_args(store, cache_dir), "--arch", "resnet19", "--run", "bad3")
    assert code == 1 and len(errors) == 1
    assert "unknown architecture 'resnet19'" in errors[0] and "resnet18" in errors[0] and "convnext_tiny" in errors[0]
    assert not any(s.exists(checkpoint_key(run)) for run in ("bad1", "bad2", "bad3"))


def test_missing_image_fails_before_training(tmp_path, capsys):
    store = make_store(tmp_path / "store", n=20)
    key = json.loads(open_store(store).get_text(f"datasets/{DATASET}/val.jsonl").splitlines()[0])["key"]
    open_store(store).delete(f"raw/bin-images/{key}.jpg")
    code, errors = _cli(capsys, *tiny_args(store, tmp_path / "cache"), "--run", "bad4")
    assert code == 1 and len(errors) == 1
    assert "1 image(s) missing" in errors[0] and f"raw/bin-images/{key}.jpg" in errors[0]
    assert not open_store(store).exists(checkpoint_key("bad4"))


def test_nan_loss_stops_with_a_clear_error_and_leaves_the_checkpoint_untouched(store, cache_dir, capsys,
                                                                               monkeypatch):
    code, errors = _cli(capsys, *tiny_args(store, cache_dir, lr=1e30, schedule="constant"), "--run", "diverges")
    assert code == 1 and len(errors) == 1 and "loss became" in errors[0] and "epoch 1" in errors[0]
    assert not open_store(store).exists(checkpoint_key("diverges"))

    code, _ = _cli(capsys, *tiny_args(store, cache_dir, epochs=1), "--run", "nan-later")
    assert code == 0
    s = open_store(store)
    keys = [checkpoint_key("nan-later"), checkpoint_key("nan-later", "best.pt"),
            checkpoint_key("nan-later", "metrics.jsonl"), "models/nan-later/model.pt"]
    before = {k: s.get(k) for k in keys}
    # Fault injection: from now on every loss is NaN, as after a divergence in epoch 2.
    monkeypatch.setattr(CountLoss, "forward", lambda self, x, y: x.sum() * float("nan"))
    code, errors = _cli(capsys, *tiny_args(store, cache_dir, epochs=2), "--run", "nan-later")
    assert code == 1 and len(errors) == 1 and "loss became nan at epoch 2, step 1" in errors[0]
    assert {k: s.get(k) for k in keys} == before
    assert [o.key for o in s.list("checkpoints/nan-later/")] == sorted(keys[:3])
