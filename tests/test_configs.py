from pathlib import Path

import numpy as np
import pytest

from cxrscreen.config import load_config
from cxrscreen.models import build_model, get_entry
from cxrscreen.pipeline import ScoreConfig
from cxrscreen.train import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAIN_CONFIGS = sorted((CONFIGS / "papers").glob("*.yaml")) + sorted((CONFIGS / "train").glob("*.yaml"))


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_train_configs_load_and_name_registry_models(path):
    cfg = load_config(TrainConfig, path)
    get_entry(cfg.model)
    assert cfg.epochs >= 1 and cfg.task in ("binary", "3class", "4class")


def test_score_config_and_unknown_keys(tmp_path):
    assert load_config(ScoreConfig, CONFIGS / "score.yaml").batch_size == 64
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_sise: 3\n")
    with pytest.raises(ValueError, match="batch_sise"):
        load_config(ScoreConfig, bad)


def test_readme_test_command_is_what_ci_runs():
    root = CONFIGS.parent
    readme = (root / "README.md").read_text().splitlines()
    commands = [line for line in readme[:6] if line.startswith("python3 -m venv")]
    assert len(commands) == 2 and "cxrscreen score" in commands[0]
    assert commands[1] in (root / ".ci" / "run").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_train_config_splits_data_and_takes_a_training_step(path, phantom_archive):
    """Each paper/train config, on phantoms: its split settings work and its model (with its
    kwargs, input size and optimizer) takes one optimisation step."""
    import dataclasses

    import torch

    from cxrscreen.train.data import labeled_splits
    from cxrscreen.train.trainer import _optimizer, input_size, make_task, prepare_model, train_step

    cfg = load_config(TrainConfig, path)
    seg = get_entry(cfg.model).task == "segment"
    cfg = dataclasses.replace(cfg, data=str(phantom_archive / "manifest.csv"), lung_crop=None, resume_from=None)
    size = input_size(cfg)
    if seg:
        outputs = 1
    else:
        df, classes = labeled_splits(cfg)
        assert set(df["split"]) == {"train", "val", "test"} and len(classes) == {"binary": 2, "3class": 3}.get(cfg.task, 4)
        outputs = len(classes)
    task = make_task(cfg)
    assert task.outputs == outputs
    model, ema = prepare_model(build_model(cfg.model, outputs, cfg.in_channels, **cfg.model_kwargs), cfg)
    opt = _optimizer(cfg, model.parameters())
    model.train()
    x = torch.randn(2, cfg.in_channels, size, size)
    y = torch.zeros(2, 1, size, size) if seg else torch.tensor([0, outputs - 1])
    loss = train_step(model, x, y, task.loss_fn(np.array([0, outputs - 1]), "cpu"), opt, cfg, ema)
    assert np.isfinite(loss)


def test_package_states_ranges_and_ci_pins_a_point_inside_them():
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    root = CONFIGS.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    pins = {canonicalize_name(n): v for n, v in (line.split("==") for line in (root / "constraints.txt").read_text()
                                                 .splitlines() if line and not line.startswith("#"))}
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["report"]]
    for r in reqs:
        assert all(s.operator != "==" for s in r.specifier), f"{r}: a library states ranges, not one version"
        assert canonicalize_name(r.name) in pins, f"{r.name} is not pinned in constraints.txt"
        assert r.specifier.contains(pins[canonicalize_name(r.name)]), f"constraints.txt {r.name} outside {r}"
    assert {"torch", "torchvision", "ray", "onnxruntime"} <= set(pins)
    assert "matplotlib" not in {Requirement(r).name for r in project["dependencies"]}  # the `report` extra


def test_score_yaml_lists_every_setting_at_its_default():
    import dataclasses

    import yaml

    from cxrscreen.pipeline.config import ScoreConfig

    listed = yaml.safe_load((CONFIGS / "score.yaml").read_text())
    defaults = {f.name: f.default for f in dataclasses.fields(ScoreConfig)}
    assert set(listed) == set(defaults)
    assert {k: v for k, v in listed.items() if v != defaults[k]} == {}
