"""Metrics of an exported model on one split (the test split is used here once, never while tuning).

The model predicts exactly as it is served: its own preprocessing, test-time augmentation, calibration and
decoding, from `model.json` (`bincount.model.exported`). Besides the counting metrics (`bincount.metrics`) it
reports whether the probabilities are calibrated, and every image's count and probabilities
(predictions.jsonl, in the shape of the endpoint's V1 answer). The confusion matrix is written in the metadata shape of KFP's
`ClassificationMetrics` artifact (`{"confusionMatrix": {"annotationSpecs": …, "rows": …}}`), so a pipeline
component can log it as is, and as a PNG.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from bincount import metrics as measures
from bincount.config import EvaluateConfig
from bincount.data import shards
from bincount.data.dataset import BinImages, ImageCache, load_split, map_in_order
from bincount.devices import pick_device
from bincount.errors import ConfigError
from bincount.model.exported import ExportedModel, Predictor
from bincount.store import open_store

PREFETCH_WORKERS = 16


@dataclass
class EvalResult:
    out: str
    metrics: dict

    def summary(self) -> str:
        m = self.metrics
        return (f"{m['split']} split of {m['dataset']}, {m['samples']} images: accuracy {m['accuracy']:.4f} "
                f"(balanced {m['balanced_accuracy']:.4f}), within one item {m['within_one_accuracy']:.4f}, "
                f"MAE {m['mae']:.4f}, RMSE {m['rmse']:.4f}, calibration error {m['ece']:.4f}; written to {self.out}")


def report_prefix(run: str) -> str:
    """Where a run's evaluation goes when the caller does not choose (`bincount pipeline`)."""
    return f"reports/{run}/evaluation"


@dataclass
class Scored:
    """One exported model's answers on every photo of a split, in the order it read them: what evaluate reports
    and the promotion gate compares."""

    model: ExportedModel
    keys: list[str]
    labels: list[int]
    probabilities: torch.Tensor                 # calibrated, [photos, classes]
    counts: list[int]


def score(cfg: EvaluateConfig, model: ExportedModel | None = None) -> Scored:
    """`cfg.model` (or the loaded `model`) on `cfg.split` of `cfg.dataset`: from the split's shards where they
    match the model's input size, else through the image cache."""
    if cfg.batch_size < 1:
        raise ConfigError(f"evaluate: batch_size must be at least 1, got {cfg.batch_size}")
    device = pick_device(cfg.device)
    model = model or ExportedModel.load(cfg.model, cfg.store)
    classes = model.classes
    store = open_store(cfg.store)
    items = load_split(store, cfg.dataset, cfg.split, classes)
    index, _ = shards.choose(store, cfg.dataset, cfg.split, items, model.preprocessing.size, cfg.data)
    if index is not None:
        items = index.items()
        images = shards.ShardStream(cfg.store, index, classes, batch_size=cfg.batch_size, ordered=True)
    else:
        cache = ImageCache(store, cfg.cache_dir, model.preprocessing.size)
        cache.fill([item.key for item in items], PREFETCH_WORKERS)
        images = BinImages(items, cache, classes)
    predictor = model.predictor(device, cfg.precision)
    log_probs, targets = predict_log_probs(predictor, images, cfg.batch_size, max(0, cfg.workers),
                                           f"score {cfg.model} on {cfg.split}")
    probabilities = predictor.calibrate(log_probs)
    return Scored(model, [item.key for item in items], [classes[t] for t in targets.tolist()], probabilities,
                  model.counts(probabilities))


def evaluate(cfg: EvaluateConfig) -> EvalResult:
    scored = score(cfg)
    model, classes = scored.model, scored.model.classes
    targets = torch.tensor([classes.index(label) for label in scored.labels])
    metrics = {"dataset": cfg.dataset, "split": cfg.split, "model": cfg.model, "arch": model.arch,
               "inference": model.describe()["inference"],
               **measures.counting(scored.labels, scored.counts, classes),
               **measures.calibration(scored.probabilities, targets)}
    out = open_store(cfg.out)
    out.check(write=True)
    out.put_text("metrics.json", json.dumps(metrics, indent=2) + "\n")
    out.put_text("confusion_matrix.json", json.dumps(kfp_confusion_matrix(classes, metrics["confusion_matrix"]),
                                                     indent=2) + "\n")
    out.put("confusion_matrix.png", confusion_png(classes, metrics["confusion_matrix"]))
    out.put_text("predictions.jsonl", "".join(
        json.dumps({"key": key, "label": label, "count": count,
                    "probabilities": dict(zip(map(str, classes), row))}) + "\n"
        for key, label, count, row in zip(scored.keys, scored.labels, scored.counts, scored.probabilities.tolist())))
    return EvalResult(out.uri, metrics)


def predict_log_probs(predictor: Predictor, images: Dataset, batch_size: int, workers: int,
                      desc: str = "score") -> tuple[torch.Tensor, torch.Tensor]:
    """The predictor's uncalibrated log-probabilities for every image, in order, and the images' class indices."""
    return map_in_order(images, batch_size, workers, predictor.log_probs, desc)


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
