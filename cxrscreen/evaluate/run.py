"""Evaluate a trained classifier on a split: metrics, calibration, refer threshold, per source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from cxrscreen.metrics import (THREE_CLASSES, accuracy_at_coverage, accuracy_at_coverage_3class,
                               classification_metrics, fit_temperature, mask_metrics, refer_threshold, softmax)
from cxrscreen.referral import OOD_REFER_RATE, TARGET_SENSITIVITY, screening_confidence
from cxrscreen.models.checkpoint import update_info
from cxrscreen.train.config import checkpoint_config
from cxrscreen.train.data import labeled_splits


def _outputs(runner, files: list[str]):
    """Raw logits, embeddings and polarity of the files that decode (the scoring path) + mask."""
    from cxrscreen.predict import classify_images, decode_files_polarity

    images, ok, pol = decode_files_polarity(files)
    return classify_images(runner, images[ok]), pol[ok], ok


def evaluate_model(model_dir: str | Path, data: str | None = None, split: str = "test",
                   positive: str = "covid", target_sensitivity: float = TARGET_SENSITIVITY,
                   ood_refer_rate: float = OOD_REFER_RATE,
                   min_polarity: float = 0.0, update_card: bool = True, allow_duplicates: bool = False,
                   predictions: bool = False, device: str = "auto", precision: str = "auto",
                   runtime: str = "auto") -> dict:
    """Metrics of ``model_dir`` on ``split``, computed through the scoring path
    (``cxrscreen.predict``, the same runtime and precision ``score`` picks by default).

    Fitted here and (with ``update_card``) stored with the checkpoint: the temperature and
    the COVID referral threshold (on ``val``), the out-of-distribution reference (class means
    and shared covariance of the ``train`` embeddings, ``ood.safetensors``) and its threshold
    (the ``1 - ood_refer_rate`` quantile of ``val``'s ``ood_score``; only for the model's own data). Reports accuracy at
    coverage (the rows ``score`` would not refer) and a source probe. Refuses a split that
    shares a patient with train, or (unless ``allow_duplicates``) a near-duplicate image.
    With ``predictions``, ``result["predictions"]`` holds the evaluated rows (file, label,
    source) with ``y``, calibrated ``probs`` and ``ood_score``."""
    from cxrscreen.data.dedup import audit_duplicates
    from cxrscreen.models.ood import OODReference
    from cxrscreen.predict import ModelRunner

    model_dir = Path(model_dir)
    runner = ModelRunner(str(model_dir), "classify", device, precision, runtime=runtime)
    loaded = runner.loaded
    cfg = checkpoint_config(model_dir)
    own_data = not data or Path(data).resolve() == Path(cfg.data).resolve()
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

    def targets(part, ok):
        return np.array([index[t] for t in part["target"]], np.int64)[ok]

    train = df.filter(pl.col("split") == "train")
    train_out, _, train_ok = _outputs(runner, train["file"].to_list())
    reference = None
    if train_out.embeddings is not None:
        reference = OODReference.fit(train_out.embeddings, targets(train, train_ok), train_out.appearance)
    val = df.filter(pl.col("split") == "val")
    val_out, _, val_ok = _outputs(runner, val["file"].to_list())
    y_val = targets(val, val_ok)
    temperature = fit_temperature(val_out.logits, y_val)
    pos = index.get(positive, 0)
    threshold = refer_threshold(softmax(val_out.logits, temperature), y_val, pos, target_sensitivity, classes)
    ood_threshold = None
    if reference is not None:
        reference.set_scale(val_out.embeddings, val_out.appearance)
        ood_threshold = float(np.quantile(reference.score(val_out.embeddings, val_out.appearance), 1 - ood_refer_rate))
    val_referred = screening_confidence(softmax(val_out.logits, temperature), classes) < threshold
    if ood_threshold is not None:
        val_referred |= reference.score(val_out.embeddings, val_out.appearance) > ood_threshold
    out, pol, ok = _outputs(runner, test["file"].to_list())
    y = targets(test, ok)
    probs = softmax(out.logits, temperature)
    ood = (reference.score(out.embeddings, out.appearance) if reference is not None
           else np.full(len(y), np.nan, np.float32))
    result = {"split": split, "data": str(cfg.data), "model": loaded.info.name, "classes": classes,
              "runtime": runner.runtime.name, "precision": runner.runtime.precision,
              "temperature": temperature, "refer_threshold": threshold,
              "refer_target": {"class": classes[pos], "sensitivity": target_sensitivity},
              "ood_threshold": ood_threshold, "ood_refer_rate": ood_refer_rate,
              "uncalibrated_ece": classification_metrics(y, softmax(out.logits), classes)["ece"],
              "metrics": classification_metrics(y, probs, classes), "per_source": {},
              "near_duplicates_train_" + split: len(cross),
              "train_class_share": {c: float((train["target"] == c).mean()) for c in classes}}
    reasons = {"low_confidence": screening_confidence(probs, classes) < threshold,
               "out_of_distribution": ood > ood_threshold if ood_threshold is not None else np.zeros(len(y), bool),
               "atypical_intensity": pol < min_polarity}
    referred = np.any(np.stack(list(reasons.values())), 0)
    result["referred_fraction"] = float(referred.mean())
    result["val_referred_fraction"] = float(val_referred.mean())  # what referral settings are chosen by
    result["referred_by_reason"] = {k: float(v.mean()) for k, v in reasons.items()}
    result["at_coverage"] = accuracy_at_coverage(y, probs.argmax(1), referred)
    caught = (probs.argmax(1) == pos) | referred
    result["sensitivity_with_referral"] = float(caught[y == pos].mean()) if (y == pos).any() else None
    result["derived"] = derived_tasks(y, probs, classes)
    if result["derived"].get("3class") is not None:
        result["at_coverage_3class"] = accuracy_at_coverage_3class(y, probs, referred, classes)
    sources = test["source"].to_numpy()[ok] if "source" in test.columns else np.full(len(y), None)
    for s in sorted({str(x) for x in sources if x is not None}):
        m = sources == s
        result["per_source"][s] = {"n": int(m.sum()), "accuracy": float((probs[m].argmax(1) == y[m]).mean())}
    if train_out.embeddings is not None and "source" in df.columns:
        result["source_probe"] = source_probe(train_out.embeddings, train["source"].to_numpy()[train_ok],
                                              out.embeddings, sources)
    if predictions:
        result["predictions"] = {"rows": test.filter(pl.Series(ok)), "y": y, "probs": probs, "ood_score": ood}
    if update_card and own_data:  # another manifest's calibration and reference do not belong in the card
        update_info(model_dir, temperature=temperature, refer_threshold=threshold, ood_threshold=ood_threshold,
                    ood_refer_rate=ood_refer_rate if ood_threshold is not None else None,
                    metrics={**loaded.info.metrics, split: result["metrics"]},
                    evaluation=json.loads(json.dumps({k: v for k, v in result.items()
                                                      if k not in ("metrics", "predictions")})))
        if reference is not None:
            reference.save(model_dir)
    return result


def source_probe(train_emb: np.ndarray, train_sources: np.ndarray, test_emb: np.ndarray,
                 test_sources: np.ndarray) -> dict:
    """How well a linear model on the embedding tells an image's source: balanced accuracy
    on ``test`` of a logistic regression fitted on ``train`` (chance = 1 / number of sources;
    near chance means the embedding carries little of the source)."""
    from cxrscreen.extras import require

    LogisticRegression = require("sklearn.linear_model").LogisticRegression
    StandardScaler = require("sklearn.preprocessing").StandardScaler

    keep = np.array([s is not None for s in train_sources])
    labels = sorted({str(s) for s in train_sources[keep]})
    if len(labels) < 2:
        return {"sources": labels, "balanced_accuracy": None, "chance": None}
    scaler = StandardScaler().fit(train_emb[keep])
    probe = LogisticRegression(max_iter=2000, C=0.1).fit(scaler.transform(train_emb[keep]), train_sources[keep].astype(str))
    pred = probe.predict(scaler.transform(test_emb))
    truth = test_sources.astype(str)
    recalls = [float((pred[truth == s] == s).mean()) for s in labels if (truth == s).any()]
    return {"sources": labels, "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
            "chance": 1 / len(labels)}


def derived_tasks(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """3-class (covid/normal/viral, other images left out, probabilities renormalised) and
    binary (covid vs rest) metrics read off a 4-class model's outputs."""
    out = {}
    three = [c for c in THREE_CLASSES if c in classes]
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


def evaluate_segmenter(model_dir: str | Path, data: str | None = None) -> dict:
    """Dice, IoU and pixel accuracy of a U-Net checkpoint, raw and after mask clean-up, on the
    expert masks (ground truth, ``test``) and on the pseudo-mask validation split - labeled apart.
    A model adapted on the expert masks (``cxrscreen adapt-segmenter``) is scored on the pseudo
    masks only: its expert numbers are the leave-one-out ones written by the adaptation."""
    from cxrscreen.predict import ModelRunner, segment_images
    from cxrscreen.train.trainer import make_task

    model_dir = Path(model_dir)
    runner = ModelRunner(str(model_dir), "segment")
    loaded = runner.loaded
    cfg = checkpoint_config(model_dir)
    if data:
        cfg.data = data
    task = make_task(cfg)
    out = {"model": loaded.info.name, "data": str(cfg.data)}
    splits = [("test", "expert_masks"), ("val", "pseudo_masks_val")]
    for split, name in splits[1:] if "adaptation" in loaded.info.metrics else splits:
        images, masks = task.arrays(split)
        if not len(images):
            continue
        probs = segment_images(runner, images)
        out.update({f"{name}_{v}": m for v, m in mask_metrics(probs > 0.5, masks > 0).items()})
    update_info(model_dir, metrics={**loaded.info.metrics, **{k: v for k, v in out.items() if isinstance(v, dict)}})
    return out


def write_predictions(pred: dict, classes: list[str], path: str | Path) -> pl.DataFrame:
    """The per-image probabilities ``evaluate_model(predictions=True)`` computed, as Parquet:
    ``key`` (the manifest path), ``file`` (absolute), ``label``, ``prob_<class>``, ``ood_score``;
    directly comparable with ``score``'s output (``source_path``, ``prob_*``)."""
    rows = pred["rows"]
    df = pl.DataFrame({
        "key": rows["path"] if "path" in rows.columns else rows["file"],
        "file": [str(Path(f).resolve()) for f in rows["file"]],
        "label": rows["target"],
        **{f"prob_{c}": pred["probs"][:, i].astype(np.float32) for i, c in enumerate(classes)},
        "ood_score": np.asarray(pred["ood_score"], np.float32)})
    df.write_parquet(path)
    return df
