"""Lung-crop training, leave-one-source-out and the HTML report, on phantoms from two 'sites'."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cxrscreen.data.synth import write_archive
from cxrscreen.evaluate.run import evaluate_model
from cxrscreen.evaluate.source_shift import FOLD_OUTPUTS, audit_outputs, leave_one_source_out, read_fold_outputs
from cxrscreen.models.checkpoint import read_info
from cxrscreen.io import list_inputs
from cxrscreen.io.batch import decode_items
from cxrscreen.pipeline.config import ClassifierOptions, RuntimeOptions, SegmenterOptions
from cxrscreen.pipeline.stages import Classifier, Segmenter

CPU = RuntimeOptions(device="cpu", runtime="torch")
from cxrscreen.train import TrainConfig, train

pytestmark = pytest.mark.slow  # trains models and builds reports (seconds to minutes each)


@pytest.fixture(scope="module")
def two_site_manifest(tmp_path_factory):
    """Phantoms whose patients come from site_a or site_b (the manifest's source column), each
    site with every class (the phantom plan cycles the classes over consecutive patients)."""
    path = write_archive(tmp_path_factory.mktemp("sites"), 200, seed=7, size=64)
    df = pl.read_csv(path)
    site = pl.when(pl.col("patient_id").str.slice(3).cast(pl.Int32) // 4 % 2 == 0).then(pl.lit("site_a"))
    df.with_columns(site.otherwise(pl.lit("site_b")).alias("source")).write_csv(path)
    return path


def _cfg(manifest, out, **kw):
    return TrainConfig(**{**dict(model="cxrnet", data=str(manifest), input_size=64, epochs=6, batch_size=16,
                                 lr=3e-3, out=str(out), early_stopping_patience=6), **kw})


@pytest.fixture(scope="module")
def trained(two_site_manifest, tmp_path_factory, ray_2cpu):
    root = tmp_path_factory.mktemp("models")
    full = train(_cfg(two_site_manifest, root / "full"))
    crop = train(_cfg(two_site_manifest, root / "crop", lung_crop="unet-lungs"))
    return full, crop


def test_crop_trained_model_is_always_fed_lung_crops(trained, two_site_manifest):
    _, crop = trained
    assert json.loads((crop / "model.json").read_text())["lung_crop"] == "unet-lungs"
    items = list(list_inputs(two_site_manifest.parent / "images"))[:8]
    cls = Classifier(ClassifierOptions(str(crop)), CPU)
    assert cls.lung_crop
    # never silently uncropped: without the pipeline's boxes, or with another segmenter's, it crops
    # with its own copy of the segmenter it was trained with, so its probabilities do not change
    no_seg = cls(decode_items(items))
    with_seg = cls(Segmenter(SegmenterOptions("unet-lungs"), CPU)(decode_items(items)))
    other = cls(Segmenter(SegmenterOptions("unet-lungs-fast"), CPU)(decode_items(items)))
    assert (no_seg["status"] == "ok").all() and (with_seg["status"] == "ok").all()
    for c in ("covid", "normal", "viral_pneumonia", "bacterial_pneumonia"):
        assert np.abs(no_seg[f"prob_{c}"] - with_seg[f"prob_{c}"]).max() < 1e-5
        assert np.abs(other[f"prob_{c}"] - with_seg[f"prob_{c}"]).max() < 1e-5


def test_sources_can_be_kept_or_left_out(two_site_manifest):
    from cxrscreen.train.data import labeled_splits

    only_a, _ = labeled_splits(_cfg(two_site_manifest, "x", sources=["site_a"]))
    not_a, _ = labeled_splits(_cfg(two_site_manifest, "x", exclude_sources=["site_a"]))
    assert set(only_a["source"]) == {"site_a"} and set(not_a["source"]) == {"site_b"}
    assert set(only_a["label"]) == set(not_a["label"]) == {"covid", "normal", "viral_pneumonia", "bacterial_pneumonia"}
    assert len(only_a) + len(not_a) == 200


def test_leave_one_source_out(two_site_manifest, tmp_path, ray_2cpu, monkeypatch):
    # every viral pneumonia image comes from site_a: the fold without site_a never sees that class
    manifest = pl.read_csv(two_site_manifest)
    manifest = manifest.with_columns(pl.when(pl.col("label") == "viral_pneumonia").then(pl.lit("site_a"))
                                     .otherwise(pl.col("source")).alias("source"))
    path = two_site_manifest.parent / "viral_at_site_a.csv"
    manifest.write_csv(path)
    df = leave_one_source_out(_cfg(path, tmp_path, epochs=4), tmp_path, sources=["site_a"], progress=lambda *_: None,
                              ood_refer_rates=(0.05, 0.3))
    assert df["ood_refer_rate"].to_list() == [0.05, 0.3]  # one row per rate, from one pass over the images
    low, high = df.row(0, named=True), df.row(1, named=True)
    assert high["in_source_test_referred"] >= low["in_source_test_referred"] and high["ood_threshold"] < low["ood_threshold"]
    assert high["ood_auroc_combined"] == low["ood_auroc_combined"] and 0 <= low["ood_auroc_max_parts"] <= 1
    row = low
    site_a = manifest.filter(pl.col("source") == "site_a")
    viral = (site_a["label"] == "viral_pneumonia").sum()
    assert row["held_out"] == "site_a" and row["held_out_unseen_class_images"] == viral > 0
    assert row["held_out_n"] == len(site_a) - viral and "recall_viral_pneumonia" not in row
    assert row["train_images"] == len(manifest.filter((pl.col("source") == "site_b") & (pl.col("split") == "train")))
    assert 0 <= row["held_out_accuracy"] <= 1 and row["in_source_test_n"] > 0
    assert pl.read_parquet(tmp_path / "loso.parquet").equals(df)
    # the fold's per-image outputs, written beside its model, re-audit to the same rows without the model
    table, classes, arrays = read_fold_outputs(tmp_path / "without-site_a" / FOLD_OUTPUTS)
    assert table.columns == ["part", "target", "source"] and "file" not in table.columns
    assert (table["part"] == "held_out").sum() == len(site_a) and set(table.filter(pl.col("part") == "train")["source"]) == {"site_b"}
    assert {k: v.shape[0] for k, v in arrays.items()} == {k: len(table) for k in arrays} and arrays["logits"].shape[1] == len(classes)
    learned = sorted(set(table.filter(pl.col("part") == "train")["target"]))
    again = audit_outputs(table, classes, arrays, learned, ood_refer_rates=(0.05, 0.3))
    assert len(again) == len(df)
    for got, want in zip(again, df.to_dicts()):
        for key, value in got.items():
            assert value == pytest.approx(want[key], abs=1e-9, nan_ok=True), key
    # another OOD score under the same referral (benchmarks/ood_variants.py): the audit scores with it
    from cxrscreen.metrics import binary_auroc

    first_pixel = audit_outputs(table, classes, arrays, learned, ood_score=lambda train, val: lambda a: a["appearance"][:, 0])[0]
    part = table["part"].to_numpy()
    assert first_pixel["ood_fusion"] == "custom" and first_pixel["ood_auroc_combined"] == pytest.approx(
        binary_auroc(arrays["appearance"][part == "test", 0], arrays["appearance"][part == "held_out", 0]))
    assert first_pixel["ood_auroc_appearance"] == again[0]["ood_auroc_appearance"]  # the shipped parts still reported
    # --reuse audits other thresholds from those outputs, without running the model
    import cxrscreen.predict as predict

    def no_model(*_, **__):
        raise AssertionError("the model ran again")

    monkeypatch.setattr(predict, "classify_files", no_model)
    grid = leave_one_source_out(_cfg(path, tmp_path, epochs=4), tmp_path, sources=["site_a"], progress=lambda *_: None,
                                reuse=True, ood_refer_rates=(0.05, 0.3), target_sensitivities=(0.5, 0.95))
    assert grid.select("target_sensitivity", "ood_refer_rate").rows() == [(0.5, 0.05), (0.5, 0.3), (0.95, 0.05), (0.95, 0.3)]
    assert grid.filter(pl.col("target_sensitivity") == 0.95).drop("target_sensitivity").equals(df.drop("target_sensitivity"))
    assert (grid["refer_threshold"][:2] <= grid["refer_threshold"][2:]).all()  # a lower target refers less
    # other images (one held-out image fewer) than the outputs were made from: the model runs again
    fewer = manifest.filter(pl.col("path") != site_a["path"][0])
    fewer.write_csv(path.parent / "fewer.csv")
    with pytest.raises(AssertionError, match="ran again"):
        leave_one_source_out(_cfg(path.parent / "fewer.csv", tmp_path, epochs=4), tmp_path, sources=["site_a"],
                             progress=lambda *_: None, reuse=True)
    monkeypatch.undo()
    # the same fold audited as an ensemble of earlier loso folds' models (here the one fold, twice)
    ens = leave_one_source_out(_cfg(path, tmp_path / "ens", epochs=4), tmp_path / "ens", sources=["site_a"],
                               progress=lambda *_: None, ood_refer_rates=(0.05,), members=[tmp_path, tmp_path])
    e = ens.row(0, named=True)
    assert e["model"] == "ensemble" and read_info(tmp_path / "ens" / "without-site_a").name == "ensemble"
    redo = leave_one_source_out(_cfg(path, tmp_path / "ens", epochs=4), tmp_path / "ens", sources=["site_a"],
                                progress=lambda *_: None, ood_refer_rates=(0.05,), reuse=True)  # from its stored outputs
    assert redo["model"][0] == "ensemble" and redo["held_out_accuracy"][0] == e["held_out_accuracy"]
    assert e["held_out_accuracy"] == row["held_out_accuracy"]  # identical members: the same predictions
    assert e["held_out_n"] == row["held_out_n"] and 0 <= e["ood_auroc_combined"] <= 1
    with pytest.raises(ValueError, match="split_seed"):  # members must share the audit's splits
        leave_one_source_out(_cfg(path, tmp_path / "e2", epochs=4, split_seed=1), tmp_path / "e2",
                             sources=["site_a"], progress=lambda *_: None, members=[tmp_path])
    with pytest.raises(ValueError, match="elsewhere"):  # combining into a member's folder would overwrite it
        leave_one_source_out(_cfg(path, tmp_path, epochs=4), tmp_path, sources=["site_a"], members=[tmp_path])
    # benchmarks/ood_variants.py: the image-derived parts line up with the stored outputs row for row
    # (the ensemble's fold: both members' stages side by side) and every variant audits
    spec = importlib.util.spec_from_file_location("ood_variants", Path(__file__).parents[1] / "benchmarks" / "ood_variants.py")
    variants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(variants)
    fold = tmp_path / "ens" / "without-site_a"
    table, classes, arrays = read_fold_outputs(fold / FOLD_OUTPUTS)
    extra = variants.image_arrays(fold, table)
    assert extra["style"].shape == (len(table), 20)
    assert [extra[f"stage{k}"].shape for k in range(5)] == [(len(table), 2 * w) for w in (16, 32, 64, 128, 192)]
    for name, fit in {**variants.VARIANTS, **variants.IMAGE_VARIANTS}.items():
        audit = audit_outputs(table, classes, {**arrays, **extra}, learned, ood_score=fit)[0]
        assert 0 <= audit["ood_auroc_combined"] <= 1 and audit["ood_fusion"] == "custom", name
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))[None]
    noisy = np.clip(ramp + np.random.default_rng(0).normal(0, 20, ramp.shape), 0, 255).astype(np.uint8)
    style = variants.acquisition_style(np.concatenate([ramp, noisy]))
    assert style[1, 11] > style[0, 11] + 1 and style[1, 14] > style[0, 14]  # high-pass energy and noise
    assert style[0, 4] == pytest.approx(128 / 255, abs=0.01)  # the median grey level
    with pytest.raises(ValueError, match="row for row"):  # outputs of other images are refused
        variants.image_arrays(fold, table.reverse())


def test_report_compares_models_with_every_figure(trained, two_site_manifest, tmp_path):
    from cxrscreen.evaluate.report import build_report

    full, crop = trained
    loso = tmp_path / "loso.parquet"
    pl.DataFrame({"held_out": ["site_a"], "held_out_accuracy": [0.5]}).write_parquet(loso)
    said = []
    page = build_report([full, crop], tmp_path / "report", seg_data=str(two_site_manifest), loso=[loso],
                        samples=4, kmeans_images=60, progress=said.append)
    text = page.read_text()
    assert said[0].startswith("[1/2] full: evaluating") and any(m.startswith("[2/2] crop") for m in said)
    assert said[-1].startswith("writing") and any(m.startswith("segmentation") for m in said)
    # what the page was made from, before any result
    from cxrscreen import __version__
    from cxrscreen.models import load_model

    head = text[:text.index(">Data<")]
    assert "not a medical device" in head and f"cxrscreen {__version__}" in head
    for spec, task in ((full, "classify"), (crop, "classify"), ("unet-lungs", "segment")):
        assert load_model(str(spec), task).weights_sha256 in head
    for setting in ("refer threshold", "covid sensitivity target", "ood threshold", "ood refer rate", "temperature"):
        assert f"<th>{setting}</th>" in head
    assert text.count('<div class="wide"><table>') == text.count("<table>")  # every table scrolls in its box
    import re

    marked = re.findall(r"<figcaption>[^<]*\((\d+) of (\d+) misclassified, framed in red\)", text)
    assert len(marked) == 2 and all(int(m) == 4 and 0 <= int(w) <= 4 for w, m in marked)  # 4 samples per model
    for section in ("Data", "Comparison", "Lung crop vs whole image", "Model full", "Model crop",
                    "Lung segmentation", "Leave one source out"):
        assert f">{section}" in text
    plots = {p.name for p in (tmp_path / "report" / "plots").glob("*.png")}
    for tag in ("full", "crop"):
        for fig in ("training", "confusion", "roc", "reliability", "samples", "gradcam", "kmeans-pixels",
                    "kmeans-embeddings", "kmeans-pixels-counts"):
            assert f"{tag}-{fig}.png" in plots
    assert {"class-distribution.png", "segmentation-triplets.png"} <= plots
    assert text.count("data:image/png;base64,") == len(plots)  # self-contained: every figure embedded
    table = pl.read_parquet(tmp_path / "report" / "comparison.parquet")
    assert table["model"].to_list() == ["full", "crop"] and table["lung_crop"].to_list() == ["", "unet-lungs"]
    acc = evaluate_model(full, update_card=False)["metrics"]["accuracy"]
    assert table["accuracy"][0] == pytest.approx(acc)
    assert (table["params"] > 0).all() and (table["inference_images_per_s"] > 0).all()
    assert (table["train_seconds"] > 0).all() and table["cam_lung_energy"].is_between(0, 1).all()
    assert (tmp_path / "report" / "comparison.md").read_text().startswith("| model | architecture |")


def test_model_card_includes_comparison_and_loso(trained, two_site_manifest, tmp_path):
    from cxrscreen.evaluate.card import render_model_card
    from cxrscreen.evaluate.report import build_report

    full, crop = trained
    evaluate_model(full)  # the card needs test metrics in model.json
    build_report([full, crop], tmp_path, segmenter=None, samples=2, kmeans_images=40)
    loso = tmp_path / "loso.parquet"
    pl.DataFrame({"held_out": ["site_a"], "held_out_accuracy": [0.625]}).write_parquet(loso)
    (tmp_path / "style").mkdir()
    study = tmp_path / "style" / "loso.parquet"
    pl.DataFrame({"held_out": ["site_a", "site_b"], "held_out_noncovid_covid_unreferred": [0.1, 0.4],
                  "held_out_covid_caught": [0.9, None], "fold_score": [0.9, 0.6],
                  "in_source_test_referred": [0.1, 0.2],
                  "in_source_test_accuracy_at_coverage": [0.95, 0.97],
                  "in_source_test_accuracy_3class_at_coverage": [0.98, None]}).write_parquet(study)
    card = render_model_card(full, comparison=tmp_path / "comparison.parquet", loso=[loso], study=[study])
    assert "## Models compared" in card and "| full | cxrnet |" in card and "| crop | cxrnet | unet-lungs |" in card
    assert "## Source shift" in card and "| site_a | 0.625 |" in card
    # the card leads with what carries over: held-out sources, referral, before in-source test metrics
    assert card.index("## Trust first") < card.index("### Test split")
    assert "| style | 0.600 | 15.0% | 96.0% | 98.0% |" in card and "| style | site_b |" in card
    assert "accuracy of the rest" in card and "Not a medical device" in card


def test_a_crop_models_heatmap_is_shown_on_the_crop(trained, two_site_manifest):
    import numpy as np
    import torch

    from cxrscreen.explain import explain_items, overlays
    from cxrscreen.preprocess import crop_boxes

    _, crop = trained
    items = list(list_inputs(two_site_manifest.parent / "images"))[:3]
    cls = Classifier(ClassifierOptions(str(crop), cam="gradcam", cam_size=256), CPU)
    batch, images = explain_items(items, cls, Segmenter(runtime=CPU))
    shown = overlays(batch, images, cls.lung_crop)
    assert len(shown) == 3
    for i, picture in shown:
        on_crop = crop_boxes(torch.from_numpy(images[i:i + 1]), batch["lung_bbox"][i:i + 1], 256)[0].numpy()
        assert picture.shape == (256 + 30, 3 * 256, 3) and np.array_equal(picture[:256, :256, 0], on_crop)  # + caption
