"""`bincount pipeline run`: the compiled pipeline's very graph, run on this machine by kfp.local.

kfp.local's SubprocessRunner runs each step in a subprocess of this interpreter (no venv, no network), with the
local backend: torchrun for trials and training, optuna for the search, a ModelServer process for the endpoint,
which stays up after the run. The quick-start defaults finish in minutes on two cores; every pipeline parameter
is a flag, so the same command scales to the real ABID subset.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bincount.errors import BincountError, ConfigError
from bincount.kfp.console import showing_steps
from bincount.kfp.stages import STAGE_ERRORS_ENV

# The local run's defaults where they differ from the pipeline's (which are a cluster's): synthetic bins into a
# local store, the quickstart recipe (resnet18 from scratch at 128 px), a short search.
QUICKSTART: dict[str, Any] = {
    "source": "synthetic", "images": 1500, "store": "bincount-data", "dataset": "quickstart",
    "balance": "undersample", "recipe": "quickstart", "space": "quickstart.yaml", "trials": 2,
    "parallel_trials": 1, "trial_epochs": 2, "workers": 1, "gpus_per_worker": 0, "backend": "local",
}
PIPELINE_ROOT = "local_outputs"                 # kfp.local's own default: where each step's artifacts land
LOG_FILE = "pipeline.log"                       # in the run's folder under PIPELINE_ROOT: all of kfp.local's output


class PipelineFailed(BincountError):
    """A step failed; the message names it and gives its reason."""


def parameters() -> dict[str, Any]:
    """Every pipeline parameter with its local default."""
    from bincount.kfp.pipeline import bin_counting

    return {name: QUICKSTART.get(name, spec.default) for name, spec in bin_counting.component_spec.inputs.items()}


@dataclass
class PipelineRun:
    arguments: dict[str, Any]
    outputs: dict[str, Any]
    seconds: float
    log: Path

    def summary(self) -> str:
        a, o = self.arguments, self.outputs
        splits, best, model = o["splits"].metadata, _json(o["best"]), o["model"].metadata
        test, deployment = o["test_metrics"].metadata, json.loads(o["deployment"])
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in best["parameters"].items())
        objective = best["objective"]
        lines = [
            f"pipeline finished in {self.seconds / 60:.1f} min on the {a['backend']} backend; store {splits['store']}",
            f"  data        {a['images']} {a['source']} images → dataset {splits['dataset']}: "
            f"train {splits['train']:.0f}, val {splits['val']:.0f}, test {splits['test']:.0f}",
            f"  EDA report  {o['eda'].metadata['uri']}",
            f"  tuning      {a['trials']} trials, best {params}: {objective['metric']} {objective['value']:.4f} "
            f"({o['best'].metadata['location']})",
            f"  model       {model['store_uri']} ({model['arch']}, {model['input_size']:.0f} px, best epoch "
            f"{model['best_epoch']:.0f} of {model['epochs']:.0f})",
            f"  test        accuracy {test['accuracy']:.4f}, balanced {test['balanced_accuracy']:.4f}, within one "
            f"item {test['within_one_accuracy']:.4f}, MAE {test['mae']:.3f} ({test['samples']:.0f} images)",
            f"  reports     {model['reports']} (training curves and step times, test metrics, confusion matrix)",
        ]
        gate = o["gate"].metadata
        lines.append(f"  gate        {gate['decision']} (report {o['gate'].path})")
        if deployment["deployed"]:
            lines += [f"  endpoint    {deployment['predict_url']}",
                      f"              open {deployment['url']}/ to count the items in a photo; "
                      f"stop the server with: {deployment['stop']}"]
        else:
            keeps = f"; champion {gate['champion']} keeps serving" if gate.get("champion") else ""
            lines.append(f"  not deployed{keeps}")
        lines.append(f"  artifacts   {Path(o['model'].path).parent.parent}")
        lines.append(f"  log         {self.log} (every step's whole output; --verbose shows it as it runs)")
        return "\n".join(lines)


def _json(artifact: Any) -> dict[str, Any]:
    return json.loads(Path(artifact.path).read_text())


def run(arguments: Mapping[str, Any], pipeline_root: str = PIPELINE_ROOT, verbose: bool = False) -> PipelineRun:
    """The pipeline, to its end or its first failed step, showing one line per step (`console`), or all of
    kfp.local's output with `verbose`; the whole output goes to `pipeline.log` in the run's folder."""
    from kfp import local

    from bincount.kfp.pipeline import bin_counting

    defaults = parameters()
    unknown = set(arguments) - set(defaults)
    if unknown:
        raise ConfigError(f"unknown pipeline parameter(s): {', '.join(sorted(unknown))}")
    args = {**defaults, **arguments}
    if "://" not in args["store"]:
        args["store"] = str(Path(args["store"]).resolve())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root)
    root = Path(pipeline_root)
    root.mkdir(parents=True, exist_ok=True)
    earlier, log_path = set(root.iterdir()), root / f"pipeline-{os.getpid()}.log"
    start, failure = time.monotonic(), None
    with tempfile.TemporaryDirectory(prefix="bincount-pipeline-") as errors, _env(STAGE_ERRORS_ENV, errors), \
            open(log_path, "w") as log, showing_steps(log, verbose):
        # kfp.local warns about every base image without "python" in its name; ours carries Python
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        try:
            task = bin_counting(**args)
        except RuntimeError as e:
            failure = _failure(Path(errors), e)
    log_path = _keep_log(root, earlier, log_path)
    if failure is not None:
        print(f"full log: {log_path}", flush=True)
        raise PipelineFailed(failure)
    return PipelineRun(args, dict(task.outputs), time.monotonic() - start, log_path)


def _failure(errors: Path, error: RuntimeError) -> str:
    """The failed step's own message when it left one, else kfp's (the step's output is in the full log)."""
    reports = sorted(errors.glob("*.txt"))
    if not reports:
        return f"{error} (the step's output is in the full log)"
    return "; ".join(f"pipeline step {p.stem.replace('_', '-')} failed: {p.read_text()}" for p in reports)


def _keep_log(root: Path, earlier: set[Path], log: Path) -> Path:
    """The log moves into the run's own folder: the one folder kfp.local made under `root` during the run."""
    made = [p for p in root.iterdir() if p.is_dir() and p not in earlier]
    return log.rename(made[0] / LOG_FILE) if len(made) == 1 else log


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
