"""Checkpoints: ``model.safetensors`` + ``model.json`` (name, classes, sizes, calibration).

Only safetensors are loaded: pickled checkpoints (.pt/.pth/.pkl/.bin/.ckpt) are refused,
because unpickling runs arbitrary code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn

from cxrscreen.models.registry import build_model, get_entry

DEFAULT_CLASSES = ("covid", "normal", "viral_pneumonia", "bacterial_pneumonia")
BUNDLED = Path(__file__).resolve().parents[1] / "weights"  # weights shipped with the package
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")


@dataclass
class ModelInfo:
    """What a checkpoint must say about itself so that scoring needs no other config."""

    name: str
    task: str
    classes: list[str]
    input_size: int
    in_channels: int = 1
    kwargs: dict = field(default_factory=dict)
    temperature: float = 1.0
    refer_threshold: float | None = None
    metrics: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)  # written by `cxrscreen evaluate`
    lung_crop: str | None = None  # trained on lung boxes found by this segmenter: score the same way


@dataclass
class LoadedModel:
    module: nn.Module
    info: ModelInfo
    weights_sha256: str  # "untrained" for a freshly initialised registry model


def save_checkpoint(out_dir: str | Path, module: nn.Module, info: ModelInfo) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, out / "model.safetensors")
    (out / "model.json").write_text(json.dumps(dataclasses.asdict(info), indent=2))
    return out


def load_model(spec: str, task: str, classes: tuple[str, ...] = DEFAULT_CLASSES) -> LoadedModel:
    """A checkpoint folder / ``.safetensors`` file, the name of bundled weights
    (``cxrscreen/weights/<name>``), or a registry name (random init, ``weights_sha256="untrained"``)."""
    from safetensors.torch import load_file

    path = Path(spec)
    if not path.exists() and (BUNDLED / spec / "model.json").exists():
        path = BUNDLED / spec
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{spec}: refusing a pickled checkpoint (unsafe to load); "
                         "convert it to safetensors with a model.json beside it")
    if not path.exists():
        entry = get_entry(spec)
        if entry.task != task:
            raise ValueError(f"{spec} is a {entry.task} model, a {task} model is needed here")
        n = 1 if task == "segment" else len(classes)
        info = ModelInfo(spec, task, list(classes) if task == "classify" else ["lung"], entry.input_size)
        return LoadedModel(build_model(spec, n, 1).eval(), info, "untrained")
    folder = path if path.is_dir() else path.parent
    weights = path if path.is_file() else folder / "model.safetensors"
    info = ModelInfo(**json.loads((folder / "model.json").read_text()))
    if info.task != task:
        raise ValueError(f"{spec} holds a {info.task} model, a {task} model is needed here")
    n = 1 if task == "segment" else len(info.classes)
    module = build_model(info.name, n, info.in_channels, **info.kwargs)
    module.load_state_dict(load_file(weights))
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    return LoadedModel(module.eval(), info, sha)
