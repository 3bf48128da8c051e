"""The local twin of a Katib Experiment: an optuna study over the same search space.

Each trial runs what a Katib trial runs — the trainer entrypoint with the space's trainer arguments, the
parameter flags and `--run-id` — and is judged by what Katib's StdOut collector reads: the trainer's metric
lines, parsed with the same regex. A trial of several processes runs under torchrun
(`JobResources.torchrun_argv`); a single-process trial, which the trainer runs without torchrun, is forked from
a server that has imported the trainer once, so that a trial training a head on cached features for a fraction
of a second does not wait seconds for an interpreter to import torch. Intermediate values go to optuna's median
pruner (Katib's medianstop settings); a stopped trial's process is terminated (torchrun stops its workers). One
thread owns the study through optuna's ask-and-tell interface; reader threads only forward stdout lines.

When the trials share cached backbone features, the first trial runs alone, with every core, until it prints an
epoch: by then it has put the features in the store, and the trials after it only read them.

The study lives in a local SQLite file that is copied whole to `tuning/<experiment>/study.db` in the store after
every change. A rerun starts from that copy: finished trials stay finished, and a trial that was running when
the tuner died runs again under its old run id, so the trainer resumes it from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing
import multiprocessing.forkserver
import os
import queue
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from bincount import processes
from bincount.config import TuneJob
from bincount.data.dataset import default_cache_root
from bincount.errors import BincountError, ConfigError
from bincount.k8s.conventions import METRICS_FORMAT, RUN_FLAG
from bincount.store import KeyNotFoundError, Store, open_store
from bincount.train import entry
from bincount.tune import results
from bincount.tune.results import Progress, TrialRecord, TuneResult, say
from bincount.tune.space import SearchSpace, check_name, load_space, require_dataset, text

METRIC = re.compile(METRICS_FORMAT)
RUN_ATTR, RESUMES_ATTR, MESSAGE_ATTR, METRICS_ATTR, KILLED_ATTR = "run", "resumes", "message", "metrics", "killed"
SPACE_ATTR = "space"
KILL_GRACE = 20.0
# What a forked trial runs, imported once by the fork server: this module, which imports the trainer and its
# entry that parses the flags, and the plotting library that draws the trainer's report.
PRELOAD = ("bincount.tune.local", "matplotlib.pyplot")


class TuneFailed(BincountError):
    """The search stopped because more trials failed than the space allows."""


def run_local(job: TuneJob, progress: Progress = say) -> TuneResult:
    """The search, to the end or to its first failure. Single-process trials are forked by multiprocessing's fork
    server, which imports the caller's main module in each trial, so a script calling this guards its entry with
    `if __name__ == "__main__":`."""
    space = load_space(job.space or None)
    name = job.experiment or space.name
    check_name(name)
    store = open_store(job.store)
    require_dataset(store, job.dataset)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    workdir = Path(job.workdir) if job.workdir else default_cache_root() / "tuning" / _store_id(store) / name
    forks = _fork_server() if space.resources.procs_per_worker == 1 else None
    study_file = StudyFile(store, f"{results.prefix(name)}/study.db", workdir / "study.db")
    study_file.pull()
    search = _Search(space, name, job, study_file, workdir / "logs", progress, forks)
    with _sigterm_as_interrupt():
        search.run()
    trials = search.records()
    result = TuneResult(name, "local", space, trials, results.best_of(space, trials),
                        store.url(results.prefix(name)))
    results.write(store, result)
    if search.failures_exceeded:
        raise TuneFailed(f"experiment {name}: {search.failures_exceeded}; trials in {result.location}/trials.csv, "
                         f"logs in {workdir / 'logs'}\n{result.table()}")
    return result


def _store_id(store: Store) -> str:
    return hashlib.sha256(store.uri.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """A terminated tuner (kill, a pod's shutdown) cleans up like an interrupted one: trials stopped, study
    saved. Signal handlers belong to the main thread; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StudyFile:
    """The study's SQLite database: worked on locally, its consistent snapshot copied to the store."""

    def __init__(self, store: Store, key: str, path: Path):
        self.store, self.key, self.path = store, key, path

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"

    def pull(self) -> None:
        """The store's copy is the truth; without one the search starts afresh."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.store.get_file(self.key, self.path)
        except KeyNotFoundError:
            self.path.unlink(missing_ok=True)

    def push(self) -> None:
        with tempfile.TemporaryDirectory(dir=self.path.parent) as tmp:
            snapshot = Path(tmp) / "study.db"
            with contextlib.closing(sqlite3.connect(self.path)) as src, \
                    contextlib.closing(sqlite3.connect(snapshot)) as dst:
                src.backup(dst)
            self.store.put_file(self.key, snapshot)


class _GridSampler(optuna.samplers.GridSampler):
    """optuna's grid without its self-stop, which only works inside `study.optimize`; the search stops at the
    grid's size itself, as Katib's grid does."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def _seed(settings: dict[str, str]) -> int | None:
    return int(settings["random_state"]) if "random_state" in settings else None


def _ints(settings: dict[str, str], **names: str) -> dict[str, int]:
    """Katib setting names → optuna keyword arguments, for the settings that are present."""
    return {kw: int(settings[name]) for kw, name in names.items() if name in settings}


SAMPLERS: dict[str, Callable[[SearchSpace], optuna.samplers.BaseSampler]] = {
    "random": lambda s: optuna.samplers.RandomSampler(seed=_seed(s.algorithm_settings)),
    "grid": lambda s: _GridSampler({p.name: p.grid() for p in s.parameters}, seed=_seed(s.algorithm_settings)),
    "tpe": lambda s: optuna.samplers.TPESampler(
        seed=_seed(s.algorithm_settings), constant_liar=s.parallel_trials > 1,
        **_ints(s.algorithm_settings, n_startup_trials="n_startup_trials", n_ei_candidates="n_ei_candidates")),
    "multivariate-tpe": lambda s: optuna.samplers.TPESampler(
        seed=_seed(s.algorithm_settings), constant_liar=s.parallel_trials > 1, multivariate=True,
        **_ints(s.algorithm_settings, n_startup_trials="n_startup_trials", n_ei_candidates="n_ei_candidates")),
    "cmaes": lambda s: optuna.samplers.CmaEsSampler(
        seed=_seed(s.algorithm_settings),
        sigma0=float(s.algorithm_settings["sigma"]) if "sigma" in s.algorithm_settings else None),
    "bayesianoptimization": lambda s: optuna.samplers.GPSampler(
        seed=_seed(s.algorithm_settings), **_ints(s.algorithm_settings, n_startup_trials="n_initial_points")),
    "sobol": lambda s: optuna.samplers.QMCSampler(qmc_type="sobol", seed=_seed(s.algorithm_settings)),
}


def sampler(space: SearchSpace) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)     # QMCSampler's
        return SAMPLERS[space.algorithm](space)


def pruner(space: SearchSpace) -> optuna.pruners.BasePruner:
    """Katib's medianstop as optuna's median pruner: `min_trials` finished trials before any stop, none before
    epoch `start_step` (epochs are the steps, counted from 1)."""
    stop = space.early_stopping
    if stop is None:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=stop.min_trials, n_warmup_steps=stop.start_step)


def trial_args(space: SearchSpace, job: TuneJob, params: dict[str, Any], run: str) -> list[str]:
    """The trainer's arguments: what the Katib trial's container runs after `torchrun -m bincount.train`."""
    return [*space.trial_args(job.store, job.dataset), *space.parameter_args(params), RUN_FLAG, run]


def trial_argv(space: SearchSpace, job: TuneJob, params: dict[str, Any], run: str) -> list[str]:
    """A trial's command under torchrun."""
    return [*space.resources.torchrun_argv(), *trial_args(space, job, params, run)]


def _trainer(args: list[str], stdout: Connection, log: str, env: dict[str, str]) -> None:
    """A forked trial: the tuner's pipe as stdout, the trial's log as stderr, the tuner's environment of now (the
    fork server's dates from its start) with the trial's thread count, then `python -m bincount.train ARGS`."""
    os.dup2(stdout.fileno(), 1)
    stdout.close()
    with open(log, "a") as err:
        os.dup2(err.fileno(), 2)
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.exit(entry.main(args))


def _fork_server() -> multiprocessing.context.ForkServerContext:
    """The context that forks single-process trials. Its server starts now and imports PRELOAD while the study
    loads; it serves every later search of this process too."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))        # no effect once the server runs
    multiprocessing.forkserver.ensure_running()
    return context


class _Forked:
    """A single-process trial forked from the fork server, with the part of Popen's interface the search uses."""

    def __init__(self, context: multiprocessing.context.ForkServerContext, args: list[str], log: Path,
                 env: dict[str, str]):
        reader, writer = context.Pipe(duplex=False)
        self.process = context.Process(target=_trainer, args=(args, writer, str(log), env))
        self.process.start()
        writer.close()
        self.stdout = open(os.dup(reader.fileno()), encoding="utf-8")
        reader.close()

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(self.process.name, timeout)
        return self.process.exitcode

    def terminate(self) -> None:
        self.process.terminate()

    def kill(self) -> None:
        self.process.kill()


def fingerprint(space: SearchSpace) -> dict[str, Any]:
    """What a resumed study must share with the space: the same trials must mean the same thing."""
    return json.loads(json.dumps({"objective": asdict(space.objective),
                                  "parameters": [asdict(p) for p in space.parameters], "trial": space.trial}))


def open_study(space: SearchSpace, name: str, url: str) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=url, direction=space.objective.goal,
                                sampler=sampler(space), pruner=pruner(space), load_if_exists=True)
    if study.direction.name.lower() != space.objective.goal:
        raise ConfigError(f"experiment {name} was started to {study.direction.name.lower()} its objective; "
                          "use another --experiment name for this search space")
    stored = study.user_attrs.get(SPACE_ATTR)
    if stored is None:
        study.set_user_attr(SPACE_ATTR, fingerprint(space))
    elif stored != fingerprint(space):
        raise ConfigError(f"experiment {name} was started with another search space (objective, parameters or "
                          "trial settings differ); use another --experiment name, or the tuning.yaml it began with")
    return study


@dataclass
class _Trial:
    """A trial whose trainer is running."""

    trial: optuna.Trial
    run: str
    proc: subprocess.Popen | _Forked
    log: Path
    started: float = field(default_factory=time.monotonic)
    values: dict[int, float] = field(default_factory=dict)       # epoch → objective
    latest: dict[str, float] = field(default_factory=dict)
    pruned_at: int | None = None

    def stop(self) -> None:
        """SIGTERM ends a forked trainer; torchrun forwards it to its workers and exits."""
        processes.stop(self.proc, KILL_GRACE)


class _Search:
    def __init__(self, space: SearchSpace, name: str, job: TuneJob, study_file: StudyFile, logs: Path,
                 progress: Progress, forks: multiprocessing.context.ForkServerContext | None):
        self.space, self.name, self.job, self.file, self.logs = space, name, job, study_file, logs
        self.say, self.forks = progress, forks
        self.study = open_study(space, name, study_file.url)
        self.budget = space.max_trials
        if space.algorithm == "grid":
            sizes = [len(p.grid()) for p in space.parameters]
            self.budget = min(self.budget, math.prod(sizes))
        self.running: dict[int, _Trial] = {}
        self.events: queue.Queue[tuple[int, str | None]] = queue.Queue()
        self.stopping = ""
        self.failures_exceeded = ""
        self.warming = space.shares_features and self._counts()[0] == 0

    # ---- bookkeeping from the study itself, so a resumed search counts what the killed one did

    def _resumed(self) -> set[int]:
        return {t.user_attrs[RESUMES_ATTR] for t in self.study.get_trials(deepcopy=False)
                if RESUMES_ATTR in t.user_attrs}

    def _counts(self) -> tuple[int, int]:
        """(finished trials, failed trials); a trial that was interrupted and runs again counts once."""
        resumed = self._resumed()
        finished = failed = 0
        for t in self.study.get_trials(deepcopy=False):
            if t.state == TrialState.FAIL and t.number not in resumed:
                finished += 1
                failed += not t.user_attrs.get(KILLED_ATTR)
            elif t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                finished += 1
        return finished, failed

    def resume(self) -> None:
        """Trials left running by a killed tuner run again, first, under their old run ids."""
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self.study.tell(t.number, state=TrialState.FAIL)
            self.study.enqueue_trial(t.params, user_attrs={RUN_ATTR: t.user_attrs[RUN_ATTR],
                                                           RESUMES_ATTR: t.number})
            self.say(f"trial {t.user_attrs[RUN_ATTR]} was interrupted; it runs again from its last checkpoint")
        finished, _ = self._counts()
        if finished:
            self.say(f"resuming experiment {self.name}: {finished} of {self.budget} trial(s) already finished")
        self.file.push()

    def run(self) -> None:
        self.resume()
        try:
            while True:
                while self._can_launch():
                    self._launch()
                if not self.running:
                    return
                number, line = self.events.get()
                current = self.running.get(number)
                if current is None:
                    continue
                if line is None:
                    self._finish(current)
                else:
                    self._observe(current, line)
        finally:
            for current in self.running.values():       # left RUNNING in the study: the next run resumes them
                current.stop()
            self.running.clear()
            self.file.push()

    def _parallel(self) -> int:
        return 1 if self.warming else self.space.parallel_trials

    def _can_launch(self) -> bool:
        """Asked after every stdout line: the study is read only when a trial could start."""
        if self.stopping or len(self.running) >= self._parallel():
            return False
        finished, _ = self._counts()
        return finished + len(self.running) < self.budget

    def _launch(self) -> None:
        trial = self.study.ask(self.space.distributions())
        run = trial.user_attrs.get(RUN_ATTR) or f"{self.name}-{trial.number:03d}-{secrets.token_hex(3)}"
        trial.set_user_attr(RUN_ATTR, run)
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{run}.log"
        env = self.space.resources.torchrun_env(concurrent_jobs=self._parallel())
        proc: subprocess.Popen | _Forked
        if self.forks is not None:
            proc = _Forked(self.forks, trial_args(self.space, self.job, trial.params, run), log, env)
        else:
            with open(log, "a") as err:
                proc = subprocess.Popen(trial_argv(self.space, self.job, trial.params, run), stdout=subprocess.PIPE,
                                        stderr=err, stdin=subprocess.DEVNULL, env=env, text=True, bufsize=1)
        current = _Trial(trial, run, proc, log)
        self.running[trial.number] = current
        threading.Thread(target=_forward, args=(trial.number, proc, self.events), daemon=True).start()
        self.say(f"trial {run} started: {_settings(self.space.typed_parameters(trial.params))}")
        self.file.push()

    def _observe(self, current: _Trial, line: str) -> None:
        """One stdout line, read as Katib's StdOut collector reads it: every `name=value` whose name is a metric."""
        pairs = {name: value for name, value, *_ in METRIC.findall(line)}
        metrics = {}
        for name in self.space.metrics:
            with contextlib.suppress(KeyError, ValueError):
                metrics[name] = float(pairs[name])
        objective = self.space.objective.metric
        if objective not in metrics or current.pruned_at is not None:
            return
        self.warming = False
        current.latest.update(metrics)
        epoch = int(float(pairs["epoch"])) if "epoch" in pairs else len(current.values) + 1
        current.values[epoch] = metrics[objective]
        self.say(f"trial {current.run} epoch {epoch}: {objective}={metrics[objective]:g}")
        current.trial.report(metrics[objective], epoch)
        if current.trial.should_prune():
            current.pruned_at = epoch
            current.stop()

    def _finish(self, current: _Trial) -> None:
        code = current.proc.wait()
        del self.running[current.trial.number]
        self.warming = False
        trial, objective = current.trial, self.space.objective
        seconds = time.monotonic() - current.started
        trial.set_user_attr(METRICS_ATTR, current.latest)
        if current.pruned_at is not None:
            self.study.tell(trial, state=TrialState.PRUNED)
            self.say(f"trial {current.run} early-stopped at epoch {current.pruned_at}: {objective.metric}="
                     f"{current.values[current.pruned_at]:g} is worse than the median of finished trials")
        elif code == 0 and current.values:
            value = objective.best(list(current.values.values()))
            self.study.tell(trial, value)
            self.say(f"trial {current.run} succeeded in {seconds:.1f} s: {objective.metric}={value:g}")
            if objective.reached(value) and not self.stopping:
                self.stopping = f"trial {current.run} reached the goal {objective.metric}={objective.target:g}"
                self.say(self.stopping)
        else:
            why = (f"exit code {code}: {_last_error(current.log)}" if code else
                   f"the trainer printed no {objective.metric} (metrics unavailable)")
            trial.set_user_attr(MESSAGE_ATTR, why)
            self.study.tell(trial, state=TrialState.FAIL)
            self.say(f"trial {current.run} failed ({why}); log: {current.log}")
            self._check_failures()
        self.file.push()

    def _check_failures(self) -> None:
        """Katib fails an experiment once more than maxFailedTrialCount trials failed; so does this one, killing
        the trials still running."""
        _, failed = self._counts()
        if failed <= self.space.max_failed_trials or self.stopping:
            return
        self.stopping = self.failures_exceeded = (f"{failed} trial(s) failed, more than max_failed_trials "
                                                  f"({self.space.max_failed_trials})")
        for current in list(self.running.values()):
            current.stop()
            current.trial.set_user_attr(KILLED_ATTR, True)
            current.trial.set_user_attr(MESSAGE_ATTR, "killed: the experiment failed")
            self.study.tell(current.trial, state=TrialState.FAIL)
            del self.running[current.trial.number]

    def records(self) -> list[TrialRecord]:
        resumed = self._resumed()
        out = []
        for t in self.study.get_trials(deepcopy=False):
            if t.state == TrialState.WAITING:
                continue
            intermediate = list(t.intermediate_values.values())
            if t.state == TrialState.COMPLETE:
                state, value = results.SUCCEEDED, t.value
            elif t.state == TrialState.PRUNED:
                state, value = results.EARLY_STOPPED, self.space.objective.best(intermediate) if intermediate else None
            elif t.state == TrialState.FAIL:
                state = (results.INTERRUPTED if t.number in resumed else
                         results.KILLED if t.user_attrs.get(KILLED_ATTR) else results.FAILED)
                value = None
            else:
                state, value = results.RUNNING, None
            seconds = ((t.datetime_complete - t.datetime_start).total_seconds()
                       if t.datetime_complete and t.datetime_start else None)
            out.append(TrialRecord(t.user_attrs.get(RUN_ATTR, f"trial-{t.number}"), state,
                                   self.space.typed_parameters(t.params), value,
                                   dict(t.user_attrs.get(METRICS_ATTR, {})), seconds,
                                   t.user_attrs.get(MESSAGE_ATTR, "")))
        return out


def _forward(number: int, proc: subprocess.Popen | _Forked, events: queue.Queue) -> None:
    for line in proc.stdout:
        events.put((number, line.rstrip("\n")))
    proc.stdout.close()
    events.put((number, None))


def _settings(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={text(v)}" for k, v in values.items())


def _last_error(log: Path) -> str:
    """The trainer's one-line error if it printed one, else the log's last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("bincount: error:")]
    return (errors or lines or ["no output"])[-1]
