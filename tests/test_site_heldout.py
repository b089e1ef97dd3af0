"""Site calibration on a source the model never saw: a small fold model is trained without
rtchanon (../shared/data), then calibrated on a labelled sample of rtchanon and scored on other
rtchanon images with and without the profile."""

import numpy as np
import polars as pl
import pytest

from cxrscreen.evaluate.calibrate import calibrate_site
from cxrscreen.metrics import softmax
from cxrscreen.evaluate.run import evaluate_model
from cxrscreen.io import InputItem
from cxrscreen.pipeline import ScoreConfig, score_items_local
from cxrscreen.train import TrainConfig, train
from tests.conftest import shared_path

pytestmark = pytest.mark.slow  # trains a fold model (about a minute)


def _rows(files, **cfg):
    batches = score_items_local([InputItem(f, f) for f in files], ScoreConfig(segmenter="", batch_size=32, **cfg))
    return pl.concat([pl.DataFrame({k: b[k] for k in ("key", "label", "refer", "refer_reason", "site_profile",
                                                      "prob_covid", "ood_score")}) for b in batches])


def test_site_profile_fitted_on_a_held_out_source(tmp_path, ray_2cpu):
    manifest = shared_path("cxr", "manifest.csv")
    cfg = TrainConfig(model="cxrnet", model_kwargs={"widths": [8, 16, 32]}, data=str(manifest), input_size=64,
                      epochs=3, batch_size=32, lr=3e-3, exclude_sources=["rtchanon"], max_images_per_split=300,
                      out=str(tmp_path / "fold"))
    fold = train(cfg)
    evaluate_model(fold, split="val", ood_refer_rate=0.05)  # checkpoint calibration + OOD reference

    df = pl.read_csv(manifest).filter(pl.col("source") == "rtchanon").sort("path")
    files = [str(manifest.parent / p) for p in df["path"]]
    labels = pl.DataFrame({"path": files, "label": df["label"]})
    rng = np.random.default_rng(0)
    pick = rng.permutation(len(labels))
    sample, rest = labels[pick[:160]], labels[pick[160:400]]
    sample.write_csv(tmp_path / "labels.csv")
    profile = calibrate_site(manifest.parent, tmp_path / "labels.csv", tmp_path / "site-a", classifier=str(fold))
    assert profile.fitted_on["images"] == 160 and profile.temperature > 0

    before = _rows(rest["path"].to_list(), classifier=str(fold))
    after = _rows(rest["path"].to_list(), classifier=str(fold), site=str(tmp_path / "site-a"))
    assert set(after["site_profile"]) == {"site-a"} and set(before["site_profile"]) == {None}

    # a new source is out of distribution until the site's own images are added to the reference
    ood_before = np.mean(["out_of_distribution" in r for r in before["refer_reason"]])
    ood_after = np.mean(["out_of_distribution" in r for r in after["refer_reason"]])
    # (the checkpoint's threshold refers 5% of its val; this small model flags the new source 4-6x as often)
    assert ood_before >= 0.2 and ood_after <= 0.2 and ood_after <= 0.6 * ood_before

    # the site's COVID referral threshold carries over to other images of the same site
    covid = (rest["label"] == "covid").to_numpy()
    caught = (after["label"] == "covid").to_numpy() | after["refer"].to_numpy()
    assert covid.sum() > 50 and caught[covid].mean() >= 0.9

    # the site temperature fits the site better than the checkpoint's (log-loss of the true class)
    from cxrscreen.predict import ModelRunner, classify_files

    runner = ModelRunner(str(fold), "classify")
    out, ok = classify_files(runner, rest["path"].to_list())
    classes = list(runner.info.classes)
    y = np.array([classes.index(c) for c in rest["label"]])[ok]

    def nll(t):
        return float(-np.log(softmax(out.logits, t)[np.arange(len(y)), y] + 1e-12).mean())

    assert nll(profile.temperature) <= nll(runner.info.temperature) + 1e-3
