"""What a search leaves in `tuning/<experiment>/`, the same from both backends: best.json, trials.csv, and
report/ (report.md, optimization_history.png, param_importances.png).

Both backends describe their trials as `TrialRecord`s; everything below is computed from those, so a Katib
Experiment and an optuna study of the same space give files of one shape.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bincount.store import Store
from bincount.tune.space import SearchSpace, text

Progress = Callable[[str], None]
SUCCEEDED, EARLY_STOPPED, FAILED, KILLED, INTERRUPTED, RUNNING = (
    "succeeded", "early-stopped", "failed", "killed", "interrupted", "running")
BEST_FILE, TRIALS_FILE, REPORT_DIR = "best.json", "trials.csv", "report"


def say(line: str) -> None:
    """Both backends' progress: one line per change, on stderr (stdout gets the trial table)."""
    print(f"bincount tune: {line}", file=sys.stderr, flush=True)


def prefix(experiment: str) -> str:
    return f"tuning/{experiment}"


@dataclass(frozen=True)
class TrialRecord:
    """One trial as both backends see it. `value` is the objective by its goal over the trial's epochs (Katib's
    default metric strategy); `metrics` holds the latest value of every metric."""

    name: str                                   # the trainer's run id: a local run or a Katib Trial
    state: str
    parameters: dict[str, Any]
    value: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None
    message: str = ""


@dataclass
class TuneResult:
    experiment: str
    backend: str
    space: SearchSpace
    trials: list[TrialRecord]
    best: TrialRecord | None
    location: str                               # the store URL of tuning/<experiment>/

    def table(self) -> str:
        """The trials as an aligned text table, best first by the objective, unfinished last."""
        metric = self.space.objective.metric
        names = [p.name for p in self.space.parameters]
        header = ["trial", "state", metric, *names, "seconds"]
        sign = -1 if self.space.objective.goal == "maximize" else 1
        ordered = sorted(self.trials, key=lambda t: (t.value is None, sign * (t.value or 0.0), t.name))
        rows = [[t.name + (" *" if self.best and t.name == self.best.name else ""), t.state,
                 "-" if t.value is None else f"{t.value:.4f}",
                 *(_short(t.parameters[n]) if n in t.parameters else "-" for n in names),
                 "-" if t.seconds is None else f"{t.seconds:.1f}"] for t in ordered]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])

    def summary(self) -> str:
        counts = {s: sum(t.state == s for t in self.trials) for s in (SUCCEEDED, EARLY_STOPPED, FAILED)}
        done = ", ".join(f"{n} {s}" for s, n in counts.items())
        if self.best is None:
            return f"experiment {self.experiment} ({self.backend}): {done}; no trial succeeded; see {self.location}"
        settings = ", ".join(f"{k}={text(v)}" for k, v in self.best.parameters.items())
        return (f"experiment {self.experiment} ({self.backend}): {done}; best {self.best.name} with "
                f"{self.space.objective.metric}={self.best.value:.4f} ({settings}); outputs in {self.location}")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else text(value)


def best_of(space: SearchSpace, trials: Sequence[TrialRecord]) -> TrialRecord | None:
    done = [t for t in trials if t.state == SUCCEEDED and t.value is not None]
    if not done:
        return None
    value = space.objective.best([t.value for t in done])
    return next(t for t in done if t.value == value)


def write(store: Store, result: TuneResult) -> None:
    """best.json (when a trial succeeded), trials.csv and the report; each write atomic."""
    where = prefix(result.experiment)
    store.put_text(f"{where}/{TRIALS_FILE}", trials_csv(result.space, result.trials))
    if result.best is not None:
        store.put_text(f"{where}/{BEST_FILE}", json.dumps(best_json(result), indent=2) + "\n")
    _report(store, f"{where}/{REPORT_DIR}", result)


def best_json(result: TuneResult) -> dict[str, Any]:
    """The best trial, and the trainer settings that reproduce it (`train`: fixed settings + its parameters)."""
    best, objective = result.best, result.space.objective
    return {"experiment": result.experiment, "backend": result.backend,
            "objective": {"metric": objective.metric, "goal": objective.goal, "value": best.value},
            "trial": best.name, "parameters": best.parameters, "metrics": best.metrics,
            "train": result.space.settings(best.parameters)}


def trials_csv(space: SearchSpace, trials: Sequence[TrialRecord]) -> str:
    names = [p.name for p in space.parameters]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["trial", "state", "objective", *names, *space.metrics, "seconds", "message"])
    for t in trials:
        writer.writerow([t.name, t.state, "" if t.value is None else t.value,
                         *(text(t.parameters[n]) if n in t.parameters else "" for n in names),
                         *(t.metrics.get(m, "") for m in space.metrics),
                         "" if t.seconds is None else round(t.seconds, 3), t.message])
    return out.getvalue()


def _report(store: Store, where: str, result: TuneResult) -> None:
    """Plots made by optuna from an in-memory study of the succeeded trials, whichever backend ran them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as plots

    space = result.space
    distributions = space.distributions()
    study = optuna.create_study(direction=space.objective.goal)
    for t in result.trials:
        if t.state == SUCCEEDED and t.value is not None:
            study.add_trial(optuna.trial.create_trial(params=t.parameters, distributions=distributions,
                                                      value=t.value, user_attrs={"name": t.name}))
    lines = [f"# Tuning report: {result.experiment}", "",
             f"Backend: {result.backend}. Objective: {space.objective.goal} {space.objective.metric}. "
             f"Algorithm: {space.algorithm}. Trials: {len(result.trials)} of {space.max_trials}.", "",
             "```", result.table(), "```", ""]
    metric = space.objective.metric
    figures = {"optimization_history.png": lambda: plots.plot_optimization_history(study, target_name=metric),
               "param_importances.png": lambda: plots.plot_param_importances(study, target_name=metric)}
    minimum = {"optimization_history.png": 1, "param_importances.png": 2}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")             # optuna marks its matplotlib plots experimental
        for name, plot in figures.items():
            if len(study.trials) < minimum[name]:
                lines.append(f"{name}: needs {minimum[name]} succeeded trial(s), got {len(study.trials)}.")
                continue
            axes = plot()
            axes.figure.set_size_inches(8, 5)
            axes.figure.tight_layout()
            path = Path(tmp) / name
            axes.figure.savefig(path, dpi=100)
            plt.close(axes.figure)
            store.put_file(f"{where}/{name}", path)
            lines.append(f"![{name}]({name})")
    store.put_text(f"{where}/report.md", "\n".join(lines) + "\n")
