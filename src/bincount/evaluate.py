"""Metrics of an exported model on one split (the test split is used here once, never while tuning).

Counting is ordinal, so besides accuracy and balanced accuracy it reports how far off the count is: MAE,
RMSE and the share within one item. The confusion matrix is written in the metadata shape of KFP's
`ClassificationMetrics` artifact (`{"confusionMatrix": {"annotationSpecs": …, "rows": …}}`), so a pipeline
component can log it as is, and as a PNG.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from bincount.config import EvaluateConfig
from bincount.data.dataset import BinImages, ImageCache, load_split
from bincount.errors import ConfigError
from bincount.store import open_store
from bincount.train import distributed, presets
from bincount.train.models import load_exported

PREFETCH_WORKERS = 16


@dataclass
class EvalResult:
    out: str
    metrics: dict

    def summary(self) -> str:
        m = self.metrics
        return (f"{m['split']} split of {m['dataset']}, {m['samples']} images: accuracy {m['accuracy']:.4f} "
                f"(balanced {m['balanced_accuracy']:.4f}), within one item {m['within_one_accuracy']:.4f}, "
                f"MAE {m['mae']:.4f}, RMSE {m['rmse']:.4f}; written to {self.out}")


def report_prefix(run: str) -> str:
    """Where a run's evaluation goes when the caller does not choose (`bincount pipeline`)."""
    return f"reports/{run}/evaluation"


def evaluate(cfg: EvaluateConfig) -> EvalResult:
    if cfg.batch_size < 1:
        raise ConfigError(f"evaluate: batch_size must be at least 1, got {cfg.batch_size}")
    device = distributed.pick_device(cfg.device)
    model, meta = load_exported(cfg.model, cfg.store)
    classes = meta["classes"]
    store = open_store(cfg.store)
    items = load_split(store, cfg.dataset, cfg.split, classes)
    cache = ImageCache(store, cfg.cache_dir, meta["config"]["cache_size"])
    cache.fill([item.key for item in items], PREFETCH_WORKERS)
    images = BinImages(items, cache, presets.eval_transform(meta["input_size"]), classes)
    predicted = predict(model.to(device), images, cfg.batch_size, max(0, cfg.workers), device)
    metrics = {"dataset": cfg.dataset, "split": cfg.split, "model": cfg.model, "arch": meta["arch"],
               **compute_metrics([classes[t] for t in images.targets], [classes[p] for p in predicted], classes)}
    out = open_store(cfg.out)
    out.check(write=True)
    out.put_text("metrics.json", json.dumps(metrics, indent=2) + "\n")
    out.put_text("confusion_matrix.json", json.dumps(kfp_confusion_matrix(classes, metrics["confusion_matrix"]),
                                                     indent=2) + "\n")
    out.put("confusion_matrix.png", confusion_png(classes, metrics["confusion_matrix"]))
    return EvalResult(out.uri, metrics)


@torch.no_grad()
def predict(model: torch.nn.Module, images: BinImages, batch_size: int, workers: int,
            device: torch.device) -> list[int]:
    model.eval()
    out: list[int] = []
    for x, _ in DataLoader(images, batch_size=batch_size, num_workers=workers):
        out += model(presets.to_input(x, device, channels_last=False)).argmax(1).tolist()
    return out


def compute_metrics(truth: Sequence[int], predicted: Sequence[int], classes: Sequence[int]) -> dict:
    """All metrics from (true count, predicted count) pairs; per-class values for every class in `classes`."""
    n = len(truth)
    index = {c: i for i, c in enumerate(classes)}
    matrix = [[0] * len(classes) for _ in classes]
    for t, p in zip(truth, predicted):
        matrix[index[t]][index[p]] += 1
    per_class = {}
    for i, c in enumerate(classes):
        support = sum(matrix[i])
        predicted_as = sum(row[i] for row in matrix)
        precision = matrix[i][i] / predicted_as if predicted_as else 0.0
        recall = matrix[i][i] / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[str(c)] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    present = [v for v in per_class.values() if v["support"]]
    errors = [p - t for t, p in zip(truth, predicted)]
    return {
        "samples": n,
        "accuracy": sum(matrix[i][i] for i in range(len(classes))) / n,
        "balanced_accuracy": sum(v["recall"] for v in present) / len(present),
        "macro_f1": sum(v["f1"] for v in present) / len(present),
        "mae": sum(abs(e) for e in errors) / n,
        "rmse": math.sqrt(sum(e * e for e in errors) / n),
        "within_one_accuracy": sum(abs(e) <= 1 for e in errors) / n,
        "per_class": per_class,
        "confusion_matrix": matrix,
    }


def kfp_confusion_matrix(classes: Sequence[int], matrix: Sequence[Sequence[int]]) -> dict:
    return {"confusionMatrix": {"annotationSpecs": [{"displayName": str(c)} for c in classes],
                                "rows": [{"row": list(row)} for row in matrix]}}


def confusion_png(classes: Sequence[int], matrix: Sequence[Sequence[int]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(matrix, cmap="Blues")
    top = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > top / 2 else "black")
    ticks = range(len(classes))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=classes, yticklabels=classes,
           xlabel="predicted count", ylabel="true count", title="confusion matrix")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
