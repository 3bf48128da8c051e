"""Canary, promote and rollback: each step changes what an endpoint serves through a backend, then writes the
endpoint's record (`registry`), only once the backend reports the endpoint ready, so a failed rollout records
nothing.

    deploy RUN              RUN serves everything; the champion before it becomes a former champion
    deploy RUN --canary P   RUN answers P % of the requests beside the champion (locally one server holds both; on
                            a cluster RUN is the InferenceService's new revision at canaryTrafficPercent P)
    promote                 the challenger serves everything and becomes the champion
    rollback                with a challenger: it gets no more traffic (KServe's canaryTrafficPercent 0, the last
                            rolled-out revision keeps it all at once); without one: the former champion returns
"""

from __future__ import annotations

from dataclasses import dataclass

from bincount.backends import Backend, Endpoint
from bincount.config import DeployConfig, ServeConfig, ServeJob
from bincount.data.dataset import default_cache_root
from bincount.errors import ConfigError
from bincount.model.exported import read_meta, resolve_location
from bincount.rollout import registry
from bincount.rollout.registry import EndpointRecord, Version
from bincount.store import open_store


@dataclass
class StepResult:
    record: EndpointRecord
    endpoint: Endpoint

    def line(self) -> str:
        r = self.record
        event = r.history[-1]
        serving = f"{r.champion.run}" + (f" ({100 - r.challenger.canary_percent}%) and {r.challenger.run} "
                                         f"({r.challenger.canary_percent}%, canary)" if r.challenger else "")
        return (f"{event.action} {event.run} on endpoint {r.endpoint}: it serves {serving} at "
                f"{self.endpoint.predict_url} (stop it with: {self.endpoint.stop_hint})")


def deploy(cfg: DeployConfig, backend: Backend, backend_name: str) -> StepResult:
    """`cfg.model` to the endpoint, outright or (with `cfg.canary`) as the challenger at that percentage; the
    same challenger again changes its percentage."""
    store = open_store(cfg.store)
    record = registry.load(store, cfg.endpoint)
    if not cfg.model:
        raise ConfigError("deploy: name the run to deploy with --model RUN")
    run = cfg.model.strip("/").removeprefix("models/")
    location = resolve_location(run, store.uri)
    read_meta(location)
    version = Version(run, location, registry.now(), registry.evaluation_metrics(store, run), cfg.canary or 0)
    if cfg.canary is not None:
        if not 1 <= cfg.canary <= 99:
            raise ConfigError(f"deploy: --canary is the challenger's share of requests, 1 to 99 percent; got "
                              f"{cfg.canary}")
        if record.champion is None:
            raise ConfigError(f"endpoint {cfg.endpoint} has no champion to split traffic with; deploy {run} without "
                              "--canary first")
        if record.champion.run == run:
            raise ConfigError(f"{run} already serves endpoint {cfg.endpoint} as its champion")
        if record.challenger and record.challenger.run != run:
            raise ConfigError(f"endpoint {cfg.endpoint} already has {record.challenger.run} on canary; promote or roll "
                              "it back first")
        endpoint = backend.serve(_job(cfg, store.uri, record.champion, version))
        record.challenger = version
        record.log("canary", run, cfg.reason or f"on canary at {cfg.canary}%", version.metrics)
    else:
        if record.challenger:
            raise ConfigError(f"endpoint {cfg.endpoint} has {record.challenger.run} on canary; promote or roll it "
                              "back first")
        endpoint = backend.serve(_job(cfg, store.uri, version))
        record.log("deploy", run, cfg.reason or "deployed", version.metrics)
        if record.champion and record.champion.run != run:
            record.former.append(record.champion)
        record.champion = version
    return _saved(store, record, backend_name, endpoint)


def promote(cfg: DeployConfig, backend: Backend, backend_name: str) -> StepResult:
    store = open_store(cfg.store)
    record = registry.load(store, cfg.endpoint)
    if record.challenger is None:
        raise ConfigError(f"endpoint {cfg.endpoint} has no challenger to promote; put one on canary with "
                          "`bincount deploy --model RUN --canary PERCENT` first")
    challenger = record.challenger
    endpoint = backend.serve(_job(cfg, store.uri, challenger))
    record.log("promote", challenger.run, cfg.reason or f"promoted from canary at {challenger.canary_percent}%",
               challenger.metrics)
    record.former.append(record.champion)
    record.champion = Version(challenger.run, challenger.model, registry.now(), challenger.metrics)
    record.challenger = None
    return _saved(store, record, backend_name, endpoint)


def rollback(cfg: DeployConfig, backend: Backend, backend_name: str) -> StepResult:
    store = open_store(cfg.store)
    record = registry.load(store, cfg.endpoint)
    if record.challenger is not None:
        challenger = record.challenger
        endpoint = backend.serve(_job(cfg, store.uri, record.champion, hold_previous=True))
        record.log("rollback", challenger.run, cfg.reason or f"canary of {challenger.run} rolled back",
                   challenger.metrics)
        record.challenger = None
    elif record.former:
        previous = record.former[-1]
        endpoint = backend.serve(_job(cfg, store.uri, previous))
        record.log("rollback", previous.run, cfg.reason or f"{record.champion.run} rolled back to {previous.run}",
                   previous.metrics)
        record.former.pop()
        record.champion = Version(previous.run, previous.model, registry.now(), previous.metrics)
    else:
        first = f" ({record.champion.run} is the first it served)" if record.champion else ""
        raise ConfigError(f"endpoint {cfg.endpoint} has no previous version to roll back to{first}")
    return _saved(store, record, backend_name, endpoint)


def _job(cfg: DeployConfig, store: str, champion: Version, challenger: Version | None = None,
         hold_previous: bool = False) -> ServeJob:
    serve = ServeConfig(model=champion.model, name=cfg.endpoint, port=cfg.port, version=champion.run,
                        log_store=store if cfg.log else "")
    if challenger:
        serve.canary, serve.canary_percent, serve.canary_version = (challenger.model, challenger.canary_percent,
                                                                    challenger.run)
    return ServeJob(serve, workdir=str(default_cache_root() / "serving" / cfg.endpoint), timeout=cfg.timeout,
                    hold_previous=hold_previous, logger_url=cfg.logger_url, logger_mode=cfg.logger_mode)


def _saved(store, record: EndpointRecord, backend_name: str, endpoint: Endpoint) -> StepResult:
    record.backend, record.url = backend_name, endpoint.url
    registry.save(store, record)
    return StepResult(record, endpoint)
