"""Plain YAML configs mapped onto typed dataclasses (unknown keys are errors, no logic here)."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclass fields."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, f"{cls.__name__}.{key}")
    return cls(**kwargs)


def _coerce(tp, value, where: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where) if len(args) == 1 else value
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if tp is float and isinstance(value, int):
        return float(value)
    return value


def load_config(cls: type[T], path: str | Path | None = None, **overrides) -> T:
    """Load ``cls`` from a YAML file (or defaults), then apply non-None keyword overrides."""
    data = yaml.safe_load(Path(path).read_text()) if path else {}
    data = dict(data or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(cls, data)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
