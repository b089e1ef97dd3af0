"""Evaluate a trained classifier on a split: metrics, calibration, refer threshold, per source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import torch
import yaml

from cxrscreen.config import from_dict
from cxrscreen.evaluate.metrics import classification_metrics, fit_temperature, refer_threshold, softmax
from cxrscreen.models import load_model
from cxrscreen.train.config import TrainConfig
from cxrscreen.train.data import labeled_splits, load_images
from cxrscreen.train.trainer import predict_logits


def _logits(model, df: pl.DataFrame, cfg: TrainConfig, size: int) -> tuple[np.ndarray, np.ndarray]:
    images, ok = load_images(df["file"].to_list(), size)
    return predict_logits(model, images[ok], cfg, torch.device("cpu")), ok


def evaluate_model(model_dir: str | Path, data: str | None = None, split: str = "test",
                   positive: str = "covid", target_sensitivity: float = 0.99,
                   update_card: bool = True) -> dict:
    """Metrics of ``model_dir`` on ``split``; temperature and refer threshold are fitted on
    ``val`` and (with ``update_card``) stored in model.json for scoring."""
    model_dir = Path(model_dir)
    loaded = load_model(str(model_dir), "classify")
    cfg = from_dict(TrainConfig, yaml.safe_load((model_dir / "train_config.yaml").read_text()))
    if data:
        cfg.data = data
    df, classes = labeled_splits(cfg)
    if classes != loaded.info.classes:
        raise ValueError(f"data classes {classes} differ from the model's {loaded.info.classes}")
    train_patients = set(df.filter((pl.col("split") == "train") & pl.col("patient_id").is_not_null())["patient_id"])
    test = df.filter(pl.col("split") == split)
    shared = sorted(set(test["patient_id"].drop_nulls()) & train_patients - {""})
    if shared:
        raise ValueError(f"leakage: {len(shared)} {split} patients are also in train, e.g. {shared[:3]}")
    index = {c: i for i, c in enumerate(classes)}
    size = loaded.info.input_size
    val = df.filter(pl.col("split") == "val")
    val_logits, val_ok = _logits(loaded.module, val, cfg, size)
    y_val = np.array([index[t] for t in val["target"]])[val_ok]
    temperature = fit_temperature(val_logits, y_val)
    pos = index.get(positive, 0)
    threshold = refer_threshold(softmax(val_logits, temperature), y_val, pos, target_sensitivity)
    logits, ok = _logits(loaded.module, test, cfg, size)
    y = np.array([index[t] for t in test["target"]])[ok]
    probs = softmax(logits, temperature)
    result = {"split": split, "data": str(cfg.data), "model": loaded.info.name, "classes": classes,
              "temperature": temperature, "refer_threshold": threshold,
              "refer_target": {"class": classes[pos], "sensitivity": target_sensitivity},
              "uncalibrated_ece": classification_metrics(y, softmax(logits), classes)["ece"],
              "metrics": classification_metrics(y, probs, classes), "per_source": {}}
    conf = probs.max(1)
    referred = conf < threshold
    result["referred_fraction"] = float(referred.mean())
    caught = (probs.argmax(1) == pos) | referred
    result["sensitivity_with_referral"] = float(caught[y == pos].mean()) if (y == pos).any() else None
    sources = test["source"].to_numpy()[ok] if "source" in test.columns else np.full(len(y), None)
    for s in sorted({str(x) for x in sources if x is not None}):
        m = sources == s
        result["per_source"][s] = {"n": int(m.sum()), "accuracy": float((probs[m].argmax(1) == y[m]).mean())}
    if update_card:
        card = json.loads((model_dir / "model.json").read_text())
        card.update(temperature=temperature, refer_threshold=threshold)
        card.setdefault("metrics", {})[split] = result["metrics"]
        (model_dir / "model.json").write_text(json.dumps(card, indent=2))
    return result
