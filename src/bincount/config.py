"""Typed configs for every stage: dataclasses loadable from YAML and overridable from the command line.

`load_config(Cls, path, overrides)` is the one way a config is made: YAML values first, then the non-None
overrides (the CLI's flags), each coerced to the field's declared type; unknown keys are errors that list the
valid ones, so a typo in a YAML file never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from bincount import __version__
from bincount.errors import ConfigError

C = TypeVar("C")

CLASSES = (1, 2, 3, 4, 5)
ABID_BUCKET = "aft-vbi-pds"
ABID_ENDPOINT = "s3.amazonaws.com"
ABID_REGION = "us-east-1"


@dataclass
class SyntheticConfig:
    """Offline source: generated bin photos and ABID-format metadata written under `dest/raw/`."""

    dest: str
    n: int = 500
    seed: int = 0
    workers: int = 1
    min_count: int = 1
    max_count: int = 5
    width: tuple[int, int] = (400, 560)
    height: tuple[int, int] = (300, 500)


@dataclass
class DownloadConfig:
    """ABID ingest: which pairs to copy from the source bucket into `dest/raw/`, and how."""

    dest: str
    file_list: str | None = None
    ids: list[str] = field(default_factory=list)
    quantities: tuple[int, int] | None = None
    limit: int | None = None
    per_class: int | None = None
    source_endpoint: str = ABID_ENDPOINT
    source_bucket: str = ABID_BUCKET
    source_prefix: str = ""
    source_region: str = ABID_REGION
    source_secure: bool | None = None
    workers: int = 16


@dataclass
class PrepareConfig:
    """Labels from metadata, class filter, balancing and the stratified split into `datasets/<name>/`."""

    store: str
    name: str
    balance: str = "undersample"
    split: tuple[float, float, float] = (0.7, 0.2, 0.1)
    seed: int = 0
    classes: tuple[int, ...] = CLASSES
    workers: int = 16


@dataclass
class ShardConfig:
    """A prepared dataset packed into streamable shards under `datasets/<name>/shards/<split>/`.

    Quality measured on 100 real photos at 224 px: JPEG 95 is 14.6 KiB a square and decodes in 0.3 ms (mean
    absolute pixel change 1.4 of 255, below the training colour jitter); lossless PNG is 69 KiB and 1.9 ms.
    """

    store: str
    name: str
    image_size: int = 224                       # the training size: the shards hold the model's input squares
    quality: int = 95                           # JPEG quality of the train split
    eval_encoding: str = "png"                  # val/test: png (lossless: evaluate sees what serve sees) or jpeg
    shard_samples: int = 2000                   # ~30 MB shards of 224 px JPEG squares
    splits: tuple[str, ...] = ("train", "val", "test")
    seed: int = 0
    workers: int = 8                            # threads fetching, decoding and encoding photos


@dataclass
class EdaConfig:
    """The exploratory report of one prepared dataset, written to `reports/<name>/eda/`."""

    store: str
    name: str
    samples_per_class: int = 6
    workers: int = 16


@dataclass
class TrainConfig:
    """One training run: data, model, recipe and runtime. Saved, resolved, with the exported model.

    A rerun with the same `run` resumes from `checkpoints/<run>/last.pt`. `freeze: backbone` with
    `feature_cache` trains the head on backbone features computed once and kept in the store. `recipe` names
    the packaged recipe (or YAML file) whose values stand in for these defaults; see `load_train_config`.
    """

    store: str
    dataset: str
    run: str
    recipe: str = ""                            # quickstart, abid, or a YAML file of these keys
    arch: str = "resnet18"                      # torchvision name, efficientnet_lite0/1/2, or timm/<name>
    head: str = "softmax"                       # softmax (a logit per count), or corn (ordinal: K − 1 conditional)
    weights: str = "DEFAULT"                    # DEFAULT, imagenet, a torchvision weights name, none, a file, s3://
    freeze: str = "none"                        # none, backbone, or a stage name: freeze up to and including it
    classes: tuple[int, ...] = CLASSES
    image_size: int = 224                       # the photo is stretched to this square; the cache keeps that square
    augment: str = "counting"                   # none, flip (the seed's), counting (flips, quarter turns, colour)
    epochs: int = 10                            # a ceiling when `steps` or `time_budget` say less
    steps: int = 0                              # optimizer steps in all (0: epochs × steps per epoch); the schedule
                                                # warms up and decays to end on the last one
    time_budget: str = ""                       # e.g. 45m, 2h, 1h30m: the run's wall time, setup and export
                                                # included, turned into `steps` once from its first steps' rate
    batch_size: int = 64                        # per process
    optimizer: str = "adamw"                    # adam, adamw, sgd
    lr: float = 1e-3                            # the head's; the backbone's is lr × backbone_lr_scale
    backbone_lr_scale: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 0.01
    schedule: str = "cosine"                    # cosine or linear decay to zero, constant (each after the warmup), onecycle
    warmup_epochs: float = 1.0
    loss: str = "ce"                            # ce, or ordinal (soft targets that respect the order of counts)
    label_smoothing: float = 0.0                # ce only
    ordinal_scale: float = 1.0                  # ordinal only: target weight exp(-scale·(count - label)²)
    same_bin_rank_weight: float = 0.0           # >0: batches keep a bin's photos together; the one with more
                                                # items must have the higher expected count (weight of that term)
    class_weights: list[float] | str = "none"   # none, balanced (from the train split), or one weight per class
    grad_clip: float = 0.0                      # max gradient norm; 0: off
    drop_path: float = 0.0                      # stochastic depth (efficientnet_lite*, timm/): the last block's rate
    accumulate: int = 1                         # micro-batches per optimizer step
    precision: str = "auto"                     # bf16, fp16 (GPU), fp32; auto: bf16 where the hardware has it
    channels_last: bool | None = None           # None: on GPU, or on CPU with bf16 (fp32 CPU convs are slower)
    monitor: str = "val_accuracy"               # val_accuracy, val_balanced_accuracy (max) or val_loss (min)
    patience: int = 0                           # epochs without improvement before stopping; 0: never
    ema_half_life: float = 0.0                  # epochs; >0: validate and export a moving average of the weights
    tta: str = "none"                           # exported model: none, or dihedral (mean over 8 flips/turns)
    calibration: str = "none"                   # exported model: none, or temperature (fitted on val)
    decode: str = "argmax"                      # exported model: argmax, or median (least expected count error)
    seed: int = 0
    workers: int = -1                           # DataLoader workers per process; -1: from the CPU count
    prefetch_workers: int = 16                  # threads filling the local image cache
    cache_dir: str = ""                         # local image cache; "": $BINCOUNT_CACHE or ~/.cache/bincount
    feature_cache: bool = True
    data: str = "auto"                          # shards (streamed from the store), cache, or auto: shards if packed
    shuffle_buffer: int = 1000                  # shards: samples each DataLoader worker shuffles among
    prefetch_factor: int = 2                    # batches each DataLoader worker keeps ready
    device: str = "auto"                        # auto, cpu, cuda
    profile: int = 0                            # steps to trace with torch.profiler; 0: off
    resume: bool = True


# The TrainConfig keys that have a flag of their own in `bincount train` (the trainer's entry parses them); any
# other key travels as `--set key=value`. The search space tunes only these.
TRAIN_FLAGS = ("store", "dataset", "run", "recipe", "arch", "weights", "freeze", "image_size", "epochs", "steps",
               "time_budget", "batch_size", "lr",
               "optimizer", "schedule", "weight_decay", "warmup_epochs", "label_smoothing", "precision", "patience",
               "seed", "workers", "cache_dir", "data", "device", "profile")


@dataclass
class EvaluateConfig:
    """Test-set metrics of an exported model, written to `out` (a local directory or store URI)."""

    store: str
    model: str                                  # RUN or models/RUN under the store, a model directory, or a URI
    dataset: str
    out: str
    split: str = "test"
    batch_size: int = 64
    workers: int = -1
    cache_dir: str = ""
    data: str = "auto"                          # shards, cache, or auto: the split's shards where they match
    device: str = "auto"
    precision: str = "auto"                     # auto (bf16 where the hardware has it, as served), bf16, fp32


@dataclass
class GateRule:
    """When a challenger may replace the champion, judged on both models' answers to the same photos. Each check
    that fails is a rule that decided; the first one is named in the decision."""

    confidence: float = 0.95                    # of the bootstrap intervals
    mae_margin: float = 0.02                    # challenger MAE − champion MAE, at the interval's upper end, ≤ this
    balanced_accuracy_margin: float = 0.0       # champion − challenger balanced accuracy (point estimate) ≤ this
    min_accuracy: float = 0.0                   # the challenger's own accuracy must reach this (deploy_threshold)
    bootstrap: int = 2000                       # resamples; a bin photographed several times is resampled whole
    seed: int = 0


@dataclass
class CompareConfig:
    """The promotion gate: champion and challenger (runs under the store, directories or URIs) scored on one split
    of one dataset, compared pair by pair, the report written to `out`."""

    store: str
    champion: str
    challenger: str
    dataset: str
    split: str = "test"
    out: str = ""                               # "": reports/<challenger>/compare-<champion>/ in the store
    rule: GateRule = field(default_factory=GateRule)
    batch_size: int = 64
    workers: int = -1
    cache_dir: str = ""
    data: str = "auto"
    device: str = "auto"
    precision: str = "auto"


@dataclass
class DeployConfig:
    """One rollout step on an endpoint, recorded in `serving/<endpoint>.json`: a run deployed outright or on
    canary, or the canary promoted or rolled back."""

    store: str
    endpoint: str = "bincount"                  # the endpoint: the InferenceService and the model name in its paths
    model: str = ""                             # the run to deploy (models/<run> in the store)
    canary: int | None = None                   # percent of requests for `model` beside the champion; None: replace it
    reason: str = ""                            # why, for the history; "": what the command did
    log: bool = True                            # the predictor appends every prediction to predictions/<endpoint>/
    port: int = 0                               # local: 0 keeps the endpoint's port (a free one the first time)
    logger_url: str = ""                        # kubernetes: KServe's own logger (CloudEvents to this URL) as well
    logger_mode: str = "all"                    # all, request or response
    timeout: float = 600.0                      # seconds until the predictor must answer ready


@dataclass
class MonitorConfig:
    """The drift report of an endpoint: its prediction log over a window against a reference split, written to
    `out`; a population stability index over its threshold (`thresholds`, default `psi_threshold`) and over what
    sampling alone reaches at `significance` is drift."""

    store: str
    endpoint: str
    reference: str                              # the dataset whose split is the reference
    split: str = "train"
    since: str = "1d"                           # the window's start: an age (24h, 7d) or an ISO 8601 time
    until: str = ""                             # its end, an ISO 8601 time; "": now
    out: str = ""                               # "": reports/monitor/<endpoint>/<until>/ in the store
    psi_threshold: float = 0.25
    thresholds: dict[str, float] = field(default_factory=dict)  # per feature, e.g. {"count": 0.5}
    min_records: int = 100                      # fewer logged (or reference) values: the feature is not judged
    significance: float = 0.001                 # a PSI that sampling alone reaches this often is not drift
    bins: int = 10                              # quantile bins of a continuous feature
    workers: int = 16                           # threads reading reference photos


@dataclass
class AuditConfig:
    """A batch count of bins in the store, reconciled with expected quantities, written to `audits/<name>/`.

    The bins are one of: a dataset split (`dataset` + `split`), `ids`, or `all` images under raw/ (optionally only
    keys after `after` or objects modified after `modified_after`, an ISO time). `expected` is `metadata` (ABID's
    EXPECTED_QUANTITY) or a CSV file with header `key,expected`. A rerun of the same name resumes it.
    """

    store: str
    model: str                                  # RUN or models/RUN under the store, a model directory, or a URI
    name: str = ""                              # "": audit-<model's run name>
    dataset: str = ""
    split: str = ""
    ids: list[str] = field(default_factory=list)
    all: bool = False
    after: str = ""                             # with all: only keys sorting after this one
    modified_after: str = ""                    # with all: only images written after this ISO 8601 time or age (24h)
    expected: str = "metadata"                  # metadata, or a CSV file (local path or store URI): key,expected
    shard_size: int = 512                       # bins per result shard: the unit of resumption and of a worker
    workers: int = 1                            # local: processes; kubernetes: pods of the indexed Job
    batch_size: int = 32                        # 16-128 within 5 % on a 2-core CPU once the heap is kept (audit/heap)
    threads: int = 16                           # decoding threads per worker
    device: str = "auto"
    precision: str = "auto"                     # auto (bf16 where the hardware has it, as served), bf16, fp32
    max_pixels: int = 24_000_000
    review: int = 0                             # flag the N bins most likely wrong; 0: by threshold or precision
    threshold: float = 0.0                      # flag p_mismatch ≥ this; 0: by precision
    target_precision: float = 0.5               # flag the most likely wrong bins while their expected precision holds
    error_rate: float = 0.0                     # share of wrong expected quantities; 0: estimated from the audit
    top: int = 50                               # bins shown with thumbnails in the report
    timeout: float = 0.0                        # kubernetes: seconds to follow the indexed Job; 0: until it ends
    poll: float = 10.0                          # kubernetes: seconds between status reads


@dataclass
class TuneJob:
    """One hyperparameter search: a search space (tuning.yaml) run against a prepared dataset, on either backend.
    The outputs land in `tuning/<experiment>/`; rerunning the same experiment resumes it."""

    store: str
    dataset: str
    space: str = ""                             # tuning.yaml; "": the default packaged with bincount
    experiment: str = ""                        # "": the space's name
    workdir: str = ""                           # local: study copy, trial logs; "": under $BINCOUNT_CACHE/tuning
    timeout: float = 0.0                        # kubernetes: seconds to follow the Experiment; 0: until it ends
    poll: float = 10.0                          # kubernetes: seconds between status reads


RECIPES = "bincount.train.recipes"
RECIPE_SUFFIX = ".yaml"


def recipes() -> list[str]:
    """The names of the recipes packaged with bincount."""
    from importlib import resources

    return sorted(f.name[: -len(RECIPE_SUFFIX)] for f in resources.files(RECIPES).iterdir()
                  if f.name.endswith(RECIPE_SUFFIX))


def is_packaged_recipe(recipe: str) -> bool:
    return recipe in recipes()


def recipe_settings(recipe: str) -> dict[str, Any]:
    """A recipe's TrainConfig values: one packaged with bincount by name, or a YAML file of the same keys. Every
    key is checked here, so a typo in a recipe fails before any training starts."""
    from importlib import resources

    if is_packaged_recipe(recipe):
        where = f"recipe {recipe}"
        values = yaml.safe_load(resources.files(RECIPES).joinpath(recipe + RECIPE_SUFFIX).read_text()) or {}
    elif os.sep in recipe or "/" in recipe or recipe.endswith((".yaml", ".yml")):
        where = f"recipe file {recipe}"
        values = _read_yaml(Path(recipe))
    else:
        raise ConfigError(f"unknown recipe {recipe!r}; packaged: {', '.join(recipes())}, or a YAML file")
    placed = sorted({"store", "dataset", "run", "recipe"} & set(values))
    if placed:
        raise ConfigError(f"{where}: a recipe says how to train, not what or where; remove {', '.join(placed)}")
    from_dict(TrainConfig, {"store": "", "dataset": "", "run": "", **values}, where)
    return values


def load_train_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """A TrainConfig from, in rising order: its defaults, the recipe (named by the overrides, e.g. `--recipe`, or
    by the file), the YAML file at `path`, then the non-None overrides."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    file_values = _read_yaml(Path(path)) if path is not None else {}
    recipe = given.get("recipe", file_values.get("recipe")) or ""
    values = {**(recipe_settings(str(recipe)) if recipe else {}), **file_values, **given}
    return from_dict(TrainConfig, values, where=str(path) if path else "options")


def load_config(cls: type[C], path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> C:
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_yaml(Path(path)))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(cls, values, where=str(path) if path else "options")


def from_dict(cls: type[C], values: Mapping[str, Any], where: str = "config") -> C:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} for {cls.__name__}; "
                          f"valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(value, hints[name], f"{where}: {name}") for name, value in values.items()}
    missing = [f.name for f in fields.values() if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)} for {cls.__name__}")
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain data (lists, not tuples) so the resolved config can be saved as YAML or JSON."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin in (list, tuple):
        items = _split_list(value, where)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(items)} ({value!r})")
            return tuple(_coerce(v, a, where) for v, a in zip(items, args))
        item_type = args[0] if args else str
        coerced = [_coerce(v, item_type, where) for v in items]
        return tuple(coerced) if origin is tuple else coerced
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.strip().lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return str(value)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(hint, value, where)
    return value


def _split_list(value: Any, where: str) -> list[Any]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ConfigError(f"{where}: expected a list, got {value!r}")


# Container images: the one place that names them. The manifests, the launchers, the KFP components' base image
# and `make images` all read these; the tag follows the package version, so a release re-renders the manifests.
IMAGE_REGISTRY = "ghcr.io/bincount"
IMAGE_TAG = __version__
TRAINER_IMAGE = f"{IMAGE_REGISTRY}/trainer:{IMAGE_TAG}"
SERVING_IMAGE = f"{IMAGE_REGISTRY}/serving:{IMAGE_TAG}"

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$")
_QUANTITY_SCALE = {None: 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
                   "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50}


def quantity(text: str, where: str) -> float:
    """A Kubernetes quantity ("500m", "8Gi") as a number, so requests, limits and /dev/shm can be compared."""
    match = _QUANTITY.match(str(text))
    if not match:
        raise ConfigError(f"{where}: {text!r} is not a Kubernetes quantity (e.g. 500m, 2, 8Gi)")
    return float(match.group(1)) * _QUANTITY_SCALE[match.group(2)]


def _check_compute(cfg: Any) -> None:
    for kind in ("cpu", "memory"):
        request, limit = getattr(cfg, f"{kind}_request"), getattr(cfg, f"{kind}_limit")
        if quantity(request, f"{kind}_request") > quantity(limit, f"{kind}_limit"):
            raise ConfigError(f"{kind}_request {request} exceeds {kind}_limit {limit}")
    if ":" not in cfg.image.rsplit("/", 1)[-1] and "@" not in cfg.image:
        raise ConfigError(f"image {cfg.image!r} has no tag; pin one (a moving tag makes runs irreproducible)")
    if cfg.image.endswith(":latest"):
        raise ConfigError(f"image {cfg.image!r} uses :latest; pin a version tag")


@dataclass
class JobResources:
    """How wide and how big a training job is. One object renders the PyTorchJob's replicas or the TrainJob's
    nodes, the Katib trial template and the local torchrun command, so they never disagree.

    `workers` counts pods: the first is the PyTorchJob's Master, the rest its Workers (a TrainJob's `numNodes`).
    Locally there is one node, so `torchrun_argv` starts `procs_per_worker` processes.
    """

    workers: int = 1
    procs_per_worker: int = 1
    gpus_per_worker: int = 0
    cpu_request: str = "2"
    cpu_limit: str = "4"
    memory_request: str = "4Gi"
    memory_limit: str = "8Gi"
    shm_size: str = "1Gi"
    image: str = TRAINER_IMAGE
    backoff_limit: int = 3

    def __post_init__(self) -> None:
        for name in ("workers", "procs_per_worker"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.gpus_per_worker < 0:
            raise ConfigError(f"gpus_per_worker must not be negative, got {self.gpus_per_worker}")
        if self.gpus_per_worker and self.procs_per_worker != self.gpus_per_worker:
            raise ConfigError(f"procs_per_worker ({self.procs_per_worker}) must equal gpus_per_worker "
                              f"({self.gpus_per_worker}): DDP runs one process per GPU")
        _check_compute(self)
        if quantity(self.shm_size, "shm_size") >= quantity(self.memory_limit, "memory_limit"):
            raise ConfigError(f"shm_size {self.shm_size} must stay below memory_limit {self.memory_limit}: "
                              "a memory-backed /dev/shm counts against the container's memory")

    @classmethod
    def sized(cls, workers: int, gpus_per_worker: int, procs_per_worker: int = 0) -> JobResources:
        """The default sizes for `workers` pods of `gpus_per_worker` GPUs; `procs_per_worker` 0 means one process
        per GPU, or one on a CPU-only worker."""
        return cls(workers=workers, procs_per_worker=procs_per_worker or max(1, gpus_per_worker),
                   gpus_per_worker=gpus_per_worker)

    @property
    def world_size(self) -> int:
        return self.workers * self.procs_per_worker

    @property
    def cpu_threads(self) -> int:
        """Threads per process, so torchrun's default of OMP_NUM_THREADS=1 does not starve CPU training."""
        return max(1, int(quantity(self.cpu_limit, "cpu_limit") // self.procs_per_worker))

    def torchrun_argv(self) -> list[str]:
        """The local launch prefix; the trainer's flags follow. `--standalone` picks a free rendezvous port, so
        parallel local trials never collide; this interpreter's torch runs it, whatever is on PATH."""
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                "--nproc_per_node", str(self.procs_per_worker), "-m", "bincount.train"]

    def torchrun_env(self, concurrent_jobs: int = 1) -> dict[str, str]:
        """The environment for `torchrun_argv`: this one's, plus torch threads that share this machine's cores
        between every local process (torchrun's own default, 1, starves CPU training). A set value wins."""
        env = dict(os.environ)
        threads = (os.cpu_count() or 1) // (concurrent_jobs * self.procs_per_worker)
        env.setdefault("OMP_NUM_THREADS", str(max(1, threads)))
        return env

    def requests(self) -> dict[str, str]:
        return _with_gpus({"cpu": self.cpu_request, "memory": self.memory_request}, self.gpus_per_worker)

    def limits(self) -> dict[str, str]:
        return _with_gpus({"cpu": self.cpu_limit, "memory": self.memory_limit}, self.gpus_per_worker)


def _with_gpus(resources: dict[str, str], gpus: int) -> dict[str, str]:
    return {**resources, "nvidia.com/gpu": str(gpus)} if gpus else resources


@dataclass
class ServingResources:
    """Size and scaling of the KServe predictor."""

    min_replicas: int = 1
    max_replicas: int = 3
    cpu_request: str = "1"
    cpu_limit: str = "2"
    memory_request: str = "2Gi"
    memory_limit: str = "4Gi"
    image: str = SERVING_IMAGE

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ConfigError(f"replicas must satisfy 0 <= min_replicas <= max_replicas >= 1, "
                              f"got {self.min_replicas}..{self.max_replicas}")
        _check_compute(self)

    def requests(self) -> dict[str, str]:
        return {"cpu": self.cpu_request, "memory": self.memory_request}

    def limits(self) -> dict[str, str]:
        return {"cpu": self.cpu_limit, "memory": self.memory_limit}


# How a cluster runs the trainer: a PyTorchJob (Kubeflow Training Operator v1, in maintenance) or a TrainJob (Kubeflow
# Trainer v2, what new clusters install).
TRAINING_APIS = ("pytorchjob", "trainjob")


@dataclass
class ClusterConfig:
    """Where bincount lives on a cluster: the names the manifests create and the launchers refer to, and which
    training API runs its training jobs and Katib trials."""

    namespace: str = "bincount"
    bucket: str = "bincount"
    s3_secret: str = "bincount-s3"
    store_config: str = "bincount-store"        # ConfigMap with the store's endpoint settings (pipeline steps)
    region: str = "us-east-1"
    pipeline_service_account: str = "bincount-pipeline"
    workload_service_account: str = "bincount-workload"
    serving_service_account: str = "bincount-serving"
    training_api: str = "pytorchjob"            # one of TRAINING_APIS
    training_runtime: str = "torch-distributed" # trainjob: the ClusterTrainingRuntime a TrainJob names

    def __post_init__(self) -> None:
        if self.training_api not in TRAINING_APIS:
            raise ConfigError(f"training API {self.training_api!r} is not one of {', '.join(TRAINING_APIS)}")

    @property
    def s3_endpoint(self) -> str:
        """The in-namespace MinIO as host:port, the form both the store and KServe's annotation expect."""
        return f"minio.{self.namespace}.svc.cluster.local:9000"

    @property
    def store(self) -> str:
        return f"s3://{self.bucket}"


@dataclass
class ServeConfig:
    """The predictor and its local ModelServer. Every limit protects the server from one bad request.

    Fetching images by URL is off unless `url_hosts` names the hosts allowed (`*.example.com` admits its
    subdomains); even then private, loopback and link-local addresses are refused after DNS resolution.
    `unsafe_url_addresses` exempts exact `IP:PORT` pairs from that refusal: it exists for tests against a
    server on 127.0.0.1 and is unsafe anywhere else.
    """

    model: str                                  # a model directory (KServe mounts /mnt/models) or store URI
    port: int = 8080
    host: str = "127.0.0.1"                     # this machine only; the serving image and KServe say 0.0.0.0
    name: str = "bincount"                      # the model name in /v1/models/<name>:predict
    precision: str = "auto"                     # auto (bf16 where the CPU or GPU has it), bf16, fp32
    device: str = "auto"                        # auto, cpu, cuda
    threads: int = 0                            # torch threads for inference; 0: torch's default
    max_batch: int = 32                         # images per request, and per forward pass across requests
    max_body_bytes: int = 16 << 20
    max_pixels: int = 24_000_000                # width × height of one image, checked before it is decoded
    url_hosts: list[str] = field(default_factory=list)
    url_timeout: float = 5.0                    # seconds for the whole fetch, redirects included
    url_max_bytes: int = 10 << 20
    url_max_redirects: int = 3
    unsafe_url_addresses: list[str] = field(default_factory=list)
    version: str = ""                           # the model version every answer names; "": the run in model.json
    canary: str = ""                            # a second model (directory or URI) that answers canary_percent %
    canary_percent: int = 0                     # of the requests, 1-99, drawn request by request
    canary_version: str = ""
    endpoint: str = ""                          # whose prediction log this is: predictions/<endpoint>/; "": name
    log_store: str = ""                         # the store the prediction log is appended to; "": no log
    log_batch: int = 500                        # records per log object, at most
    log_flush_s: float = 10.0                   # a batch is written at the latest this long after its first record
    log_queue: int = 10_000                     # records waiting to be written; beyond it they are dropped, counted


@dataclass
class TrainJob:
    """One training run and the room it runs in, on either backend (torchrun locally, a PyTorchJob or TrainJob on a
    cluster)."""

    config: TrainConfig
    resources: JobResources = field(default_factory=JobResources)
    timeout: float = 0.0                        # kubernetes: seconds to follow the training job; 0: until it ends
    poll: float = 10.0                          # kubernetes: seconds between status reads


@dataclass
class ServeJob:
    """One deployed model: the predictor's settings (`serve.model` is the model directory or store URI; a cluster
    needs s3://) and the predictor's size on a cluster, where `serve.name` also names the InferenceService. With
    `serve.canary` the local server answers with both models; a cluster rolls the canary out as the spec's new
    revision at canaryTrafficPercent, beside the revision serving now."""

    serve: ServeConfig
    resources: ServingResources = field(default_factory=ServingResources)
    workdir: str = ""                           # local: serve.yaml and serve.log; "": a new temporary directory
    timeout: float = 600.0                      # seconds until the predictor must answer ready
    poll: float = 5.0                           # kubernetes: seconds between status reads
    hold_previous: bool = False                 # kubernetes: the last rolled-out revision keeps all traffic while
                                                # this spec rolls out (canaryTrafficPercent 0: an instant rollback)
    logger_url: str = ""                        # kubernetes: KServe's logger posts requests and answers here
    logger_mode: str = "all"                    # all, request or response
