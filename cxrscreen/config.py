"""Plain YAML configs mapped onto typed dataclasses (unknown keys are errors, no logic here)."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used; the message has one line per problem."""


def from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclass fields.

    Every key is checked before anything runs: unknown keys, types (``batch_size: "eight"``),
    and the allowed values a dataclass declares in ``CHOICES`` (key -> allowed values) and
    ``POSITIVE`` / ``NON_NEGATIVE`` (keys whose number must be > 0 / >= 0). All problems are
    reported together, one line each (``ConfigError``)."""
    problems: list[str] = []
    obj = _build(cls, dict(data or {}), cls.__name__, problems)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return obj


def _build(cls, data: dict, where: str, problems: list[str]):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in sorted(set(data) - names):
        problems.append(f"{where}.{key}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        if key in names:
            kwargs[key] = _coerce(hints[key], value, f"{where}.{key}", problems)
    choices = getattr(cls, "CHOICES", {})
    for key, value in kwargs.items():
        if key in choices and value is not None and value not in choices[key]:
            problems.append(f"{where}.{key}: {value!r} is not one of {', '.join(map(repr, choices[key]))}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if key in getattr(cls, "POSITIVE", ()) and not value > 0:
                problems.append(f"{where}.{key}: must be > 0, not {value!r}")
            if key in getattr(cls, "NON_NEGATIVE", ()) and not value >= 0:
                problems.append(f"{where}.{key}: must be >= 0, not {value!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        problems.append(f"{where}: {e}")
        return None


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(tp, value, where: str, problems: list[str]):
    """``value`` checked against (and converted to) type ``tp``; problems are appended."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, where, problems)
        problems.append(f"{where}: expected a mapping, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where, problems) if len(args) == 1 else value
    if origin is tuple or tp is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
    elif origin is list or tp is list:
        if isinstance(value, list):
            return value
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    problems.append(f"{where}: expected {_type_name(origin or tp)}, got {type(value).__name__} {value!r}")
    return value


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """A YAML config as a dict; a ``base: OTHER.yaml`` key (relative to this file) is read first
    and this file's keys override it (nested mappings such as ``augment`` merged key by key),
    so a recipe is written once and its variants name only what they change."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = read_yaml(path.parent / base, _seen + (path,))
    for k, v in data.items():
        merged[k] = {**merged[k], **v} if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def load_config(cls: type[T], path: str | Path | None = None, settings: dict | None = None, **overrides) -> T:
    """Load ``cls`` from a YAML file (or defaults), then apply non-None keyword overrides, then
    ``settings`` (``--set``: applied as given, null included)."""
    data = read_yaml(path) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    data.update(settings or {})
    return from_dict(cls, data)


def parse_settings(pairs: tuple[str, ...] | list[str]) -> dict:
    """``KEY=VALUE`` strings (``--set``) -> a dict; each value is read as YAML (``0.5``, ``true``,
    ``null``, ``[a, b]``), so it is checked against the field's type like a config file's."""
    out, problems = {}, []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {pair!r}: expected KEY=VALUE")
            continue
        if key.strip() in out:
            problems.append(f"--set {key.strip()}: given twice")
            continue
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    if problems:
        raise ConfigError("\n".join(problems))
    return out


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
