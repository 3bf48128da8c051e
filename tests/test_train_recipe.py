"""Recipe options of the trainer, on the frozen-backbone fast path (head epochs take milliseconds): early
stopping, gradient accumulation and clipping, class weights, the profiler trace, config file and overrides."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from bincount.cli import main
from bincount.data.dataset import Item
from bincount.store import open_store
from bincount.config import TrainConfig
from bincount.errors import ConfigError
from bincount.train.loop import checkpoint_key, class_weights, seed_everything, train
from bincount.model.zoo import build_model
from training_data import DATASET, count_same_bin_pairs, tiny_args, tiny_config, with_bins

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = dict(freeze="backbone", feature_cache=True)


def _ckpt(store: str, run: str) -> dict:
    return torch.load(io.BytesIO(open_store(store).get(checkpoint_key(run))), map_location="cpu", weights_only=True)


def test_early_stopping_stops_after_patience_and_stays_stopped(store, cache_dir, capsys):
    cfg = tiny_config(store, "early", cache_dir, epochs=6, patience=2, lr=1e-9, schedule="constant",
                      monitor="val_loss", **FAST)
    result = train(cfg)
    assert "early stop: no val_loss improvement for 2 epoch(s)" in capsys.readouterr().err
    ckpt = _ckpt(store, "early")
    history = ckpt["state"]["history"]
    assert ckpt["state"]["stopped_early"] and result.epochs == len(history) < 6
    assert result.best_epoch == min(history, key=lambda h: h["val_loss"])["epoch"]
    assert len(history) - result.best_epoch == 2

    again = train(cfg)                           # a rerun of a stopped run exports again, trains nothing:
    replayed = [line.split()[1] for line in capsys.readouterr().out.splitlines() if "=" in line]
    assert replayed == [f"epoch={h['epoch']}" for h in history] and again.epochs == result.epochs   # its epochs, once


def test_gradient_accumulation_counts_optimizer_steps(store, cache_dir):
    train(tiny_config(store, "accumulate", cache_dir, batch_size=4, accumulate=3, epochs=2, **FAST))
    batches = len(open_store(store).get_text(f"datasets/{DATASET}/train.jsonl").splitlines()) // 4
    assert _ckpt(store, "accumulate")["scheduler"]["last_epoch"] == 2 * math.ceil(batches / 3)


def test_gradient_clipping_bounds_each_sgd_step(store, cache_dir):
    heads = {}
    for run, clip in (("unclipped", 0.0), ("clipped", 1e-6)):
        train(tiny_config(store, run, cache_dir, optimizer="sgd", momentum=0.0, weight_decay=0.0, lr=0.5,
                          schedule="constant", epochs=1, grad_clip=clip, **FAST))
        heads[run] = _ckpt(store, run)["net"]["weight"]
    start = _start_head()
    steps = _ckpt(store, "clipped")["scheduler"]["last_epoch"]
    assert (heads["clipped"] - start).norm() <= 0.5 * 1e-6 * steps * 1.001
    assert (heads["unclipped"] - start).norm() > 100 * (heads["clipped"] - start).norm()


def _start_head() -> torch.Tensor:
    """The head the runs above started from: same seed, so the same fresh head."""
    seed_everything(0)
    model, _ = build_model("resnet18", 5, "none")
    return model.fc.weight.detach()


def test_balanced_class_weights():
    items = [Item(str(i), 1) for i in range(6)] + [Item("a", 2), Item("b", 2), Item("c", 3), Item("d", 3),
                                                   Item("e", 4), Item("f", 5)]
    weights = class_weights(TrainConfig(store="s", dataset="d", run="r", class_weights="balanced"), items)
    assert weights.tolist() == pytest.approx([12 / 30, 12 / 10, 12 / 10, 12 / 5, 12 / 5])
    with pytest.raises(ConfigError, match="no training images of class"):
        class_weights(TrainConfig(store="s", dataset="d", run="r", class_weights="balanced",
                                  classes=(1, 2, 3, 4, 5, 6)), items)


def test_config_file_flags_and_profile_trace(store, cache_dir, tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text("label_smoothing: 0.05\nlr: 0.5\nfreeze: backbone\n")
    code = main(["train", "--config", str(config), *tiny_args(store, cache_dir, epochs=1, profile=2),
                 "--lr", "0.01", "--run", "configured"])
    assert code == 0, capsys.readouterr().err
    saved = json.loads(open_store(store).get_text("models/configured/model.json"))["config"]
    assert saved["label_smoothing"] == 0.05 and saved["freeze"] == "backbone"      # from the file
    assert saved["lr"] == 0.01 and saved["epochs"] == 1                             # flags win
    assert saved["channels_last"] is False                                          # resolved, not None
    trace = json.loads(open_store(store).get_text("reports/configured/train/trace.json"))
    assert trace["traceEvents"]


@pytest.mark.parametrize("monitor", ["val_accuracy", "val_balanced_accuracy", "val_loss"])
def test_the_best_epoch_is_the_first_with_the_best_monitored_value(store, cache_dir, monitor):
    result = train(tiny_config(store, f"best-{monitor}", cache_dir, epochs=5, lr=0.05, schedule="constant",
                               monitor=monitor, **FAST))
    history = _ckpt(store, f"best-{monitor}")["state"]["history"]
    values = [h[monitor] for h in history]
    best = min(values) if monitor == "val_loss" else max(values)
    assert len(set(values)) > 1                 # the epochs differ, so a wrong direction picks another one
    assert result.best_epoch == values.index(best) + 1


def _head(store: str, key: str) -> torch.Tensor:
    return torch.load(io.BytesIO(open_store(store).get(key)), map_location="cpu", weights_only=True)


def test_the_moving_average_is_what_is_validated_exported_and_resumed(store, cache_dir):
    settings = dict(lr=0.05, schedule="constant", monitor="val_loss", **FAST)
    train(tiny_config(store, "ema-instant", cache_dir, epochs=2, ema_half_life=1e-9, **settings))
    instant = _ckpt(store, "ema-instant")
    assert torch.allclose(instant["ema"]["module.weight"], instant["net"]["weight"], atol=1e-7)

    train(tiny_config(store, "ema-resumed", cache_dir, epochs=1, ema_half_life=1.0, **settings))
    first = _ckpt(store, "ema-resumed")
    averaged = first["ema"]["module.weight"]
    assert not torch.allclose(averaged, first["net"]["weight"], atol=1e-4)    # it lags the trained weights
    assert torch.equal(_head(store, checkpoint_key("ema-resumed", "best.pt"))["weight"], averaged)
    assert torch.equal(_head(store, "models/ema-resumed/model.pt")["fc.weight"], averaged)

    train(tiny_config(store, "ema-resumed", cache_dir, epochs=2, ema_half_life=1.0, **settings))
    train(tiny_config(store, "ema-whole", cache_dir, epochs=2, ema_half_life=1.0, **settings))
    resumed, whole = _ckpt(store, "ema-resumed"), _ckpt(store, "ema-whole")
    assert resumed["ema"]["n_averaged"] == whole["ema"]["n_averaged"] == whole["scheduler"]["last_epoch"]
    assert torch.equal(resumed["ema"]["module.weight"], whole["ema"]["module.weight"])
    assert resumed["state"]["history"][1]["val_loss"] == whole["state"]["history"][1]["val_loss"]


def test_same_bin_ranking_sees_a_bins_photos_in_one_batch(store, cache_dir, monkeypatch, capsys):
    twins = with_bins(store)
    compared = count_same_bin_pairs(monkeypatch)
    settings = dict(dataset=f"{DATASET}-bins", epochs=2, batch_size=8, **FAST)
    train(tiny_config(store, "same-bin", cache_dir, same_bin_rank_weight=1.0, **settings))
    assert f"same-bin ranking: {2 * twins} training photos in {twins} bins" in capsys.readouterr().err
    # a shuffled sampler puts ~7/N of pairs in one batch of 8; whole bins only split at a batch's edge
    assert twins >= 8 and sum(compared) >= 2 * 0.7 * twins, (compared, twins)
    calls = len(compared)
    train(tiny_config(store, "no-same-bin", cache_dir, **settings))
    assert len(compared) == calls
