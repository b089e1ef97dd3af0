from pathlib import Path

import pytest

from cxrscreen.config import load_config
from cxrscreen.models import get_entry
from cxrscreen.pipeline import ScoreConfig
from cxrscreen.train import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted((CONFIGS / "papers").glob("*.yaml")) + sorted((CONFIGS / "train").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_train_configs_load_and_name_registry_models(path):
    cfg = load_config(TrainConfig, path)
    get_entry(cfg.model)
    assert cfg.epochs >= 1 and cfg.task in ("binary", "3class", "4class")


def test_score_config_and_unknown_keys(tmp_path):
    assert load_config(ScoreConfig, CONFIGS / "score.yaml").batch_size == 16
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
