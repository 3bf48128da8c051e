"""Where work runs: one interface, two backends (DESIGN.md "Backends").

`LocalBackend` runs the trainer under torchrun, tunes with optuna and serves with a ModelServer process;
`KubernetesBackend` runs the same trainer arguments in the cluster's training job (a PyTorchJob or a Trainer v2
TrainJob, `ClusterConfig.training_api`), tunes with a Katib Experiment whose trials are the same kind of job and
serves with an InferenceService. Callers pick one by name through `get_backend`; nothing else branches on it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from bincount.config import (AuditConfig, ClusterConfig, JobResources, ServeJob, TrainConfig, TrainJob, TuneJob,
                             is_packaged_recipe, load_train_config, to_dict)
from bincount.errors import BincountError, ConfigError
from bincount.k8s.conventions import RUN_FLAG
from bincount.store import KeyNotFoundError, open_store

if TYPE_CHECKING:
    from bincount.k8s.launch import Cluster
    from bincount.tune.results import TuneResult

STDERR_TAIL = 20
STANDARD_MODES = ("Standard", "RawDeployment")  # KServe's raw Deployment mode, by its names new and old
DEPLOYMENT_MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
LOGGER_MODES = ("all", "request", "response")
TRAINER_ERROR = "bincount: error:"             # how the trainer's CLI reports a BincountError on stderr


@dataclass
class TrainOutcome:
    run: str
    model: str                                  # the exported model directory's URI
    metrics: dict[str, float]                   # the best epoch's, from its model.json


@dataclass
class Endpoint:
    url: str
    predict_url: str
    stop_hint: str                              # how to stop it once this process is gone, as a shell command
    stop: Callable[[], None] = field(repr=False)


class Backend(Protocol):
    def train(self, job: TrainJob) -> TrainOutcome: ...
    def tune(self, job: TuneJob) -> TuneResult: ...
    def serve(self, job: ServeJob) -> Endpoint: ...
    def check_audit(self, store: str, model: str) -> None: ...       # refuses what its workers cannot read
    def audit(self, cfg: AuditConfig, name: str) -> None: ...       # worker processes | indexed Job


def train_args(cfg: TrainConfig) -> list[str]:
    """The trainer's command line for `cfg`: the one rendering both backends launch, so torchrun and a
    PyTorchJob train the same run. The recipe travels by name and only the settings that differ from it, as
    `--set`; a recipe file is read here and its settings travel instead, since a pod cannot read this machine's
    files."""
    args = ["--store", cfg.store, "--dataset", cfg.dataset, RUN_FLAG, cfg.run]
    packaged = is_packaged_recipe(cfg.recipe)
    if packaged:
        args += ["--recipe", cfg.recipe]
    base = to_dict(load_train_config(None, {"store": "", "dataset": "", "run": "",
                                            "recipe": cfg.recipe if packaged else ""}))
    for name, value in to_dict(cfg).items():
        if name not in ("store", "dataset", "run", "recipe") and value != base[name]:
            args += ["--set", f"{name}={_text(value, name)}"]
    return args


def _text(value: object, name: str) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v, name) for v in value)
    if value is None:
        raise ConfigError(f"{name}: cannot pass None to the trainer; leave it at its default")
    return str(value)


def _outcome(cfg: TrainConfig) -> TrainOutcome:
    from bincount.train.loop import model_prefix
    from bincount.model.exported import META_FILE

    store = open_store(cfg.store)
    prefix = model_prefix(cfg.run)
    try:
        meta = json.loads(store.get_text(f"{prefix}/{META_FILE}"))
    except KeyNotFoundError:
        raise BincountError(f"training run {cfg.run} finished but exported no model: "
                            f"{store.url(f'{prefix}/{META_FILE}')} is missing") from None
    return TrainOutcome(cfg.run, store.url(prefix), meta["metrics"])


class LocalBackend:
    def train(self, job: TrainJob) -> TrainOutcome:
        """torchrun on this machine; its stdout (the epoch metrics) passes through, its stderr is echoed and the
        last lines kept for the error."""
        argv = job.resources.torchrun_argv() + train_args(job.config)
        env = job.resources.torchrun_env()
        tail: deque[str] = deque(maxlen=STDERR_TAIL)
        reported: list[str] = []
        with subprocess.Popen(argv, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, text=True,
                              errors="replace") as proc:
            for line in proc.stderr:
                sys.stderr.write(line)
                tail.append(line.rstrip("\n"))
                if line.startswith(TRAINER_ERROR):
                    reported.append(line.strip())
        if proc.returncode != 0:
            # the trainer's own error beats torchrun's failure report, which follows it and says less
            lines = reported or list(tail)
            raise BincountError(f"training run {job.config.run} failed (exit status {proc.returncode}); "
                                f"last {len(lines)} stderr line(s):\n" + "\n".join(lines))
        return _outcome(job.config)

    def tune(self, job: TuneJob) -> TuneResult:
        from bincount.tune.local import run_local

        return run_local(job)

    def serve(self, job: ServeJob) -> Endpoint:
        from bincount.serve.local import start

        workdir = Path(job.workdir or tempfile.mkdtemp(prefix="bincount-serve-"))
        server = start(job.serve, workdir, timeout_s=job.timeout)
        return Endpoint(server.url, server.predict_url, f"kill {server.proc.pid}", server.stop)

    def check_audit(self, store: str, model: str) -> None:
        """Worker processes here read whatever this process reads."""

    def audit(self, cfg: AuditConfig, name: str) -> None:
        """The planned audit `name`'s shards, by `cfg.workers` processes here."""
        from bincount.audit.local import run_workers

        run_workers(cfg, name)


class KubernetesBackend:
    """One namespace of the cluster in `config`; it connects (in-cluster or via kubeconfig) on first use."""

    def __init__(self, cluster: Cluster | None = None, config: ClusterConfig | None = None,
                 audit_resources: JobResources | None = None):
        self._cluster = cluster
        self.config = cluster.config if cluster is not None else config or ClusterConfig()
        self.audit_resources = audit_resources or JobResources()

    @property
    def cluster(self) -> Cluster:
        if self._cluster is None:
            from bincount.k8s.launch import Cluster

            self._cluster = Cluster.connect(self.config)
        return self._cluster

    def train(self, job: TrainJob) -> TrainOutcome:
        """A training job (PyTorchJob or TrainJob) named after the run, followed to its end with rank 0's log on
        stdout."""
        from bincount.k8s.training import training_job
        from bincount.k8s.training_jobs import launcher

        cfg = job.config
        _needs_s3(cfg.store, "training")
        body = training_job(cfg.run, train_args(cfg), job.resources, self.config)
        launcher(self.cluster).run(body, timeout=job.timeout or math.inf, poll=job.poll, progress=_say, on_log=print)
        return _outcome(cfg)

    def tune(self, job: TuneJob) -> TuneResult:
        from bincount.tune.katib import run_katib

        return run_katib(job, self.cluster)

    def check_audit(self, store: str, model: str) -> None:
        """Pods read the store and the model over S3 only: refused before a plan is written."""
        _needs_s3(store, "an audit")
        if not model.startswith("s3://"):
            raise ConfigError(f"an audit on the kubernetes backend needs a model the pods reach (a run in the "
                              f"s3:// store or an s3:// URI), got {model!r}")

    def audit(self, cfg: AuditConfig, name: str) -> None:
        """The planned audit `name`'s shards, by an indexed Job of `cfg.workers` pods sized by `audit_resources`."""
        from bincount.audit.kubernetes import run_job
        from bincount.audit.plan import load_plan

        _needs_s3(cfg.store, "an audit")
        plan = load_plan(open_store(cfg.store), name)
        self.check_audit(cfg.store, plan.model)
        run_job(cfg, plan, self.cluster, self.config, self.audit_resources)

    def serve(self, job: ServeJob) -> Endpoint:
        """The InferenceService created, or its spec replaced; a canary becomes the spec at canaryTrafficPercent
        and KServe keeps the last rolled-out revision for the rest of the requests."""
        from bincount.k8s.launch import INFERENCE_SERVICE
        from bincount.k8s.resources import inference_service

        serve, name = job.serve, job.serve.name
        model, version = (serve.canary, serve.canary_version) if serve.canary else (serve.model, serve.version)
        percent = serve.canary_percent if serve.canary else (0 if job.hold_previous else None)
        if percent is not None and self._standard_mode(name, bool(serve.canary)):
            percent = None                      # a rollback in Standard mode: a rolling update back
        if job.logger_url and job.logger_mode not in LOGGER_MODES:
            raise ConfigError(f"logger mode {job.logger_mode!r} is not one of {', '.join(LOGGER_MODES)}")
        logger = {"url": job.logger_url, "mode": job.logger_mode} if job.logger_url else None
        body = inference_service(name, model, job.resources, self.config, version=version, canary_percent=percent,
                                 log_store=serve.log_store, logger=logger)
        self.cluster.apply(body)
        final = self.cluster.wait(INFERENCE_SERVICE, name, timeout=job.timeout, poll=job.poll, progress=_say)
        url = (final.get("status") or {}).get("url")
        if not url:
            raise BincountError(f"InferenceService {name} is ready but reports no status.url")
        return Endpoint(url, f"{url}/v1/models/{name}:predict",
                        f"kubectl delete inferenceservice {name} -n {self.config.namespace}",
                        lambda: self.cluster.delete(INFERENCE_SERVICE, name))

    def _standard_mode(self, name: str, canary: bool) -> bool:
        """Whether KServe runs the InferenceService in Standard (raw) mode, where there is no traffic split: a
        canary is refused there, in one line."""
        from bincount.k8s.launch import INFERENCE_SERVICE, NotFound

        try:
            current = self.cluster.get(INFERENCE_SERVICE, name)
        except NotFound:
            if canary:
                raise ConfigError(f"InferenceService {name} does not exist in namespace {self.config.namespace}: a "
                                  "canary splits traffic with the revision serving now; deploy without --canary "
                                  "first") from None
            return False
        mode = ((current.get("status") or {}).get("deploymentMode")
                or (current["metadata"].get("annotations") or {}).get(DEPLOYMENT_MODE_ANNOTATION, ""))
        if mode in STANDARD_MODES and canary:
            raise ConfigError(f"InferenceService {name} runs in KServe's {mode} (raw) mode, which rolls out by "
                              "replacing pods and cannot split traffic: canaryTrafficPercent needs Serverless "
                              "(Knative) mode; deploy without --canary, or run the endpoint in Serverless mode")
        return mode in STANDARD_MODES


def _needs_s3(store: str, what: str) -> None:
    if not store.startswith("s3://"):
        raise ConfigError(f"{what} on the kubernetes backend needs an s3:// store that the pods reach, "
                          f"got {store!r}")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# Each backend by name, made for a cluster config: the namespace and training API the kubernetes one works with.
BACKENDS: dict[str, Callable[[ClusterConfig | None], Backend]] = {
    "local": lambda cluster: LocalBackend(), "kubernetes": lambda cluster: KubernetesBackend(config=cluster)}


def get_backend(name: str, cluster: ClusterConfig | None = None) -> Backend:
    try:
        return BACKENDS[name](cluster)
    except KeyError:
        raise ConfigError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}") from None
