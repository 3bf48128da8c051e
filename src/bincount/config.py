"""Typed configs for every stage: dataclasses loadable from YAML and overridable from the command line.

`load_config(Cls, path, overrides)` is the one way a config is made: YAML values first, then the non-None
overrides (the CLI's flags), each coerced to the field's declared type; unknown keys are errors that list the
valid ones, so a typo in a YAML file never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

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
class EdaConfig:
    """The exploratory report of one prepared dataset, written to `reports/<name>/eda/`."""

    store: str
    name: str
    samples_per_class: int = 6
    workers: int = 16


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
