"""Leave-one-source-out: train without one source, test on all of its images.

The manifest's ``source`` column names where each image came from. A model that learned the
source (scanner, hospital, age group, text markers) instead of the disease does well on a
patient-level test split and badly on a source it has never seen; this measures that gap.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import polars as pl

from cxrscreen.train.config import TrainConfig


def predict_files(model_dir: str | Path, files: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Calibrated probabilities of a checkpoint for image files: (probs, ok mask, classes)."""
    from cxrscreen.evaluate.metrics import softmax
    from cxrscreen.evaluate.run import file_logits
    from cxrscreen.models import load_model

    loaded = load_model(str(model_dir), "classify")
    logits, ok = file_logits(loaded, files)
    return softmax(logits, loaded.info.temperature), ok, list(loaded.info.classes)


def leave_one_source_out(cfg: TrainConfig, out_dir: str | Path, sources: list[str] | None = None,
                         progress=print) -> pl.DataFrame:
    """For each source: train ``cfg`` without it (patient-level train/val of the others),
    then report accuracy and per-class recall on every image of the held-out source (classes
    the fold never saw are left out and counted), next to the fold's own in-source test split.
    Written to ``out_dir/loso.parquet``."""
    from cxrscreen.evaluate.metrics import classification_metrics
    from cxrscreen.train.data import labeled_splits
    from cxrscreen.train.trainer import train

    out = Path(out_dir)
    everything, _ = labeled_splits(dataclasses.replace(cfg, sources=None, exclude_sources=None))
    sources = sources or sorted(everything["source"].drop_nulls().unique().to_list())
    rows = []
    for source in sources:
        fold_cfg = dataclasses.replace(cfg, exclude_sources=[source], out=str(out / f"without-{source}"))
        fold_df, _ = labeled_splits(fold_cfg)
        fold_classes = sorted(set(fold_df.filter(pl.col("split") == "train")["target"]))  # classes it learns
        progress(f"leave out {source}: train on {len(fold_df)} images of {sorted(fold_df['source'].unique())}")
        model_dir = train(fold_cfg, progress=progress)
        row = {"held_out": source, "model": cfg.model, "lung_crop": cfg.lung_crop or "",
               "train_images": len(fold_df.filter(pl.col("split") == "train"))}
        for tag, part in (("held_out", everything.filter(pl.col("source") == source)),
                          ("in_source_test", fold_df.filter(pl.col("split") == "test"))):
            seen = part.filter(pl.col("target").is_in(fold_classes))
            row[f"{tag}_unseen_class_images"] = len(part) - len(seen)
            if not len(seen):
                row[f"{tag}_n"], row[f"{tag}_accuracy"] = 0, None
                continue
            probs, ok, classes = predict_files(model_dir, seen["file"].to_list())
            y = np.array([classes.index(t) for t in seen["target"]])[ok]
            m = classification_metrics(y, probs, classes)
            row[f"{tag}_n"], row[f"{tag}_accuracy"] = int(ok.sum()), m["accuracy"]
            if tag == "held_out":
                row.update({f"recall_{c}": m["per_class"][c]["recall"] for c in classes
                            if m["per_class"][c]["support"]})
        rows.append(row)
        progress(f"  {source}: held-out accuracy {row['held_out_accuracy']}, "
                 f"in-source test accuracy {row['in_source_test_accuracy']}")
    df = pl.DataFrame(rows, infer_schema_length=None)
    out.mkdir(parents=True, exist_ok=True)
    df.write_parquet(out / "loso.parquet")
    return df
