"""The Katib Experiment, as kubeflow-katib-api's typed `V1beta1Experiment`: the search space's parameters, objective,
algorithm and early stopping, and a trial template that is the cluster's training job (a PyTorchJob or a TrainJob,
from the builders in `training.py`) whose metrics Katib's StdOut collector reads from rank 0's stdout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kubeflow_katib_api import models as katib

from bincount.config import ClusterConfig, JobResources
from bincount.errors import ConfigError
from bincount.k8s.conventions import METRICS_FORMAT, RUN_FLAG, labels
from bincount.k8s.training import training_api

API_VERSION = "kubeflow.org/v1beta1"
PARAMETER_TYPES = ("double", "int", "categorical", "discrete")
DISTRIBUTIONS = ("uniform", "logUniform", "normal", "logNormal")
TRIAL_NAME = "trialName"


@dataclass(frozen=True)
class SearchParameter:
    """One search dimension in Katib's vocabulary, and the trainer flag its value is passed to."""

    name: str
    type: str
    flag: str
    min: str | None = None
    max: str | None = None
    step: str | None = None
    values: tuple[str, ...] = ()
    distribution: str | None = None

    def __post_init__(self) -> None:
        where = f"search parameter {self.name!r}"
        if self.type not in PARAMETER_TYPES:
            raise ConfigError(f"{where}: type {self.type!r} is not one of {', '.join(PARAMETER_TYPES)}")
        ranged = self.type in ("double", "int")
        if ranged and (self.min is None or self.max is None or self.values):
            raise ConfigError(f"{where}: a {self.type} parameter takes min and max, not a list of values")
        if not ranged and (not self.values or self.min is not None or self.max is not None):
            raise ConfigError(f"{where}: a {self.type} parameter takes a list of values, not min/max")
        if self.distribution is not None and self.distribution not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: distribution {self.distribution!r} is not one of {', '.join(DISTRIBUTIONS)}")
        if not self.flag.startswith("--"):
            raise ConfigError(f"{where}: flag {self.flag!r} must be a trainer option such as --lr")

    def katib(self) -> katib.V1beta1ParameterSpec:
        space = katib.V1beta1FeasibleSpace(min=self.min, max=self.max, step=self.step, list=list(self.values) or None,
                                           distribution=self.distribution)
        return katib.V1beta1ParameterSpec(name=self.name, parameter_type=self.type, feasible_space=space)


@dataclass(frozen=True)
class ExperimentSpec:
    """What a Katib Experiment needs, independent of where the search space came from (tuning.yaml fills it).

    Each trial runs the trainer with `trial_args`, then `flag value` per parameter, then `--run-id <trial name>`.
    """

    name: str
    objective: str
    parameters: tuple[SearchParameter, ...]
    trial_args: tuple[str, ...]
    resources: JobResources
    goal_type: str = "maximize"
    goal: float | None = None
    additional_metrics: tuple[str, ...] = ()
    algorithm: str = "tpe"
    algorithm_settings: Mapping[str, str] = field(default_factory=dict)
    max_trials: int = 8
    parallel_trials: int = 2
    max_failed_trials: int = 3
    early_stopping: str | None = None
    early_stopping_settings: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"experiment {self.name!r}"
        if self.goal_type not in ("maximize", "minimize"):
            raise ConfigError(f"{where}: goal type {self.goal_type!r} must be maximize or minimize")
        if not self.parameters:
            raise ConfigError(f"{where}: the search space has no parameters")
        names = [p.name for p in self.parameters]
        duplicates = sorted({n for n in names if names.count(n) > 1} | ({TRIAL_NAME} & set(names)))
        if duplicates:
            raise ConfigError(f"{where}: parameter name(s) used twice or reserved: {', '.join(duplicates)}")
        if {"--run", RUN_FLAG} & set(self.trial_args):
            raise ConfigError(f"{where}: trial_args must not set --run or {RUN_FLAG}; every trial runs under its "
                              "own name")
        if not 1 <= self.parallel_trials <= self.max_trials:
            raise ConfigError(f"{where}: need 1 <= parallel_trials ({self.parallel_trials}) <= max_trials "
                              f"({self.max_trials})")
        if self.max_failed_trials < 0:
            raise ConfigError(f"{where}: max_failed_trials must not be negative")


def condition(kind: str) -> str:
    """Katib's GJSON test of a trial job's condition."""
    return f'status.conditions.#(type=="{kind}")#|#(status=="True")#'


def experiment(spec: ExperimentSpec, cluster: ClusterConfig | None = None) -> katib.V1beta1Experiment:
    """A Katib Experiment whose trials are the cluster's training job (`cluster.training_api`), built like the
    training job itself. Katib 0.19 runs both kinds; its collector reads the primary container of the pod with
    the primary labels, rank 0 (the other ranks print no metric lines), and the success condition is the job's
    own (Succeeded for a PyTorchJob, Complete for a TrainJob)."""
    cluster = cluster or ClusterConfig()
    api = training_api(cluster)
    args = list(spec.trial_args)
    for p in spec.parameters:
        args += [p.flag, f"${{trialParameters.{p.name}}}"]
    args += [RUN_FLAG, f"${{trialParameters.{TRIAL_NAME}}}"]
    trial_parameters = [katib.V1beta1TrialParameterSpec(name=p.name, description=f"trainer {p.flag}",
                                                         reference=p.name) for p in spec.parameters]
    trial_parameters.append(katib.V1beta1TrialParameterSpec(
        name=TRIAL_NAME, description="trainer --run-id: each trial is its own run", reference="${trialSpec.Name}"))
    body = katib.V1beta1ExperimentSpec(
        objective=katib.V1beta1ObjectiveSpec(type=spec.goal_type, objective_metric_name=spec.objective,
                                             goal=spec.goal,
                                             additional_metric_names=list(spec.additional_metrics) or None),
        algorithm=katib.V1beta1AlgorithmSpec(
            algorithm_name=spec.algorithm,
            algorithm_settings=_settings(katib.V1beta1AlgorithmSetting, spec.algorithm_settings)),
        parallel_trial_count=spec.parallel_trials,
        max_trial_count=spec.max_trials,
        max_failed_trial_count=spec.max_failed_trials,
        metrics_collector_spec=katib.V1beta1MetricsCollectorSpec(
            collector=katib.V1beta1CollectorSpec(kind="StdOut"),
            source=katib.V1beta1SourceSpec(filter=katib.V1beta1FilterSpec(metrics_format=[METRICS_FORMAT]))),
        parameters=[p.katib() for p in spec.parameters],
        trial_template=katib.V1beta1TrialTemplate(
            primary_container_name=api.container,
            primary_pod_labels=dict(api.main_pod),
            success_condition=condition(api.succeeded),
            failure_condition=condition("Failed"),
            trial_parameters=trial_parameters,
            trial_spec=api.trial_spec(args, spec.resources, cluster)))
    if spec.early_stopping:
        body.early_stopping = katib.V1beta1EarlyStoppingSpec(
            algorithm_name=spec.early_stopping,
            algorithm_settings=_settings(katib.V1beta1EarlyStoppingSetting, spec.early_stopping_settings))
    return katib.V1beta1Experiment(
        api_version=API_VERSION, kind="Experiment",
        metadata=katib.IoK8sApimachineryPkgApisMetaV1ObjectMeta(name=spec.name, namespace=cluster.namespace,
                                                                labels=labels("tuning")),
        spec=body)


def _settings(model: type, settings: Mapping[str, str]) -> list | None:
    return [model(name=k, value=str(v)) for k, v in settings.items()] or None
