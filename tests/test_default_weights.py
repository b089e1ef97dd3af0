"""The shipped weights: safe to load, documented, and useful on real data."""

import json

import numpy as np
import polars as pl
import pytest

from cxrscreen.io import InputItem
from cxrscreen.models import load_model
from cxrscreen.models.checkpoint import BUNDLED
from cxrscreen.pipeline import ScoreConfig, score_items_local
from tests.conftest import shared_path


def test_bundled_weights_are_small_and_described():
    total = sum(f.stat().st_size for f in BUNDLED.glob("*/model.safetensors"))
    assert 0 < total < 30 * 2**20
    cls = load_model("cxrnet-4class", "classify")
    assert cls.info.classes == ["covid", "normal", "viral_pneumonia", "bacterial_pneumonia"]
    assert len(cls.weights_sha256) == 64 and cls.info.refer_threshold is not None
    # what it does not know: an OOD reference fitted on its train split, a threshold on val
    assert cls.ood is not None and cls.ood.app_basis is not None and cls.info.ood_threshold > 0
    assert cls.info.lung_crop == "unet-lungs-fast" and cls.info.intensity == "equalize"
    card = json.loads((BUNDLED / "cxrnet-4class" / "model.json").read_text())
    assert card["metrics"]["test"]["n"] == 795  # evaluated on the shared test split
    for name in ("unet-lungs", "unet-lungs-fast"):
        seg = load_model(name, "segment")
        seg_metrics = json.loads((BUNDLED / name / "model.json").read_text())["metrics"]
        # adapted on the expert masks: only leave-one-out and pre-adaptation expert scores are reported
        assert seg.info.task == "segment" and seg_metrics["adaptation"]["images"] == 12
        assert {"expert_masks_loo_cleaned", "base_expert_masks_cleaned"} <= set(seg_metrics)
        assert "expert_masks_cleaned" not in seg_metrics


@pytest.mark.parametrize("segmenter", ["unet-lungs", "unet-lungs-fast"])
def test_default_pipeline_on_real_test_images(segmenter):
    from cxrscreen.data.manifest import read_manifest

    df = read_manifest(shared_path("cxr", "manifest.csv")).filter(pl.col("split") == "test")
    sample = pl.concat([g.head(10) for _, g in df.group_by("label", maintain_order=True)])
    items = [InputItem(key=p, path=f) for p, f in zip(sample["path"], sample["file"])]
    rows = [b for b in score_items_local(items, ScoreConfig(device="cpu", segmenter=segmenter))]
    labels = np.concatenate([b["label"] for b in rows])
    fractions = np.concatenate([b["lung_fraction"] for b in rows])
    assert (labels == sample["label"].to_numpy()).mean() >= 0.7  # 4 classes: chance is 0.25
    assert np.median(fractions) > 0.15 and np.median(fractions) < 0.5  # real lungs, not noise


def test_model_card_is_rendered_from_the_shipped_evaluation():
    """MODEL_CARD.md is exactly what `cxrscreen model-card` renders from the shipped files
    (no hand-copied numbers)."""
    from pathlib import Path

    from cxrscreen.evaluate.card import render_model_card

    ev = BUNDLED / "evaluation"
    card = render_model_card(BUNDLED / "cxrnet-4class", [BUNDLED / "unet-lungs", BUNDLED / "unet-lungs-fast"],
                             ev / "comparison.parquet",
                             sorted(ev.glob("loso-*.parquet")), [ev / "shortcut-study.parquet"])
    assert (Path(__file__).resolve().parents[1] / "MODEL_CARD.md").read_text() == card


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unet-lungs", "unet-lungs-fast"])
def test_shipped_unet_metrics_come_from_its_weights(name):
    """An adapted U-Net's recorded pseudo-mask Dice is recomputed from the shipped weights on
    ../shared/data/seg (val split); the default one's leave-one-out expert Dice meets the target."""
    from cxrscreen.metrics import mask_metrics
    from cxrscreen.models.checkpoint import read_info
    from cxrscreen.predict import ModelRunner, segment_images
    from cxrscreen.train.config import checkpoint_config
    from cxrscreen.train.trainer import make_task

    folder = BUNDLED / name
    recorded = read_info(folder).metrics
    cfg = checkpoint_config(folder)
    cfg.data = str(shared_path("seg", "manifest.csv"))
    images, masks = make_task(cfg).arrays("val")
    again = mask_metrics(segment_images(ModelRunner(name, "segment", device="cpu"), images) > 0.5, masks > 0)
    assert again["raw"]["n"] == recorded["pseudo_masks_val_raw"]["n"]
    assert abs(again["raw"]["dice"] - recorded["pseudo_masks_val_raw"]["dice"]) < 1e-3
    if name == "unet-lungs":  # the default segmenter
        assert recorded["expert_masks_loo_cleaned"]["dice"] >= 0.95  # issue 5's target, leave-one-out


def test_crop_classifier_scores_alike_whichever_segmenter_draws_the_masks():
    """The shipped classifier was trained on unet-lungs-fast boxes; with --segmenter unet-lungs
    it still crops with unet-lungs-fast (its own copy), so its probabilities do not change."""
    from cxrscreen.data.manifest import read_manifest

    df = read_manifest(shared_path("cxr", "manifest.csv")).filter(pl.col("split") == "test")
    sample = pl.concat([g.head(4) for _, g in df.group_by("label", maintain_order=True)])
    items = [InputItem(key=p, path=f) for p, f in zip(sample["path"], sample["file"])]
    probs = {}
    for seg in ("unet-lungs-fast", "unet-lungs", ""):
        b = list(score_items_local(items, ScoreConfig(device="cpu", segmenter=seg, batch_size=16)))[0]
        probs[seg] = np.stack([b[f"prob_{c}"] for c in ("covid", "normal", "viral_pneumonia", "bacterial_pneumonia")], 1)
    assert np.abs(probs["unet-lungs"] - probs["unet-lungs-fast"]).max() < 1e-4
    assert np.abs(probs[""] - probs["unet-lungs-fast"]).max() < 1e-4
