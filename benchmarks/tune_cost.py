"""The tuning issue's cost check: the seed's search on the real ABID sample, seed-style against ours.

The seed's search: 8 trials x 2 epochs of a frozen backbone, learning rate 1e-3..1e-2 (log) x batch size
{32, 64, 128, 256}. Both searches run through the local tuner (`bincount.tune.local.run_local`): the same
TPE sampler with the same seed, so they draw the same configurations, and the same trainer, each trial a
single process forked from the tuner's fork server.
- seed-style: every trial pushes every image through the backbone every epoch (`feature_cache: false`), and
  no early stopping. (The seed also decoded every original JPEG every epoch; here both read the node's cache of
  input squares, which flatters seed-style);
- ours: the backbone's features computed once, into the store, shared by every trial, and median stop, at
  our precision (`auto`: bf16 with channels_last where the CPU computes bf16 natively; the seed ran fp32).
It prints the wall time of each search (the first trial's feature extraction included in ours), the ratio and
the best validation accuracy each found; the goal is >= 20x on 2 cores. A third search, `ours-cached`, repeats
ours on the same dataset (another experiment) to show the cost of a search once the features are in the store.
Each search runs in a fresh interpreter, so each pays for starting its own fork server; the clock runs around
`run_local`.

Seed-style pushes the images through the backbone trials x epochs times (16), ours once (cold) or never
(cached). That forward pass is nearly all of a seed-style trial and of ours' first, so the cold ratio cannot go
far beyond 16x, less the fork server's start and the other trials; only the cached search can reach 20x.

    .venv/bin/python benchmarks/tune_cost.py [--arch resnet18] [--image-size 224] [--weights none] [--parallel 2]

Without network access there are no pretrained weights: `--weights none` (the default) keeps a random backbone,
so both accuracies stay near chance; pass a state-dict file to compare accuracies that mean something.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

from bincount.config import PrepareConfig, TuneJob
from bincount.data.prepare import prepare
from bincount.tune.local import run_local

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "abid-sample"
GOAL = 20.0


def make_store(root: Path) -> str:
    """The sample in a scratch store's ABID layout, prepared as dataset `sample` (balanced, 70/20/10)."""
    for sub in ("bin-images", "metadata"):
        shutil.copytree(SAMPLE / sub, root / "raw" / sub)
    print(prepare(PrepareConfig(store=str(root), name="sample")).summary(), file=sys.stderr)
    return str(root)


def space(name: str, args: argparse.Namespace, cache_dir: Path, seed_style: bool) -> dict:
    trial = {"arch": args.arch, "weights": args.weights, "freeze": "backbone", "epochs": args.epochs,
             "image_size": args.image_size, "augment": "flip", "cache_dir": str(cache_dir),
             "precision": "fp32" if seed_style else "auto", "feature_cache": not seed_style}
    return {"name": name, "objective": {"metric": "val_accuracy", "goal": "maximize"},
            "additional_metrics": ["val_loss"], "algorithm": "tpe", "algorithm_settings": {"random_state": 0},
            "max_trials": args.trials, "parallel_trials": args.parallel, "max_failed_trials": 0,
            "parameters": [{"name": "lr", "type": "double", "min": 0.001, "max": 0.01, "log": True},
                           {"name": "batch_size", "type": "categorical", "values": [32, 64, 128, 256]}],
            "early_stopping": None if seed_style else {"min_trials": 3, "start_step": 1},
            "trial": trial,
            "resources": {"procs_per_worker": 1, "cpu_request": "1", "cpu_limit": "2", "memory_request": "2Gi",
                          "memory_limit": "4Gi", "shm_size": "1Gi"}}


def search(store: str, tmp: Path, name: str, body: dict) -> dict:
    """One search, timed; what the report needs, as plain data."""
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    start = time.perf_counter()

    def progress(line: str) -> None:
        print(f"[{name} {time.perf_counter() - start:7.1f} s] {line}", file=sys.stderr, flush=True)

    result = run_local(TuneJob(store=store, dataset="sample", space=str(path), workdir=str(tmp / name)), progress)
    return {"seconds": time.perf_counter() - start, "table": result.table(), "summary": result.summary(),
            "best": result.best.value if result.best else None,
            "early_stopped": sum(t.state == "early-stopped" for t in result.trials)}


def search_alone(store: str, tmp: Path, name: str, body: dict) -> dict:
    """`search` in a fresh interpreter, which starts a fork server of its own."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(search, store, tmp, name, body).result()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--weights", default="none")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args()
    if not (SAMPLE / "metadata").is_dir():
        print(f"the ABID sample is not at {SAMPLE}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bincount-tune-cost-") as tmp_dir:
        tmp = Path(tmp_dir)
        store = make_store(tmp / "store")
        runs = {name: search_alone(store, tmp, name, space(name, args, tmp / f"cache-{name}", name == "seed-style"))
                for name in ("seed-style", "ours", "ours-cached")}
    for name, run in runs.items():
        print(f"\n{name}: {run['seconds']:.1f} s\n{run['table']}\n{run['summary']}")
    seed_s, ours_s, cached_s = (runs[name]["seconds"] for name in ("seed-style", "ours", "ours-cached"))
    figures = {"arch": args.arch, "weights": args.weights, "image_size": args.image_size, "trials": args.trials,
               "epochs": args.epochs, "parallel": args.parallel, "seed_style_s": round(seed_s, 1),
               "ours_s": round(ours_s, 1), "ratio": round(seed_s / ours_s, 2), "ours_cached_s": round(cached_s, 1),
               "ratio_cached": round(seed_s / cached_s, 2),
               "backbone_passes": {"seed_style": args.trials * args.epochs, "ours": 1, "ours_cached": 0},
               "seed_style_best_val_accuracy": runs["seed-style"]["best"],
               "ours_best_val_accuracy": runs["ours"]["best"],
               "ours_cached_best_val_accuracy": runs["ours-cached"]["best"],
               "ours_early_stopped": runs["ours"]["early_stopped"]}
    print("\n" + json.dumps(figures, indent=2))
    for label, seconds in (("ours (features computed by its first trial)", ours_s),
                           ("ours-cached (features already in the store)", cached_s)):
        ratio = seed_s / seconds
        print(f"wall-time ratio seed-style / {label}: {ratio:.1f}x "
              f"(goal >= {GOAL:g}x: {'met' if ratio >= GOAL else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
