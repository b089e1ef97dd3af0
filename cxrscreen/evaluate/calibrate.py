"""Site calibration (``cxrscreen calibrate``): refit a classifier's calibration on a small
labelled sample (100-500 images) of one site's own archive.

A model's temperature, referral threshold and notion of "in distribution" are fitted on its
validation split; on a new hospital's films they do not carry over. From the sample, through
the scoring path (``cxrscreen.predict``), this fits: the temperature (negative log-likelihood),
the COVID referral threshold that reaches ``target_sensitivity`` on the sample, and the OOD
reference with the site's class means added to the checkpoint's (same shared covariance, same
threshold), so the site's kind of image stops counting as unknown. ``score --site PROFILE``
uses the result and every row names the profile.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from cxrscreen.metrics import fit_temperature, refer_threshold, softmax
from cxrscreen.models.site import SiteProfile
from cxrscreen.referral import TARGET_SENSITIVITY


def read_labels(labels_csv: str | Path, archive: str | Path, classes: list[str]) -> pl.DataFrame:
    """``path`` (absolute, or relative to ``archive``) and ``label`` (one of ``classes``) per row."""
    df = pl.read_csv(labels_csv)
    missing = {"path", "label"} - set(df.columns)
    if missing:
        raise ValueError(f"{labels_csv}: needs columns path and label (missing {sorted(missing)})")
    unknown = sorted(set(df["label"].to_list()) - set(classes))
    if unknown:
        raise ValueError(f"{labels_csv}: labels {unknown} are not classes of the classifier ({', '.join(classes)})")
    root = Path(archive)
    return df.with_columns(pl.Series("file", [p if Path(p).is_absolute() else str(root / p) for p in df["path"]]))


def calibrate_site(archive: str | Path, labels_csv: str | Path, out_dir: str | Path,
                   classifier: str = "cxrnet-4class", positive: str = "covid",
                   target_sensitivity: float = TARGET_SENSITIVITY, min_images: int = 20) -> SiteProfile:
    """Fit and save a ``SiteProfile`` for ``classifier`` from the labelled sample; returns it."""
    from cxrscreen.predict import ModelRunner, classify_files

    runner = ModelRunner(classifier, "classify")
    classes = list(runner.info.classes)
    df = read_labels(labels_csv, archive, classes)
    out, ok = classify_files(runner, df["file"].to_list())
    y = np.array([classes.index(c) for c in df["label"]])[ok]
    if len(y) < min_images:
        raise ValueError(f"only {len(y)} of {len(df)} labelled images decoded; calibration needs at least {min_images}")
    temperature = fit_temperature(out.logits, y)
    pos = classes.index(positive) if positive in classes else 0
    probs = softmax(out.logits, temperature)
    threshold = refer_threshold(probs, y, pos, target_sensitivity, classes)
    base, reference = runner.loaded.ood, None
    if base is not None and out.embeddings is not None:
        reference = base.with_site(out.embeddings, y, out.appearance)
    before = softmax(out.logits, runner.info.temperature).argmax(1)
    profile = SiteProfile(
        name=Path(out_dir).name, classifier_sha256=runner.loaded.weights_sha256, temperature=temperature,
        refer_threshold=threshold, ood_threshold=runner.info.ood_threshold,
        fitted_on={"images": int(len(y)), "labels_csv": str(labels_csv), "classifier": runner.loaded.weights_name,
                   "per_class": {classes[c]: int((y == c).sum()) for c in np.unique(y)},
                   "target": {"class": classes[pos], "sensitivity": target_sensitivity},
                   "accuracy": float((probs.argmax(1) == y).mean()),
                   "checkpoint_temperature": runner.info.temperature,
                   "checkpoint_refer_threshold": runner.info.refer_threshold,
                   "accuracy_before": float((before == y).mean())},
        reference=reference)
    profile.save(out_dir)
    return profile
