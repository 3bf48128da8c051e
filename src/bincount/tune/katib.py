"""The kubernetes backend of `bincount tune`: the search space as a Katib Experiment whose trials are the cluster's
training job (PyTorchJobs, or Trainer v2 TrainJobs).

Creates the typed Experiment (or follows the one of that name, if it is the same search), prints each change of
the Experiment and of its Trials until it ends, then writes the outputs local tuning writes: best.json from
`status.currentOptimalTrial`, trials.csv and the report from the Trial objects, read as kubeflow-katib-api's typed
`V1beta1Experiment` and `V1beta1Trial`. Katib reports each metric's min, max and latest; a trial's value is the
objective's max (maximize) or min (minimize), Katib's default metric strategy, which is also how the local twin
scores a trial.

The kubeflow SDK's optimizer API (`OptimizerClient`, 0.5) is not used, because it cannot express this search:
- create: `optimize()` builds its own Experiment from a `TrainJobTemplate` whose trainer is a Python function (it
  fills the function's arguments from the parameters) under a generated name; it cannot run our container's
  command with the parameters as its flags, PyTorchJob trials, the StdOut collector's metric format, median
  stopping, a goal or algorithm settings, nor follow an Experiment by its name.
- watch: `get_job()` and `wait_for_job_status()` read the algorithm only as random or grid (tuning.yaml's default
  is tpe) and a parameter only as categorical or min/max (not discrete), and look up every trial as a TrainJob, so a
  PyTorchJob trial fails the read.
- best trial: `get_best_results()` returns the parameters and metrics without the trial's name, and first reads
  the best trial's TrainJob, which Katib has deleted once the trial finished unless the template retains it.
"""

from __future__ import annotations

import time
from typing import Any

from kubeflow_katib_api.models import V1beta1Experiment, V1beta1Observation, V1beta1Trial

from bincount.config import ClusterConfig, TuneJob
from bincount.errors import ConfigError
from bincount.k8s.launch import EXPERIMENT, TRIAL, Cluster, JobFailed, LaunchTimeout, NotFound
from bincount.k8s.resources import as_dict
from bincount.store import open_store
from bincount.tune import results
from bincount.tune.results import Progress, TrialRecord, TuneResult, say
from bincount.tune.space import SearchSpace, load_space, require_dataset, text

EXPERIMENT_LABEL = "katib.kubeflow.org/experiment"
TRIAL_STATES = {"Succeeded": results.SUCCEEDED, "EarlyStopped": results.EARLY_STOPPED, "Failed": results.FAILED,
                "MetricsUnavailable": results.FAILED, "Killed": results.KILLED}


def run_katib(job: TuneJob, cluster: Cluster | None = None, progress: Progress = say) -> TuneResult:
    space = load_space(job.space or None)
    name = job.experiment or space.name
    if not job.store.startswith("s3://"):
        raise ConfigError(f"the kubernetes backend needs an s3:// store that the trial pods reach (the cluster's "
                          f"MinIO is {ClusterConfig().store}), got {job.store!r}")
    store = open_store(job.store)
    require_dataset(store, job.dataset)
    cluster = cluster or Cluster.connect(ClusterConfig())
    body = as_dict(space.render(name, job.store, job.dataset, cluster.config))
    try:
        existing = cluster.get(EXPERIMENT, name)
    except NotFound:
        cluster.create(body)
        progress(f"created Experiment {name} in namespace {cluster.namespace}")
    else:
        if _search(existing) != _search(body):
            raise ConfigError(f"Experiment {name} already exists in namespace {cluster.namespace} with another "
                              f"search (objective or parameters differ); delete it (`kubectl -n "
                              f"{cluster.namespace} delete experiments.kubeflow.org {name}`) or use --experiment")
        progress(f"following the existing Experiment {name}")
    final = _follow(cluster, name, space, job, progress)
    trials = [trial_record(space, t) for t in cluster.list(TRIAL, f"{EXPERIMENT_LABEL}={name}")]
    result = TuneResult(name, "kubernetes", space, trials,
                        optimal_trial(space, V1beta1Experiment.from_dict(final), trials),
                        store.url(results.prefix(name)))
    results.write(store, result)
    state = EXPERIMENT.state(final)
    if state.failed:
        raise JobFailed(f"Experiment {name} failed: {state.message or 'no reason given'}; trials in "
                        f"{result.location}/trials.csv\n{result.table()}")
    return result


def _search(experiment: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two Experiments the same search, as Katib stores it: its webhook gives every parameter
    without a distribution the uniform one."""
    spec = experiment.get("spec") or {}
    objective = spec.get("objective") or {}
    parameters = [(p.get("name"), p.get("parameterType"),
                   sorted({"distribution": "uniform", **(p.get("feasibleSpace") or {})}.items()))
                  for p in spec.get("parameters") or []]
    return objective.get("objectiveMetricName"), objective.get("type"), parameters


def _follow(cluster: Cluster, name: str, space: SearchSpace, job: TuneJob, progress: Progress) -> dict[str, Any]:
    """Polls the Experiment and its Trials, saying what changed, until the Experiment succeeds or fails."""
    deadline = time.monotonic() + job.timeout if job.timeout > 0 else None
    last, seen = "", {}
    while True:
        obj = cluster.get(EXPERIMENT, name)
        state = EXPERIMENT.state(obj)
        if state.summary != last:
            progress(f"Experiment {name}: {state.summary}")
            last = state.summary
        for trial in cluster.list(TRIAL, f"{EXPERIMENT_LABEL}={name}"):
            record = trial_record(space, trial)
            if seen.get(record.name) != record.state:
                seen[record.name] = record.state
                progress(_trial_line(space, record))
        if state.done:
            return obj
        if deadline is not None and time.monotonic() >= deadline:
            raise LaunchTimeout(f"Experiment {name} did not finish within {job.timeout:g} s (last state: "
                                f"{state.summary}); it goes on in the cluster: rerun the command to follow it again")
        time.sleep(job.poll)


def _trial_line(space: SearchSpace, record: TrialRecord) -> str:
    settings = ", ".join(f"{k}={text(v)}" for k, v in record.parameters.items())
    value = "" if record.value is None else f" {space.objective.metric}={record.value:g}"
    why = f" ({record.message})" if record.message else ""
    return f"trial {record.name}: {record.state}{value} [{settings}]{why}"


def _metrics(observation: V1beta1Observation | None) -> dict[str, dict[str, float]]:
    """Katib's observed metrics, {name: {min, max, latest}}, leaving out values it could not read."""
    out: dict[str, dict[str, float]] = {}
    for metric in (observation and observation.metrics) or []:
        for key in ("min", "max", "latest"):
            try:
                out.setdefault(metric.name, {})[key] = float(getattr(metric, key))
            except (TypeError, ValueError):
                pass
    return out


def _value(space: SearchSpace, metrics: dict[str, dict[str, float]]) -> float | None:
    return metrics.get(space.objective.metric, {}).get("max" if space.objective.goal == "maximize" else "min")


def _assignments(space: SearchSpace, assignments: list[Any] | None) -> dict[str, Any]:
    return space.typed_parameters({a.name: a.value for a in assignments or []})


def _latest(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    return {k: v["latest"] for k, v in metrics.items() if "latest" in v}


def trial_record(space: SearchSpace, obj: dict[str, Any]) -> TrialRecord:
    trial = V1beta1Trial.from_dict(obj)
    status = trial.status
    true = [c for c in (status and status.conditions) or [] if c.status == "True"]
    last = true[-1] if true else None
    state = TRIAL_STATES.get(last.type if last else "", results.RUNNING)
    metrics = _metrics(status and status.observation)
    seconds = None
    if status and status.start_time and status.completion_time:
        seconds = (status.completion_time - status.start_time).total_seconds()
    message = "" if state == results.SUCCEEDED or not last else (last.message or last.reason or "")
    return TrialRecord(trial.metadata.name, state, _assignments(space, trial.spec and trial.spec.parameter_assignments),
                       _value(space, metrics), _latest(metrics), seconds, message)


def optimal_trial(space: SearchSpace, experiment: V1beta1Experiment, trials: list[TrialRecord]) -> TrialRecord | None:
    """The Experiment's own verdict, `status.currentOptimalTrial`: its name, assignments and observation."""
    optimal = experiment.status and experiment.status.current_optimal_trial
    if not (optimal and optimal.best_trial_name):
        return None
    name = optimal.best_trial_name
    metrics = _metrics(optimal.observation)
    state = next((t.state for t in trials if t.name == name), results.SUCCEEDED)
    return TrialRecord(name, state, _assignments(space, optimal.parameter_assignments), _value(space, metrics),
                       _latest(metrics), next((t.seconds for t in trials if t.name == name), None))
