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


def file_logits(loaded, files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a loaded checkpoint for image files, prepared as it was trained (input size,
    channels, lung crop), and the mask of files that decoded."""
    images, ok = load_images(files, loaded.info.input_size, loaded.info.lung_crop)
    cfg = TrainConfig(in_channels=loaded.info.in_channels)
    return predict_logits(loaded.module, images[ok], cfg, torch.device("cpu")), ok


def evaluate_model(model_dir: str | Path, data: str | None = None, split: str = "test",
                   positive: str = "covid", target_sensitivity: float = 0.99,
                   update_card: bool = True, allow_duplicates: bool = False, predictions: bool = False) -> dict:
    """Metrics of ``model_dir`` on ``split``; temperature and refer threshold are fitted on
    ``val`` and (with ``update_card``) stored in model.json for scoring. Refuses a split that
    shares a patient with train, or (unless ``allow_duplicates``) a near-duplicate image.
    With ``predictions``, ``result["predictions"]`` holds the evaluated rows (file, label,
    source) with ``y`` and calibrated ``probs``."""
    from cxrscreen.data.dedup import audit_duplicates

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
    pairs = audit_duplicates(df.filter(pl.col("split").is_in(["train", split])))
    cross = pairs.filter(pl.col("cross_split"))
    if len(cross) and not allow_duplicates:
        raise ValueError(f"leakage: {len(cross)} near-duplicate train/{split} image pairs, e.g. "
                         f"{cross.select('path_a', 'path_b').rows()[:2]}; drop them (`cxrscreen audit --drop`)")
    index = {c: i for i, c in enumerate(classes)}
    val = df.filter(pl.col("split") == "val")
    val_logits, val_ok = file_logits(loaded, val["file"].to_list())
    y_val = np.array([index[t] for t in val["target"]])[val_ok]
    temperature = fit_temperature(val_logits, y_val)
    pos = index.get(positive, 0)
    threshold = refer_threshold(softmax(val_logits, temperature), y_val, pos, target_sensitivity)
    logits, ok = file_logits(loaded, test["file"].to_list())
    y = np.array([index[t] for t in test["target"]])[ok]
    probs = softmax(logits, temperature)
    result = {"split": split, "data": str(cfg.data), "model": loaded.info.name, "classes": classes,
              "temperature": temperature, "refer_threshold": threshold,
              "refer_target": {"class": classes[pos], "sensitivity": target_sensitivity},
              "uncalibrated_ece": classification_metrics(y, softmax(logits), classes)["ece"],
              "metrics": classification_metrics(y, probs, classes), "per_source": {},
              "near_duplicates_train_" + split: len(cross)}
    conf = probs.max(1)
    referred = conf < threshold
    result["referred_fraction"] = float(referred.mean())
    caught = (probs.argmax(1) == pos) | referred
    result["sensitivity_with_referral"] = float(caught[y == pos].mean()) if (y == pos).any() else None
    result["derived"] = derived_tasks(y, probs, classes)
    sources = test["source"].to_numpy()[ok] if "source" in test.columns else np.full(len(y), None)
    for s in sorted({str(x) for x in sources if x is not None}):
        m = sources == s
        result["per_source"][s] = {"n": int(m.sum()), "accuracy": float((probs[m].argmax(1) == y[m]).mean())}
    if predictions:
        result["predictions"] = {"rows": test.filter(pl.Series(ok)), "y": y, "probs": probs}
    if update_card:
        card = json.loads((model_dir / "model.json").read_text())
        card.update(temperature=temperature, refer_threshold=threshold)
        card.setdefault("metrics", {})[split] = result["metrics"]
        card["evaluation"] = {k: v for k, v in result.items() if k not in ("metrics", "predictions")}
        (model_dir / "model.json").write_text(json.dumps(card, indent=2))
    return result


def derived_tasks(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """3-class (covid/normal/viral, other images left out, probabilities renormalised) and
    binary (covid vs rest) metrics read off a 4-class model's outputs."""
    out = {}
    three = [c for c in ("covid", "normal", "viral_pneumonia") if c in classes]
    if len(three) == 3 and len(classes) > 3:
        idx = [classes.index(c) for c in three]
        keep = np.isin(y, idx)
        p3 = probs[keep][:, idx]
        remap = {old: new for new, old in enumerate(idx)}
        out["3class"] = classification_metrics(np.array([remap[v] for v in y[keep]]),
                                               p3 / p3.sum(1, keepdims=True), three)
    if "covid" in classes and len(classes) > 2:
        c = classes.index("covid")
        pb = np.stack([probs[:, c], 1 - probs[:, c]], 1)
        out["binary"] = classification_metrics((y != c).astype(int), pb, ["covid", "non_covid"])
    return out


def mask_metrics(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Dice, IoU and pixel accuracy of boolean masks (B, H, W): ``raw`` and ``cleaned`` (two
    largest components kept, holes filled: what ``score`` stores)."""
    from cxrscreen.masks import lung_regions
    from cxrscreen.train.trainer import dice_scores

    out = {}
    for variant, p in (("raw", pred), ("cleaned", np.stack([lung_regions(m).mask for m in pred]))):
        inter, union = (p & truth).sum((1, 2)), (p | truth).sum((1, 2))
        out[variant] = {"n": int(len(p)), "dice": float(dice_scores(p, truth).mean()),
                        "iou": float(((inter + 1e-6) / (union + 1e-6)).mean()),
                        "pixel_accuracy": float((p == truth).mean())}
    return out


def evaluate_segmenter(model_dir: str | Path, data: str | None = None) -> dict:
    """Dice, IoU and pixel accuracy of a U-Net checkpoint, raw and after mask clean-up, on the
    expert masks (ground truth, ``test``) and on the pseudo-mask validation split - labeled apart.
    A model adapted on the expert masks (``cxrscreen adapt-segmenter``) is scored on the pseudo
    masks only: its expert numbers are the leave-one-out ones written by the adaptation."""
    from cxrscreen.train.trainer import make_task

    model_dir = Path(model_dir)
    loaded = load_model(str(model_dir), "segment")
    cfg = from_dict(TrainConfig, yaml.safe_load((model_dir / "train_config.yaml").read_text()))
    if data:
        cfg.data = data
    task = make_task(cfg)
    out = {"model": loaded.info.name, "data": str(cfg.data)}
    splits = [("test", "expert_masks"), ("val", "pseudo_masks_val")]
    for split, name in splits[1:] if "adaptation" in loaded.info.metrics else splits:
        images, masks = task.arrays(split)
        if not len(images):
            continue
        logits = predict_logits(loaded.module, images, cfg, torch.device("cpu"))
        out.update({f"{name}_{v}": m for v, m in mask_metrics(logits[:, 0] > 0, masks > 0).items()})
    card = json.loads((model_dir / "model.json").read_text())
    card.setdefault("metrics", {}).update({k: v for k, v in out.items() if isinstance(v, dict)})
    (model_dir / "model.json").write_text(json.dumps(card, indent=2))
    return out
