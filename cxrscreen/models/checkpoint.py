"""Checkpoints: ``model.safetensors`` + ``model.json`` (name, classes, sizes, calibration) +
``train_config.yaml`` (the recipe), read and written only here (``read_info`` / ``write_info`` /
``update_info``, ``read_train_config`` / ``write_train_config``).

Only safetensors are loaded: pickled checkpoints (.pt/.pth/.pkl/.bin/.ckpt) are refused,
because unpickling runs arbitrary code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn
import yaml

from cxrscreen.models.ood import OOD_FILE, OODReference
from cxrscreen.models.registry import REGISTRY, build_model, get_entry

DEFAULT_CLASSES = ("covid", "normal", "viral_pneumonia", "bacterial_pneumonia")
BUNDLED = Path(__file__).resolve().parents[1] / "weights"  # weights shipped with the package
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
INFO_FILE = "model.json"
TRAIN_CONFIG_FILE = "train_config.yaml"


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
    intensity: str = "raw"  # raw | equalize: the intensity standardisation it was trained with
    ood_threshold: float | None = None  # refer when ood_score exceeds this (fitted on val, `evaluate`)
    ood_refer_rate: float | None = None  # the share of val images the threshold refers


def validate_info(data: dict, where: str) -> ModelInfo:
    """``model.json`` contents -> ModelInfo, or ValueError naming every bad field."""
    from cxrscreen.preprocess import INTENSITIES

    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object")
    names = {f.name for f in dataclasses.fields(ModelInfo)}
    problems = [f"unknown field {k!r}" for k in sorted(set(data) - names)]
    problems += [f"missing field {k!r}" for k in ("name", "task", "classes", "input_size") if k not in data]

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    checks = {
        "name": lambda v: isinstance(v, str) and v in REGISTRY,
        "task": lambda v: v in ("classify", "segment"),
        "classes": lambda v: isinstance(v, list) and v and all(isinstance(c, str) and c for c in v)
        and len(set(v)) == len(v),
        "input_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and 8 <= v <= 4096,
        "in_channels": lambda v: v in (1, 3),
        "kwargs": lambda v: isinstance(v, dict),
        "temperature": lambda v: number(v) and v > 0,
        "refer_threshold": lambda v: v is None or (number(v) and 0 <= v <= 1 + 1e-5),
        "metrics": lambda v: isinstance(v, dict),
        "evaluation": lambda v: isinstance(v, dict),
        "lung_crop": lambda v: v is None or isinstance(v, str),
        "intensity": lambda v: v in INTENSITIES,
        "ood_threshold": lambda v: v is None or (number(v) and v >= 0),
        "ood_refer_rate": lambda v: v is None or (number(v) and 0 <= v <= 1),
    }
    expected = {"name": "a registry model name", "task": "'classify' or 'segment'",
                "classes": "a list of distinct class names", "input_size": "an integer number of pixels",
                "in_channels": "1 or 3", "temperature": "a positive number",
                "refer_threshold": "null or a probability in [0, 1]", "intensity": f"one of {INTENSITIES}",
                "ood_threshold": "null or a number >= 0", "ood_refer_rate": "null or a share in [0, 1]"}
    for key, ok in checks.items():
        if key in data and not ok(data[key]):
            problems.append(f"field {key!r} must be {expected.get(key, 'valid')}, not {data[key]!r}")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
    return ModelInfo(**data)


def read_info(folder: str | Path) -> ModelInfo:
    """A checkpoint folder's ``model.json``, checked field by field (``validate_info``)."""
    path = Path(folder) / INFO_FILE
    if not path.exists():
        raise ValueError(f"{folder}: not a checkpoint folder (no {INFO_FILE})")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return validate_info(raw, str(path))


def write_info(folder: str | Path, info: ModelInfo) -> Path:
    path = Path(folder) / INFO_FILE
    path.write_text(json.dumps(dataclasses.asdict(info), indent=2))
    return path


def update_info(folder: str | Path, **changes) -> ModelInfo:
    """Rewrite ``model.json`` with some fields replaced; returns the new info."""
    info = dataclasses.replace(read_info(folder), **changes)
    validate_info(dataclasses.asdict(info), str(Path(folder) / INFO_FILE))
    write_info(folder, info)
    return info


def read_train_config(folder: str | Path) -> dict:
    """A checkpoint folder's ``train_config.yaml`` as a mapping (``cxrscreen.train.config.
    checkpoint_config`` turns it into a validated ``TrainConfig``)."""
    path = Path(folder) / TRAIN_CONFIG_FILE
    if not path.exists():
        raise ValueError(f"{folder}: no {TRAIN_CONFIG_FILE} (not a trained checkpoint folder)")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping")
    return data


def write_train_config(folder: str | Path, data: dict) -> Path:
    path = Path(folder) / TRAIN_CONFIG_FILE
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def shipped_weights(task: str | None = None) -> list[str]:
    """Names of the trained weights shipped in ``cxrscreen/weights/`` (for ``task``)."""
    names = []
    for folder in sorted(BUNDLED.iterdir()) if BUNDLED.exists() else []:
        card = folder / "model.json"
        if card.exists() and (task is None or read_info(folder).task == task):
            names.append(folder.name)
    return names


@dataclass
class LoadedModel:
    module: nn.Module
    info: ModelInfo
    weights_sha256: str  # "untrained" for a freshly initialised registry model
    folder: Path | None = None  # the checkpoint folder (None when untrained)
    ood: OODReference | None = None  # the out-of-distribution reference saved beside it

    @property
    def weights_name(self) -> str:
        """What the output's ``classifier`` / ``segmenter`` column says: the weights' folder
        name (e.g. ``cxrnet-4class``), or ``<architecture> (untrained)``."""
        return self.folder.name if self.folder is not None else f"{self.info.name} (untrained)"


def save_checkpoint(out_dir: str | Path, module: nn.Module, info: ModelInfo) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, out / "model.safetensors")
    write_info(out, info)
    (out / OOD_FILE).unlink(missing_ok=True)  # fitted on other weights: `evaluate` fits it again
    return out


def checkpoint_path(spec: str | Path) -> Path:
    """A checkpoint given as a path, or as the name of shipped weights (``cxrscreen/weights/<name>``)."""
    path = Path(spec)
    if not path.exists() and (BUNDLED / str(spec) / "model.json").exists():
        return BUNDLED / str(spec)
    return path


def load_model(spec: str, task: str, classes: tuple[str, ...] = DEFAULT_CLASSES,
               allow_untrained: bool = False) -> LoadedModel:
    """A checkpoint folder / ``.safetensors`` file, or the name of bundled weights
    (``cxrscreen/weights/<name>``); a registry name (random init, ``weights_sha256="untrained"``)
    only with ``allow_untrained``. Every field of ``model.json`` and the tensors are checked."""
    from safetensors.torch import load_file

    path = checkpoint_path(spec)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{spec}: refusing a pickled checkpoint (unsafe to load); "
                         "convert it to safetensors with a model.json beside it")
    if not path.exists():
        shipped = ", ".join(shipped_weights(task))
        if spec not in REGISTRY:
            raise ValueError(f"{spec!r} is neither a checkpoint folder nor shipped weights; "
                             f"shipped {task} weights: {shipped}")
        if not allow_untrained:
            raise ValueError(f"{spec!r} is an architecture, not trained weights: scoring it would use random "
                             f"weights. Give shipped weights ({shipped}) or a checkpoint folder "
                             "(or allow_untrained / --allow-untrained to do it anyway)")
        entry = get_entry(spec)
        if entry.task != task:
            raise ValueError(f"{spec} is a {entry.task} model, a {task} model is needed here")
        n = 1 if task == "segment" else len(classes)
        info = ModelInfo(spec, task, list(classes) if task == "classify" else ["lung"], entry.input_size)
        return LoadedModel(build_model(spec, n, 1).eval(), info, "untrained")
    folder = path if path.is_dir() else path.parent
    weights = path if path.is_file() else folder / "model.safetensors"
    if not (folder / INFO_FILE).exists() or not weights.exists():
        raise ValueError(f"{spec}: a checkpoint needs model.json and model.safetensors")
    info = read_info(folder)
    if info.task != task:
        raise ValueError(f"{spec} holds a {info.task} model, a {task} model is needed here")
    n = 1 if task == "segment" else len(info.classes)
    module = build_model(info.name, n, info.in_channels, **info.kwargs)
    try:
        module.load_state_dict(load_file(weights))
    except Exception as e:  # noqa: BLE001 - a wrong or corrupt file: one clear line
        raise ValueError(f"{weights}: weights do not fit {info.name} ({type(e).__name__}: {str(e)[:200]})") from None
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    ood = OODReference.load(folder) if task == "classify" else None
    return LoadedModel(module.eval(), info, sha, folder, ood)
