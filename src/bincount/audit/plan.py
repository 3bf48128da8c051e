"""What an audit covers, fixed once in the store so every worker, every rerun and every pod agrees on it.

`audits/<name>/plan.json` holds the settings that decide the output and `work.jsonl` the bins, in shard order.
A rerun with the same settings resumes the audit; one with other settings is refused, never mixed in.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from bincount.config import CLASSES, AuditConfig
from bincount.data.abid import IMAGES, RAW
from bincount.data.dataset import load_split
from bincount.errors import ConfigError
from bincount.model.exported import read_meta, resolve_location
from bincount.store import KeyNotFoundError, Store, StoreError, open_store

AUDITS = "audits"
PLAN = "plan.json"
WORK = "work.jsonl"
METADATA = "metadata"
IMAGE_SUFFIX = ".jpg"
# The settings that decide an audit's output; the rest (workers, threads, batch size, device) only its speed.
IDENTITY = ("model", "dataset", "split", "ids", "all", "after", "modified_after", "expected", "shard_size",
            "precision", "max_pixels")


def audit_prefix(name: str) -> str:
    return f"{AUDITS}/{name}"


def shard_key(name: str, shard: int) -> str:
    return f"{audit_prefix(name)}/shards/{shard:05d}.jsonl"


@dataclass
class Plan:
    name: str
    model: str                                  # the resolved model location every worker loads
    classes: list[int]
    shards: int
    bins: int
    settings: dict                              # the IDENTITY settings it was made with
    csv_problems: dict[str, int]                # bad rows of an expected-quantities CSV, by reason

    def work(self, store: Store) -> list[dict]:
        text = store.get_text(f"{audit_prefix(self.name)}/{WORK}")
        return [json.loads(line) for line in text.splitlines()]


AGE = re.compile(r"^(\d+)([hd])$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def default_name(cfg: AuditConfig) -> str:
    """`--name` with `{date}` replaced by today's UTC date (a scheduled audit's runs each get their own), or
    audit-<model's run>."""
    name = (cfg.name or f"audit-{Path(cfg.model.rstrip('/')).name}").replace(
        "{date}", time.strftime("%Y-%m-%d", time.gmtime()))
    if not NAME.match(name) or len(name) > 200:
        raise ConfigError(f"audit: name {name!r} must be letters, digits, '.', '_' and '-'")
    return name


def make_plan(cfg: AuditConfig) -> Plan:
    """The audit's plan: the one already in the store when the settings match (resume), else a new one."""
    _check(cfg)
    name = default_name(cfg)
    store = open_store(cfg.store)
    store.check()
    location = resolve_location(cfg.model, cfg.store)
    if "://" not in location and Path(location).is_dir():
        location = str(Path(location).resolve())
    settings = {**{k: getattr(cfg, k) for k in IDENTITY}, "model": location}
    existing = load_plan(store, name, missing_ok=True)
    if existing is not None:
        changed = [k for k in IDENTITY if existing.settings.get(k) != settings[k]]
        if changed:
            raise ConfigError(f"audit {name!r} already exists in {store.uri} with other settings "
                              f"({', '.join(changed)}); choose another --name")
        return existing
    classes = read_meta(location)["classes"]
    keys = select_keys(cfg, store, classes)
    expected, csv_problems = ({}, {}) if cfg.expected == METADATA else read_csv(cfg.expected, set(keys))
    work = [{"key": k, **({"expected": expected.get(k)} if cfg.expected != METADATA else {})} for k in keys]
    plan = Plan(name, location, list(classes), -(-len(keys) // cfg.shard_size), len(keys), settings,
                csv_problems)
    prefix = audit_prefix(name)
    store.check(write=True)
    store.put_text(f"{prefix}/{WORK}", "".join(json.dumps(w) + "\n" for w in work))
    store.put_text(f"{prefix}/{PLAN}", json.dumps(plan.__dict__, indent=2) + "\n")  # last: marks the plan whole
    return plan


def load_plan(store: Store, name: str, missing_ok: bool = False) -> Plan | None:
    try:
        return Plan(**json.loads(store.get_text(f"{audit_prefix(name)}/{PLAN}")))
    except KeyNotFoundError:
        if missing_ok:
            return None
        raise ConfigError(f"no audit {name!r} in {store.uri}: {audit_prefix(name)}/{PLAN} is missing") from None


def _check(cfg: AuditConfig) -> None:
    chosen = [what for what, on in (("--dataset/--split", bool(cfg.dataset or cfg.split)), ("--ids", bool(cfg.ids)),
                                    ("--all", cfg.all)) if on]
    if len(chosen) != 1:
        raise ConfigError("audit: choose the bins with exactly one of --dataset NAME --split S, --ids, --all"
                          + (f" (got {', '.join(chosen)})" if chosen else ""))
    if (cfg.dataset or cfg.split) and not (cfg.dataset and cfg.split):
        raise ConfigError("audit: --dataset and --split go together")
    if (cfg.after or cfg.modified_after) and not cfg.all:
        raise ConfigError("audit: --after and --modified-after select among --all")
    if cfg.modified_after:
        _since(cfg.modified_after)
    for field_name in ("shard_size", "workers", "batch_size", "threads", "top", "max_pixels"):
        if getattr(cfg, field_name) < 1:
            raise ConfigError(f"audit: {field_name} must be at least 1, got {getattr(cfg, field_name)}")
    if cfg.review < 0 or not 0 <= cfg.threshold <= 1 or not 0 < cfg.target_precision < 1 or not 0 <= cfg.error_rate < 1:
        raise ConfigError(f"audit: review must be 0 or more, threshold in [0, 1] (0: off), target precision in (0, 1) "
                          f"and error_rate in [0, 1) (0: estimated), got {cfg.review}, {cfg.threshold}, "
                          f"{cfg.target_precision} and {cfg.error_rate}")
    bad = [k for k in cfg.ids if not _valid_key(k)]
    if bad:
        raise ConfigError(f"audit: invalid bin id(s): {', '.join(map(repr, bad[:5]))}")


def _valid_key(key: str) -> bool:
    return bool(key) and key not in (".", "..") and "/" not in key and "\\" not in key


def _since(text: str) -> float:
    """An ISO 8601 time, or an age such as 24h or 7d before now."""
    age = AGE.match(text)
    if age:
        return time.time() - int(age[1]) * (3600 if age[2] == "h" else 86400)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"audit: --modified-after {text!r} is not an ISO 8601 time like 2025-01-31T12:00:00Z "
                          "nor an age like 24h or 7d") from None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def select_keys(cfg: AuditConfig, store: Store, classes=CLASSES) -> list[str]:
    """The bins in a stable order (a split's own order; sorted ids or keys), each once."""
    if cfg.dataset:
        keys = [item.key for item in load_split(store, cfg.dataset, cfg.split, classes)]
    elif cfg.ids:
        keys = sorted(cfg.ids)
    else:
        since = _since(cfg.modified_after) if cfg.modified_after else None
        prefix = f"{RAW}/{IMAGES}/"
        keys = sorted(info.key[len(prefix):-len(IMAGE_SUFFIX)] for info in store.list(prefix)
                      if info.key.endswith(IMAGE_SUFFIX) and "/" not in info.key[len(prefix):]
                      and info.key[len(prefix):-len(IMAGE_SUFFIX)] > cfg.after
                      and (since is None or (info.modified is not None and info.modified > since)))
    keys = list(dict.fromkeys(keys))
    if not keys:
        raise ConfigError(f"audit: no bins selected in {store.uri}")
    return keys


def read_csv(location: str, keys: set[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Expected quantities from a CSV with header `key,expected`; keys stay strings. Returns the quantities and the
    bad rows counted by reason (a bad row is skipped, not fatal)."""
    try:
        if "://" in location:
            parent, _, leaf = location.rpartition("/")
            text = open_store(parent).get_text(leaf)
        else:
            text = Path(location).read_text(encoding="utf-8")
    except (OSError, KeyNotFoundError, UnicodeDecodeError) as e:
        raise ConfigError(f"audit: cannot read expected quantities {location}: {getattr(e, 'strerror', None) or e}")
    except StoreError as e:
        raise ConfigError(f"audit: cannot read expected quantities {location}: {e}") from None
    rows = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(rows, [])]
    if header != ["key", "expected"]:
        raise ConfigError(f"audit: {location} must start with the header key,expected (got {','.join(header)!r})")
    expected: dict[str, int] = {}
    problems: dict[str, int] = {}

    def bad(reason: str) -> None:
        problems[reason] = problems.get(reason, 0) + 1

    for row in rows:
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2:
            bad("not two columns")
            continue
        key, value = row[0].strip(), row[1].strip()
        if not _valid_key(key):
            bad("invalid key")
        elif not value.isdigit():
            bad("expected is not a count")
        elif key in expected:
            bad("duplicate key")
        elif key not in keys:
            bad("key not in the audited bins")
        else:
            expected[key] = int(value)
    return expected, problems
