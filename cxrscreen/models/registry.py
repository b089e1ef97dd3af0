"""The one registry of models: name -> builder, task and default input size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn


@dataclass(frozen=True)
class ModelEntry:
    name: str
    task: str  # "classify" or "segment"
    builder: Callable[..., nn.Module]
    input_size: int
    description: str


REGISTRY: dict[str, ModelEntry] = {}


def register(name: str, task: str, input_size: int, description: str):
    """Decorator: add a builder ``fn(num_classes, in_channels, **kwargs) -> nn.Module``."""
    def wrap(fn):
        if name in REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        REGISTRY[name] = ModelEntry(name, task, fn, input_size, description)
        return fn
    return wrap


def get_entry(name: str) -> ModelEntry:
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def build_model(name: str, num_classes: int, in_channels: int = 1, **kwargs) -> nn.Module:
    """Build a registry model with random weights (no hub downloads, ever)."""
    return get_entry(name).builder(num_classes=num_classes, in_channels=in_channels, **kwargs)


def list_models(task: str | None = None) -> list[str]:
    return sorted(n for n, e in REGISTRY.items() if task is None or e.task == task)


def check_input_size(name: str, size: int, in_channels: int = 1, **kwargs) -> None:
    """Fail early, with the model's own size in the message, where a model cannot take
    ``size`` px inputs (fixed dense layers: p2_small_cnn, p3_deep_cnn, p0_cnn_lstm)."""
    model = build_model(name, 2, in_channels, **kwargs).eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_channels, size, size))
    except RuntimeError as e:
        built = kwargs.get("input_size", get_entry(name).input_size)
        raise ValueError(f"model {name!r} cannot take {size} px inputs (it is built for "
                         f"{built} px; set input_size accordingly): {e}") from None
