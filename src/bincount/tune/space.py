"""The search space, written once (tuning.yaml) and rendered twice: a Katib Experiment and optuna distributions.

A parameter is a trainer setting that has its own `bincount train` flag (lr, batch_size, arch, freeze, …); the
trial's fixed settings (`trial:`) may be any other TrainConfig key. Both are checked against TrainConfig when the
space loads, and the objective against the metrics the trainer prints, so a typo fails here and not in the
eighth trial on a cluster. Katib takes every number as text, optuna typed values: `katib_parameters` and
`distributions` are two views of the same `Parameter`s.
"""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

from bincount.config import (TRAIN_FLAGS, ClusterConfig, JobResources, TrainConfig, from_dict, load_config,
                             load_train_config)
from bincount.data.prepare import dataset_key
from bincount.errors import ConfigError
from bincount.store import Store

if TYPE_CHECKING:                               # the cluster SDKs load only where a cluster is used
    from kubeflow_katib_api.models import V1beta1Experiment

    from bincount.k8s.experiment import ExperimentSpec, SearchParameter

DEFAULT_SPACE = "tuning.yaml"
PARAMETER_TYPES = ("double", "int", "categorical", "discrete")
GOALS = ("maximize", "minimize")
EARLY_STOPPING = "medianstop"
# Katib's algorithm names that have a local (optuna) twin, each with the settings both sides understand.
ALGORITHMS: dict[str, tuple[str, ...]] = {
    "random": ("random_state",),
    "grid": (),
    "tpe": ("random_state", "n_startup_trials", "n_ei_candidates"),
    "multivariate-tpe": ("random_state", "n_startup_trials", "n_ei_candidates"),
    "cmaes": ("random_state", "sigma"),
    "bayesianoptimization": ("random_state", "n_initial_points"),
    "sobol": ("random_state",),
}
RESERVED = ("store", "dataset", "run")
# Settings with a flag that say where or how a trial runs, not what it learns.
UNTUNABLE = (*RESERVED, "workers", "cache_dir", "data", "device", "profile")
TUNABLE = tuple(k for k in TRAIN_FLAGS if k not in UNTUNABLE)
# Trial names are `<experiment>-<8 chars>`; their pods and services (`<trial>-master-0`) must stay DNS labels.
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
NAME_MAX = 40
_HINTS = typing.get_type_hints(TrainConfig)
_PLACEHOLDERS = {name: "x" for name in RESERVED}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def text(value: Any) -> str:
    """A setting as a command-line or Katib value; floats in their shortest exact form (0.001, 1e-05)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return ",".join(text(v) for v in value)
    return str(value)


def trainer_args(settings: Mapping[str, Any]) -> list[str]:
    """TrainConfig settings as `bincount train` arguments: a setting's own flag, else `--set key=value`."""
    args: list[str] = []
    for key, value in settings.items():
        args += [flag(key), text(value)] if key in TRAIN_FLAGS else ["--set", f"{key}={text(value)}"]
    return args


def typed(name: str, value: Any) -> Any:
    """A value as TrainConfig holds it (`"64"` → 64 for batch_size), or an error naming the setting."""
    cfg = from_dict(TrainConfig, {**_PLACEHOLDERS, name: value}, where="search space")
    return getattr(cfg, name)


@dataclass(frozen=True)
class Parameter:
    """One search dimension: a trainer setting and the values it may take.

    double and int take min, max and optionally step (max - min a whole number of steps) or log (a log-uniform
    scale, min > 0); categorical takes values of any kind, discrete numbers.
    """

    name: str
    type: str
    min: int | float | None = None
    max: int | float | None = None
    step: int | float | None = None
    values: tuple[int | float | str, ...] = ()
    log: bool = False

    def __post_init__(self) -> None:
        where = f"search space: parameter {self.name!r}"
        if self.name not in TUNABLE:
            raise ConfigError(f"{where}: not a tunable trainer setting; valid: {', '.join(TUNABLE)}")
        if self.type not in PARAMETER_TYPES:
            raise ConfigError(f"{where}: type {self.type!r} is not one of {', '.join(PARAMETER_TYPES)}")
        if self.type in ("double", "int"):
            self._check_range(where)
        else:
            self._check_values(where)

    def _check_range(self, where: str) -> None:
        if self.min is None or self.max is None or self.values:
            raise ConfigError(f"{where}: a {self.type} parameter takes min and max (and step or log), not values")
        setting = _HINTS[self.name]
        if setting not in (int, float):
            raise ConfigError(f"{where}: {self.name} is not a number; make it categorical")
        if self.type == "double" and setting is int:
            raise ConfigError(f"{where}: {self.name} is a whole number; make it int or discrete")
        number = float if self.type == "double" else int
        low, high = _number(self.min, number, where), _number(self.max, number, where)
        step = None if self.step is None else _number(self.step, number, where)
        if not low < high:
            raise ConfigError(f"{where}: min {low} must be below max {high}")
        if step is not None:
            if step <= 0:
                raise ConfigError(f"{where}: step must be positive, got {step}")
            if self.log:
                raise ConfigError(f"{where}: step and log cannot be combined")
            steps = (high - low) / step
            if abs(steps - round(steps)) > 1e-9 * max(1.0, steps):
                raise ConfigError(f"{where}: max - min ({high - low}) must be a whole number of steps ({step})")
        if self.log and low <= 0:
            raise ConfigError(f"{where}: a log scale needs min > 0, got {low}")
        object.__setattr__(self, "min", low)
        object.__setattr__(self, "max", high)
        object.__setattr__(self, "step", step)

    def _check_values(self, where: str) -> None:
        if not self.values or self.min is not None or self.max is not None or self.step is not None or self.log:
            raise ConfigError(f"{where}: a {self.type} parameter takes a list of values, not min/max/step/log")
        values = tuple(typed(self.name, v) for v in self.values)
        if self.type == "discrete" and not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               for v in values):
            raise ConfigError(f"{where}: discrete values must be numbers, got {list(self.values)}; "
                              "make it categorical")
        if len(set(values)) != len(values):
            raise ConfigError(f"{where}: values repeat: {list(self.values)}")
        object.__setattr__(self, "values", values)

    @property
    def flag(self) -> str:
        return flag(self.name)

    def katib(self) -> SearchParameter:
        """Katib's feasibleSpace: numbers as text, the log scale as its logUniform distribution."""
        from bincount.k8s.experiment import SearchParameter

        ranged = self.type in ("double", "int")
        return SearchParameter(self.name, self.type, self.flag,
                               min=text(self.min) if ranged else None, max=text(self.max) if ranged else None,
                               step=None if self.step is None else text(self.step),
                               values=tuple(text(v) for v in self.values),
                               distribution="logUniform" if self.log else None)

    def distribution(self):
        """optuna's distribution of the same values."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.type == "double":
            return FloatDistribution(self.min, self.max, log=self.log, step=self.step)
        if self.type == "int":
            return IntDistribution(self.min, self.max, log=self.log, step=self.step or 1)
        return CategoricalDistribution(self.values)

    def snap(self, value: Any) -> Any:
        """A stepped double on its exact grid point: optuna's carry float noise (0.15000000000000002)."""
        if self.type == "double" and self.step is not None:
            return float(f"{self.min + round((value - self.min) / self.step) * self.step:.12g}")
        return value

    def grid(self) -> list[Any]:
        """Every value, for grid search: a double needs a step."""
        if self.type == "double":
            if self.step is None:
                raise ConfigError(f"search space: grid search needs a step for double parameter {self.name!r}")
            return [self.snap(self.min + i * self.step) for i in range(round((self.max - self.min) / self.step) + 1)]
        if self.type == "int":
            return list(range(self.min, self.max + 1, self.step or 1))
        return list(self.values)


def _number(value: Any, number: type, where: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if number is int:
        if float(value) != int(value):
            raise ConfigError(f"{where}: an int parameter takes whole numbers, got {value!r}")
        return int(value)
    return float(value)


@dataclass(frozen=True)
class Objective:
    """What the search optimizes; a trial's value is its best epoch by the goal (Katib's default strategy)."""

    metric: str = "val_accuracy"
    goal: str = "maximize"
    target: float | None = None                 # stop the search once a trial reaches it

    def best(self, values: Sequence[float]) -> float:
        return max(values) if self.goal == "maximize" else min(values)

    def reached(self, value: float) -> bool:
        return self.target is not None and (value >= self.target if self.goal == "maximize"
                                            else value <= self.target)


@dataclass(frozen=True)
class EarlyStopping:
    """Katib's median stop: after `start_step` epochs a trial worse than the finished trials' median stops,
    once `min_trials` trials have succeeded."""

    algorithm: str = EARLY_STOPPING
    min_trials: int = 3
    start_step: int = 4

    def katib_settings(self) -> dict[str, str]:
        return {"min_trials_required": str(self.min_trials), "start_step": str(self.start_step)}


@dataclass(frozen=True)
class SearchSpace:
    """Everything one search needs except where its data is: see tuning.yaml for the fields."""

    parameters: tuple[Parameter, ...]
    name: str = "bincount-tune"
    objective: Objective = field(default_factory=Objective)
    additional_metrics: tuple[str, ...] = ()
    algorithm: str = "tpe"
    algorithm_settings: dict[str, str] = field(default_factory=dict)
    max_trials: int = 8
    parallel_trials: int = 2
    max_failed_trials: int = 3
    early_stopping: EarlyStopping | None = None
    trial: dict[str, Any] = field(default_factory=dict)
    resources: JobResources = field(default_factory=JobResources)

    def __post_init__(self) -> None:
        check_name(self.name)
        self._check_metrics()
        names = [p.name for p in self.parameters]
        if not names:
            raise ConfigError("search space: no parameters to search")
        if len(set(names)) != len(names):
            raise ConfigError(f"search space: a parameter is listed twice: {', '.join(names)}")
        if not isinstance(self.trial, Mapping):
            raise ConfigError(f"search space: trial must map trainer settings to values, got {self.trial!r}")
        clash = sorted((set(RESERVED) | set(names)) & set(self.trial))
        if clash:
            raise ConfigError(f"search space: trial must not set {', '.join(clash)}: the search or the job sets it")
        cfg = from_dict(TrainConfig, {**_PLACEHOLDERS, **self.trial}, where="search space: trial")
        object.__setattr__(self, "trial", {k: getattr(cfg, k) for k in self.trial})
        self._check_settings()
        self._check_algorithm()
        if not 1 <= self.parallel_trials <= self.max_trials or self.max_failed_trials < 0:
            raise ConfigError(f"search space: need 1 <= parallel_trials ({self.parallel_trials}) <= max_trials "
                              f"({self.max_trials}) and max_failed_trials >= 0 ({self.max_failed_trials})")
        stop = self.early_stopping
        if stop and (stop.algorithm != EARLY_STOPPING or stop.min_trials < 1 or stop.start_step < 1):
            raise ConfigError(f"search space: early_stopping takes algorithm {EARLY_STOPPING} with min_trials "
                              f">= 1 and start_step >= 1, got {stop}")

    def _check_metrics(self) -> None:
        from bincount.train.loop import METRIC_KEYS   # the trainer's metric line: one fact, one place

        if self.objective.goal not in GOALS:
            raise ConfigError(f"search space: objective goal {self.objective.goal!r} must be maximize or minimize")
        metrics = [self.objective.metric, *self.additional_metrics]
        unknown = [m for m in metrics if m not in METRIC_KEYS]
        if unknown or len(set(metrics)) != len(metrics):
            raise ConfigError(f"search space: metrics must be distinct and printed by the trainer "
                              f"({', '.join(METRIC_KEYS)}); got {', '.join(metrics)}")

    def _check_settings(self) -> None:
        """Every trial setting and every parameter's extreme values pass the trainer's own checks."""
        from bincount.train.loop import validate

        for p in self.parameters:
            for value in (p.min, p.max) if p.type in ("double", "int") else p.values:
                try:
                    validate(load_train_config(None, {**_PLACEHOLDERS, **self.trial, p.name: value}))
                except ConfigError as e:
                    raise ConfigError(f"search space: with {p.name}={text(value)}: {e}") from None

    def _check_algorithm(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"search space: algorithm {self.algorithm!r} is not one of {', '.join(ALGORITHMS)} "
                              "(the Katib algorithms with a local twin)")
        if not isinstance(self.algorithm_settings, Mapping):
            raise ConfigError("search space: algorithm_settings must map setting names to values")
        unknown = sorted(set(self.algorithm_settings) - set(ALGORITHMS[self.algorithm]))
        if unknown:
            raise ConfigError(f"search space: algorithm {self.algorithm} has no setting(s) {', '.join(unknown)} "
                              f"on both backends; valid: {', '.join(ALGORITHMS[self.algorithm]) or 'none'}")
        object.__setattr__(self, "algorithm_settings", {k: text(v) for k, v in self.algorithm_settings.items()})
        if self.algorithm == "grid":
            for p in self.parameters:
                p.grid()

    @property
    def shares_features(self) -> bool:
        """Whether every trial trains a head on the same cached backbone features."""
        cfg = load_train_config(None, {**_PLACEHOLDERS, **self.trial})
        searched = {p.name for p in self.parameters}
        return (cfg.freeze == "backbone" and cfg.feature_cache
                and not searched & {"arch", "weights", "freeze", "image_size", "precision"})

    @property
    def metrics(self) -> tuple[str, ...]:
        return (self.objective.metric, *self.additional_metrics)

    def trial_args(self, store: str, dataset: str) -> list[str]:
        """The trainer arguments every trial shares; the parameters and the run id follow."""
        return ["--store", store, "--dataset", dataset, *trainer_args(self.trial)]

    def parameter_args(self, values: Mapping[str, Any]) -> list[str]:
        typed_values = self.typed_parameters(values)
        return [arg for p in self.parameters for arg in (p.flag, text(typed_values[p.name]))]

    def typed_parameters(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Parameter values (Katib's text or optuna's) as the trainer takes them, in the space's order."""
        return {p.name: p.snap(typed(p.name, values[p.name])) for p in self.parameters if p.name in values}

    def settings(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The TrainConfig settings of one trial: the fixed ones and its parameter values."""
        return {**self.trial, **self.typed_parameters(values)}

    def distributions(self) -> dict[str, Any]:
        return {p.name: p.distribution() for p in self.parameters}

    def experiment_spec(self, name: str, store: str, dataset: str) -> ExperimentSpec:
        from bincount.k8s.experiment import ExperimentSpec

        check_name(name)
        stop = self.early_stopping
        return ExperimentSpec(
            name=name, objective=self.objective.metric, goal_type=self.objective.goal, goal=self.objective.target,
            additional_metrics=self.additional_metrics, parameters=tuple(p.katib() for p in self.parameters),
            trial_args=tuple(self.trial_args(store, dataset)), resources=self.resources, algorithm=self.algorithm,
            algorithm_settings=self.algorithm_settings, max_trials=self.max_trials,
            parallel_trials=self.parallel_trials, max_failed_trials=self.max_failed_trials,
            early_stopping=stop.algorithm if stop else None,
            early_stopping_settings=stop.katib_settings() if stop else {})

    def render(self, name: str, store: str, dataset: str, cluster: ClusterConfig | None = None) -> V1beta1Experiment:
        """The Katib Experiment: what `bincount tune render` prints and the kubernetes backend creates; its trials
        run in the cluster's training API."""
        from bincount.k8s.experiment import experiment

        return experiment(self.experiment_spec(name, store, dataset), cluster)


def require_dataset(store: Store, dataset: str) -> None:
    """A search trains on the train split and is judged on val; the test split is never read while tuning."""
    for split in ("train", "val"):
        if not store.exists(dataset_key(dataset, f"{split}.jsonl")):
            raise ConfigError(f"dataset {dataset!r} has no {split} split in {store.uri}; "
                              f"run `bincount data prepare --store {store.uri} --name {dataset}`")


def check_name(name: str) -> None:
    if not NAME_RE.match(name) or len(name) > NAME_MAX:
        raise ConfigError(f"experiment name {name!r} must be a lower-case DNS label of at most {NAME_MAX} "
                          "characters starting with a letter (Katib names trials, pods and services after it)")


def load_space(path: str | None = None) -> SearchSpace:
    """A search space file, or one packaged with bincount by its name (tuning.yaml, the default, or
    quickstart.yaml): a pipeline step finds those in any image that has bincount."""
    packaged = resources.files("bincount.tune") / (path or DEFAULT_SPACE)
    if path and (os.sep in path or not packaged.is_file()):
        return load_config(SearchSpace, path)
    with resources.as_file(packaged) as file:
        return load_config(SearchSpace, file)
