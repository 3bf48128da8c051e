"""The training issue's learning check: resnet18 from scratch at 128 px on 1,000 synthetic images must reach at
least 90 % test accuracy. Runs what a user runs (generate → prepare → train → evaluate) and prints the wall time
of each stage and the test metrics. The defaults train long with the count-preserving augmentation (flips,
quarter turns, colour shuffle): 700 training images are few.

    .venv/bin/python benchmarks/synthetic_learning.py [--epochs 100] [--augment counting] [--store DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bincount.config import EvaluateConfig, PrepareConfig, SyntheticConfig, TrainConfig
from bincount.data.prepare import prepare
from bincount.data.synthetic import generate
from bincount.evaluate import evaluate
from bincount.train.loop import train

GOAL = 0.90


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="store root to use (default: a temporary directory)")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--augment", default="counting")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--schedule", default="onecycle")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--label-smoothing", type=float, default=0.05)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bincount-learning-") as tmp:
        store = args.store or tmp
        times = {}
        start = time.perf_counter()
        generate(SyntheticConfig(dest=store, n=args.n, seed=args.seed, workers=2))
        prepare(PrepareConfig(store=store, name="learning", balance="none", seed=args.seed))
        times["data"] = time.perf_counter() - start

        start = time.perf_counter()
        result = train(TrainConfig(
            store=store, dataset="learning", run=f"learning-{args.epochs}ep", arch="resnet18", weights="none",
            image_size=128, augment=args.augment, epochs=args.epochs, batch_size=args.batch_size,
            lr=args.lr, schedule=args.schedule, warmup_epochs=max(1.0, args.epochs / 10),
            weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, precision=args.precision,
            seed=args.seed, cache_dir=str(Path(tmp) / "cache")))
        times["train"] = time.perf_counter() - start

        start = time.perf_counter()
        metrics = evaluate(EvaluateConfig(store=store, model=result.run, dataset="learning", split="test",
                                          out=str(Path(store) / "reports" / result.run / "evaluation"),
                                          cache_dir=str(Path(tmp) / "cache"))).metrics
        times["evaluate"] = time.perf_counter() - start

    print(json.dumps({"epochs": args.epochs, "augment": args.augment, "best_epoch": result.best_epoch,
                      "val_accuracy": result.best["val_accuracy"],
                      "test_accuracy": metrics["accuracy"],
                      "test_balanced_accuracy": metrics["balanced_accuracy"],
                      "test_within_one": metrics["within_one_accuracy"],
                      "test_mae": metrics["mae"], "test_samples": metrics["samples"],
                      "seconds": {k: round(v, 1) for k, v in times.items()}}, indent=2))
    verdict = "reached" if metrics["accuracy"] >= GOAL else "missed"
    print(f"test accuracy {metrics['accuracy']:.3f}: {verdict} the {GOAL:.0%} goal", file=sys.stderr)
    return 0 if metrics["accuracy"] >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
