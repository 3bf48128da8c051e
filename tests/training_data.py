"""Tiny datasets and configs shared by the training and evaluation tests: what users run (the synthetic
generator, then prepare), only small: ~80 images, 48 px inputs, resnet18 without pretrained weights."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bincount.config import PrepareConfig, SyntheticConfig, TrainConfig
from bincount.data.prepare import prepare
from bincount.data.synthetic import generate
from bincount.store import open_store
from bincount.train import losses

DATASET = "tiny"
KATIB_METRIC = re.compile(r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)")
TINY = dict(dataset=DATASET, weights="none", image_size=48, epochs=2, batch_size=8, workers=0,
            precision="fp32", warmup_epochs=0.0)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A tiny dataset per test module."""
    return make_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("image-cache")


@pytest.fixture(scope="module")
def one_torch_thread():
    """In-process training on one thread: on a shared small machine two threads that wait for each other's
    core make a step many times slower (subprocesses get OMP_NUM_THREADS=1 for the same reason)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_store(root: Path, n: int = 80, seed: int = 0) -> str:
    generate(SyntheticConfig(dest=str(root), n=n, seed=seed, width=(160, 200), height=(128, 160)))
    prepare(PrepareConfig(store=str(root), name=DATASET, workers=4))
    return str(root)


def with_bins(store: str) -> int:
    """Dataset `tiny-bins`: tiny's splits, where training neighbours of other counts are one bin photographed
    twice (as prepare marks ABID's); returns how many such bins."""
    s = open_store(store)
    for split in ("train", "val", "test"):
        records = [json.loads(line) for line in s.get_text(f"datasets/{DATASET}/{split}.jsonl").splitlines()]
        if split == "train":
            for a, b in zip(records[::2], records[1::2]):
                if a["label"] != b["label"]:
                    a["bin"] = b["bin"] = a["key"]
            twins = sum("bin" in r for r in records) // 2
        s.put_text(f"datasets/{DATASET}-bins/{split}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return twins


def count_same_bin_pairs(monkeypatch) -> list[int]:
    """The same-bin ranking, counting per call the pairs of one bin (of different counts) it got in a batch."""
    compared: list[int] = []
    ranking = losses.same_bin_ranking

    def counting(logits, y, bins, values):
        compared.append(int(((bins[:, None] == bins[None, :]) & (bins[:, None] >= 0) & (y[:, None] > y[None, :]))
                            .sum()))
        return ranking(logits, y, bins, values)

    monkeypatch.setattr(losses, "same_bin_ranking", counting)
    return compared


def tiny_config(store: str, run: str, cache_dir: Path, **overrides) -> TrainConfig:
    return TrainConfig(store=store, run=run, cache_dir=str(cache_dir), **{**TINY, **overrides})


def tiny_args(store: str, cache_dir: Path, **overrides) -> list[str]:
    """The same settings as command-line flags (`--set` for those without a flag)."""
    args = ["--store", store, "--cache-dir", str(cache_dir)]
    for key, value in {**TINY, **overrides}.items():
        args += ["--set", f"{key}={value}"]
    return args


def subprocess_env() -> dict[str, str]:
    """One thread per process, so runs side by side on a small machine compute alike."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get(
        "PYTHONPATH")])))


def train_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bincount.train", *args]


def train_full_and_kill_resumed(args: list[str]) -> str:
    """Trains run `full` to its end while run `resumed`, with the same args, is killed as soon as it prints epoch
    1's metric line; returns the full run's stderr (asserting that it succeeded)."""
    env = subprocess_env()
    full = subprocess.Popen(train_command(*args, "--run", "full"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    killed = subprocess.Popen(train_command(*args, "--run", "resumed"), stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env)
    for line in killed.stdout:
        if " epoch=1 " in line:
            killed.kill()
            break
    killed.wait(60)
    _, err = full.communicate(timeout=300)
    assert full.returncode == 0, err[-3000:]
    return err


def metric_lines(stdout: str) -> list[dict[str, float]]:
    """Every stdout line that has a `name=value` pair, parsed the way Katib's StdOut collector does."""
    out = []
    for line in stdout.splitlines():
        pairs = KATIB_METRIC.findall(line)
        if "=" in line:
            out.append({name: float(value) for name, value, *_ in pairs})
    return out
