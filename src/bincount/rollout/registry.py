"""Model versions per endpoint: `serving/<endpoint>.json` names the run that serves the endpoint (the champion), the
run on trial beside it (the challenger, on canary at a percentage), the former champions a rollback returns to,
and the history of every step with its time, the metrics it was judged by and the reason.

Every exported model already lives in `models/<run>/`; this record is what a registry adds. It is one small object
per endpoint, written whole (the store's writes are atomic), so a reader sees it before or after a step, never
half of one. Steps are meant to come from one place at a time (a person, or the pipeline's deploy step).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from bincount.errors import BincountError, ConfigError
from bincount.model.exported import META_FILE
from bincount.store import KeyNotFoundError, Store

PREFIX = "serving"
FORMAT = 1
ENDPOINT_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
ACTIONS = ("deploy", "canary", "promote", "rollback", "refused")
SHOWN_METRICS = ("accuracy", "balanced_accuracy", "mae")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def check_endpoint(endpoint: str) -> str:
    """An endpoint names an InferenceService (a DNS label) and a store key."""
    if not ENDPOINT_RE.match(endpoint):
        raise ConfigError(f"endpoint {endpoint!r} must be a lower-case DNS label (letters, digits and '-', "
                          "starting with a letter): it names the InferenceService")
    return endpoint


def record_key(endpoint: str) -> str:
    return f"{PREFIX}/{check_endpoint(endpoint)}.json"


@dataclass
class Version:
    run: str
    model: str                                  # the exported model's URI
    since: str                                  # when it took this role
    metrics: dict[str, float] = field(default_factory=dict)   # its test metrics where evaluated
    canary_percent: int = 0                     # a challenger's share of the requests


@dataclass
class Event:
    time: str
    action: str                                 # one of ACTIONS
    run: str
    previous: str | None                        # the champion before the step
    reason: str
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class EndpointRecord:
    endpoint: str
    champion: Version | None = None
    challenger: Version | None = None
    former: list[Version] = field(default_factory=list)      # champions a rollback returns to, latest last
    history: list[Event] = field(default_factory=list)
    backend: str = ""
    url: str = ""

    def log(self, action: str, run: str, reason: str, metrics: dict[str, float] | None = None) -> Event:
        event = Event(now(), action, run, self.champion.run if self.champion else None, reason, dict(metrics or {}))
        self.history.append(event)
        return event

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **dataclasses.asdict(self)}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> EndpointRecord:
        try:
            data = json.loads(text)
            version = (lambda v: Version(**v) if v else None)
            return cls(endpoint=data["endpoint"], champion=version(data.get("champion")),
                       challenger=version(data.get("challenger")),
                       former=[Version(**v) for v in data.get("former", [])],
                       history=[Event(**e) for e in data.get("history", [])],
                       backend=data.get("backend", ""), url=data.get("url", ""))
        except (ValueError, KeyError, TypeError) as e:
            raise BincountError(f"{where} is not an endpoint record ({e}); fix or delete it") from None


def load(store: Store, endpoint: str) -> EndpointRecord:
    """The endpoint's record, or an empty one where nothing was ever deployed to it."""
    key = record_key(endpoint)
    try:
        return EndpointRecord.from_json(store.get_text(key), store.url(key))
    except KeyNotFoundError:
        return EndpointRecord(endpoint)


def save(store: Store, record: EndpointRecord) -> None:
    store.put_text(record_key(record.endpoint), record.to_json())


def records(store: Store) -> list[EndpointRecord]:
    return [EndpointRecord.from_json(store.get_text(o.key), store.url(o.key)) for o in store.list(f"{PREFIX}/")
            if o.key.endswith(".json") and "/" not in o.key[len(PREFIX) + 1:]]


def evaluation_metrics(store: Store, run: str) -> dict[str, float]:
    """The run's metrics from its evaluation (reports/<run>/evaluation/metrics.json), where it was evaluated."""
    from bincount.evaluate import report_prefix

    try:
        metrics = json.loads(store.get_text(f"{report_prefix(run)}/metrics.json"))
    except (KeyNotFoundError, ValueError):
        return {}
    return {k: metrics[k] for k in SHOWN_METRICS if k in metrics}


def validation_metrics(meta: dict[str, Any]) -> dict[str, float]:
    """As exported (with its TTA and calibration) where training measured that, else the best epoch's."""
    exported = meta.get("validation") or {}
    if exported:
        return {k: exported[k] for k in SHOWN_METRICS if k in exported}
    best = meta.get("metrics") or {}
    return {k: best[f"val_{k}"] for k in SHOWN_METRICS if f"val_{k}" in best}


@dataclass
class ModelRow:
    run: str
    arch: str
    dataset: str
    validation: dict[str, float]
    test: dict[str, float]
    roles: list[str]


def roles(found: list[EndpointRecord]) -> dict[str, list[str]]:
    """run → what it is on which endpoint."""
    out: dict[str, list[str]] = {}
    for record in found:
        if record.champion:
            out.setdefault(record.champion.run, []).append(f"champion of {record.endpoint}")
        if record.challenger:
            out.setdefault(record.challenger.run, []).append(
                f"challenger of {record.endpoint} ({record.challenger.canary_percent}%)")
        for version in record.former:
            out.setdefault(version.run, []).append(f"former champion of {record.endpoint}")
    return out


def list_models(store: Store) -> list[ModelRow]:
    """Every exported model under models/, with its validation and test metrics and its roles."""
    by_run = roles(records(store))
    rows = []
    for obj in store.list("models/"):
        parts = obj.key.split("/")
        if len(parts) != 3 or parts[2] != META_FILE:
            continue
        try:
            meta = json.loads(store.get_text(obj.key))
        except ValueError:
            continue
        run = parts[1]
        rows.append(ModelRow(run, meta.get("arch", "?"), (meta.get("config") or {}).get("dataset", "?"),
                             validation_metrics(meta), evaluation_metrics(store, run), by_run.get(run, [])))
    return rows
