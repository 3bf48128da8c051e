"""The training report (what the seed got from SageMaker Debugger and Profiler): per-epoch step-time statistics
with outliers, the share of time spent waiting for data, loss-plateau and overfitting flags, and curves.

Written to `reports/<run>/train/` (report.json, curves.png, and trace.json when profiling).
"""

from __future__ import annotations

import io
import json
import statistics
import time
from collections.abc import Sequence

from bincount.store import Store

PLATEAU_EPOCHS = 3
PLATEAU_CHANGE = 0.01
OVERFIT_EPOCHS = 3


def report_prefix(run: str) -> str:
    return f"reports/{run}/train"


class EpochTimer:
    """Splits an epoch's wall time into waiting for the next batch and computing the step."""

    def __init__(self) -> None:
        self.start = self._mark = time.perf_counter()
        self.steps: list[float] = []
        self.waits: list[float] = []

    def batch_ready(self) -> None:
        now = time.perf_counter()
        self.waits.append(now - self._mark)
        self._mark = now

    def step_done(self) -> None:
        now = time.perf_counter()
        self.steps.append(now - self._mark)
        self._mark = now

    def stats(self) -> dict[str, float]:
        total = time.perf_counter() - self.start
        mean = statistics.fmean(self.steps) if self.steps else 0.0
        std = statistics.pstdev(self.steps) if len(self.steps) > 1 else 0.0
        return {
            "epoch_time_s": round(total, 4),
            "step_time_mean_s": round(mean, 5),
            "step_time_std_s": round(std, 5),
            "step_time_max_s": round(max(self.steps, default=0.0), 5),
            "step_outliers": sum(1 for s in self.steps if s > mean + 3 * std),
            "data_wait_share": round(sum(self.waits) / total, 4) if total > 0 else 0.0,
        }


def flags(history: Sequence[dict]) -> list[str]:
    """Warnings a user should act on: a flat training loss, or validation loss rising while training falls."""
    out = []
    if len(history) > PLATEAU_EPOCHS:
        before, now = history[-PLATEAU_EPOCHS - 1]["train_loss"], history[-1]["train_loss"]
        if abs(before - now) < PLATEAU_CHANGE * abs(before):
            out.append(f"loss plateau: train loss changed by less than {PLATEAU_CHANGE:.0%} over epochs "
                       f"{history[-PLATEAU_EPOCHS - 1]['epoch']} to {history[-1]['epoch']}")
    if len(history) >= OVERFIT_EPOCHS:
        recent = history[-OVERFIT_EPOCHS:]
        val_up = all(b["val_loss"] > a["val_loss"] for a, b in zip(recent, recent[1:]))
        train_down = all(b["train_loss"] < a["train_loss"] for a, b in zip(recent, recent[1:]))
        if val_up and train_down:
            out.append(f"overfitting: validation loss rose while training loss fell over epochs "
                       f"{recent[0]['epoch']} to {recent[-1]['epoch']}")
    return out


def write(store: Store, run: str, history: Sequence[dict]) -> None:
    prefix = report_prefix(run)
    store.put_text(f"{prefix}/report.json", json.dumps({"run": run, "flags": flags(history),
                                                        "epochs": list(history)}, indent=2) + "\n")
    store.put(f"{prefix}/curves.png", _curves(history))


def _curves(history: Sequence[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val"):
        loss_ax.plot(epochs, [h[f"{split}_loss"] for h in history], marker="o", label=split)
        acc_ax.plot(epochs, [h[f"{split}_accuracy"] for h in history], marker="o", label=split)
    loss_ax.set(title="loss", xlabel="epoch")
    acc_ax.set(title="accuracy", xlabel="epoch", ylim=(0, 1))
    for ax in (loss_ax, acc_ax):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
