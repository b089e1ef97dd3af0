"""One path from pixels to predictions, out-of-distribution referral, reason codes, site
calibration and drift: on phantoms with known ground truth (fast, no Ray)."""

import json
from collections import Counter

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from click.testing import CliRunner

from cxrscreen.cli import main
from cxrscreen.config import ConfigError, from_dict, load_config
from cxrscreen.data.synth import encode_png, write_archive
from cxrscreen.evaluate.run import evaluate_model, write_predictions
from cxrscreen.io.sources import InputItem
from cxrscreen.models import build_model, load_model, save_checkpoint
from cxrscreen.models.checkpoint import BUNDLED, ModelInfo
from cxrscreen.models.ood import OODReference, with_embedding
from cxrscreen.pipeline import ScoreConfig, score_items_local
from cxrscreen.pipeline.score import ScoreSummary, drift_warning
from cxrscreen.preprocess import equalize
from cxrscreen.referral import OOD_REFER_RATE
from cxrscreen.train.config import TrainConfig

CLASSES = ["covid", "normal", "viral_pneumonia", "bacterial_pneumonia"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_archive(tmp_path_factory.mktemp("trust"), 96, seed=11, size=128)


def _checkpoint(folder, manifest, intensity="raw", size=96, seed=0):
    """A cxrnet checkpoint (random weights) with a train_config that points at the phantoms."""
    torch.manual_seed(seed)
    model = build_model("cxrnet", 4, 1, widths=(8, 16, 32))
    save_checkpoint(folder, model, ModelInfo("cxrnet", "classify", CLASSES, size, 1, {"widths": [8, 16, 32]},
                                             intensity=intensity))
    cfg = TrainConfig(model="cxrnet", data=str(manifest), input_size=size, intensity=intensity)
    (folder / "train_config.yaml").write_text(yaml.safe_dump(dict(cfg.__dict__, augment=cfg.augment.__dict__)))
    return folder


def _score(files, **cfg):
    rows = score_items_local([InputItem(f, f) for f in files], ScoreConfig(segmenter="", batch_size=16, **cfg))
    return pl.concat([pl.DataFrame({k: v for k, v in b.items() if k in ("key", "status", "refer", "refer_reason",
                                                                          "ood_score", "polarity", "label")
                                    or k.startswith("prob_")}) for b in rows], how="vertical_relaxed")


@pytest.mark.parametrize("intensity", ["raw", "equalize"])
def test_evaluate_and_score_give_the_same_probabilities(manifest, tmp_path, intensity):
    ck = _checkpoint(tmp_path / "ck", manifest, intensity)
    res = evaluate_model(ck, split="test", predictions=True)
    pred = write_predictions(res["predictions"], res["classes"], tmp_path / "pred.parquet")
    assert pl.read_parquet(tmp_path / "pred.parquet").columns[:3] == ["key", "file", "label"]
    scored = _score(pred["file"].to_list(), classifier=str(ck))
    joined = pred.join(scored, left_on="file", right_on="key", suffix="_score")
    assert len(joined) == len(pred) > 10
    for c in CLASSES:
        assert np.abs(joined[f"prob_{c}"] - joined[f"prob_{c}_score"]).max() <= 1e-4
    assert np.abs(joined["ood_score"] - joined["ood_score_score"]).max() <= 1e-3
    # evaluate stored the OOD reference and its threshold with the checkpoint
    card = json.loads((ck / "model.json").read_text())
    assert (ck / "ood.safetensors").exists() and card["ood_threshold"] > 0 and card["ood_refer_rate"] == OOD_REFER_RATE
    assert 0 <= res["at_coverage"]["coverage"] <= 1 and res["referred_fraction"] >= 0


def test_evaluate_cli_writes_predictions(manifest, tmp_path):
    ck = _checkpoint(tmp_path / "ck", manifest)
    out = CliRunner().invoke(main, ["evaluate", str(ck), "--predictions", str(tmp_path / "p.parquet")])
    assert out.exit_code == 0, out.output
    df = pl.read_parquet(tmp_path / "p.parquet")
    assert {"key", "file", "label", "ood_score", *[f"prob_{c}" for c in CLASSES]} <= set(df.columns)
    assert np.allclose(df.select([f"prob_{c}" for c in CLASSES]).to_numpy().sum(1), 1, atol=1e-5)
    assert "referred" in out.output and "source probe" not in out.output  # phantoms have one source


def test_embedding_split_matches_the_model():
    model = build_model("cxrnet", 4, 1, widths=(8, 16)).eval()
    wrapped = with_embedding(model, 1, 64)
    x = torch.randn(3, 1, 64, 64)
    out = wrapped(x)
    assert out.shape == (3, 4 + 16) and torch.allclose(out[:, :4], model(x), atol=1e-5)
    ens = build_model("ensemble", 4, 1, member="cxrnet", n=2, member_kwargs={"widths": [8]}).eval()
    both = with_embedding(ens, 1, 64)  # the mean log-probability, then each member's embedding
    out = both(x)
    assert out.shape == (3, 4 + 2 * 8) and both.embedding_size == 16
    assert torch.allclose(out[:, :4], ens(x), atol=1e-5)
    for i, member in enumerate(ens.members):
        assert torch.allclose(out[:, 4 + 8 * i:12 + 8 * i], with_embedding(member, 1, 64)(x)[:, 4:], atol=1e-5)
    relu_last = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64 * 64, 4), torch.nn.ReLU())
    assert with_embedding(relu_last, 1, 64) is None  # its last linear layer is not its last operation


def test_mahalanobis_reference_scores_far_points_higher(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    emb = rng.normal(size=(600, 8)) + np.eye(8)[y] * 4
    ref = OODReference.fit(emb, y)
    near, far = ref.score(emb[:100]), ref.score(rng.normal(size=(100, 8)) * 6 + 10)
    assert near.max() < far.min()
    ref.save(tmp_path)
    back = OODReference.load(tmp_path, 8)
    assert np.allclose(back.score(emb[:5]), ref.score(emb[:5]))
    with pytest.raises(ValueError, match="embedding size"):
        OODReference.load(tmp_path, 16)


def test_error_rows_are_referred_unreadable_and_inverted_films_atypical(manifest, tmp_path):
    ck = _checkpoint(tmp_path / "ck", manifest)
    evaluate_model(ck, split="val")
    files = sorted(str(p) for p in (manifest.parent / "images").rglob("*.png"))[:12]
    inverted = []
    for i, f in enumerate(files[:6]):
        from PIL import Image

        img = 255 - np.asarray(Image.open(f).convert("L"))
        (tmp_path / f"inv{i}.png").write_bytes(encode_png(img.astype(np.float32) / 255))
        inverted.append(str(tmp_path / f"inv{i}.png"))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    df = _score(files + inverted + [str(tmp_path / "broken.png")], classifier=str(ck))
    broken = df.filter(pl.col("status") == "error").row(0, named=True)
    assert broken["refer"] and broken["refer_reason"] == ["unreadable"]
    inv = df.filter(pl.col("key").is_in(inverted))
    assert inv["polarity"].max() < 0 and all("atypical_intensity" in r for r in inv["refer_reason"])
    good = df.filter(pl.col("key").is_in(files))
    assert good["polarity"].min() > 0 and not any("atypical_intensity" in r for r in good["refer_reason"])
    for reasons, refer in zip(df["refer_reason"], df["refer"]):
        assert refer == bool(len(reasons))


def test_out_of_distribution_images_are_referred(manifest, tmp_path):
    ck = _checkpoint(tmp_path / "ck", manifest)
    evaluate_model(ck, split="val")
    rng = np.random.default_rng(1)
    noise = []
    for i in range(16):  # not chest films: textures the model never saw
        (tmp_path / f"n{i}.png").write_bytes(encode_png(rng.random((128, 128)).astype(np.float32)))
        noise.append(str(tmp_path / f"n{i}.png"))
    test = pl.read_csv(manifest).filter(pl.col("split") == "test")
    films = [str(manifest.parent / p) for p in test["path"]]
    df = _score(films + noise, classifier=str(ck))
    far = df.filter(pl.col("key").is_in(noise))
    assert far["ood_score"].min() > df.filter(pl.col("key").is_in(films))["ood_score"].median()
    assert np.mean(["out_of_distribution" in r for r in far["refer_reason"]]) >= 0.9


def test_explicit_refer_below_wins_over_the_checkpoint(manifest, tmp_path):
    ck = _checkpoint(tmp_path / "ck", manifest)
    card = json.loads((ck / "model.json").read_text())
    (ck / "model.json").write_text(json.dumps({**card, "refer_threshold": 0.0}))
    files = sorted(str(p) for p in (manifest.parent / "images").rglob("*.png"))[:8]
    assert not any("low_confidence" in r for r in _score(files, classifier=str(ck))["refer_reason"])
    assert all("low_confidence" in r for r in _score(files, classifier=str(ck), refer_below=1.01)["refer_reason"])


def test_untrained_models_are_refused_unless_asked(tmp_path):
    with pytest.raises(ValueError, match="cxrnet-4class"):
        load_model("cxrnet", "classify")
    assert load_model("cxrnet", "classify", allow_untrained=True).weights_sha256 == "untrained"
    out = CliRunner().invoke(main, ["score", str(tmp_path), "-o", str(tmp_path / "o"), "--classifier", "cxrnet"])
    assert out.exit_code == 2 and "cxrnet-4class" in out.output and "Traceback" not in out.output


def test_config_types_and_values_checked_before_running(tmp_path):
    with pytest.raises(ConfigError) as e:
        from_dict(ScoreConfig, {"batch_size": "eight", "device": "gpu", "refer_below": -1, "colour": 1})
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 4
    assert any("batch_size" in x and "expected int" in x for x in lines)
    assert any("device" in x and "'gpu'" in x for x in lines)
    assert any("refer_below" in x and ">= 0" in x for x in lines)
    assert any("colour" in x and "unknown" in x for x in lines)
    with pytest.raises(ConfigError, match="augment.blur"):
        from_dict(TrainConfig, {"augment": {"blur": "lots"}})
    (tmp_path / "base.yaml").write_text("model: cxrnet\nepochs: 3\naugment: {zoom: 0.2, blur: 0.1}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nepochs: 5\naugment: {blur: 0.4}\n")
    cfg = load_config(TrainConfig, tmp_path / "child.yaml")
    assert (cfg.model, cfg.epochs, cfg.augment.zoom, cfg.augment.blur) == ("cxrnet", 5, 0.2, 0.4)


@pytest.mark.parametrize("field,value", [("temperature", -1), ("temperature", 0), ("refer_threshold", "high"),
                                         ("intensity", "clahe"), ("ood_threshold", float("nan"))])
def test_checkpoint_fields_are_validated(tmp_path, field, value):
    model = build_model("cxrnet", 4, 1, widths=(8,))
    save_checkpoint(tmp_path, model, ModelInfo("cxrnet", "classify", CLASSES, 32, 1, {"widths": [8]}))
    card = json.loads((tmp_path / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**card, field: value}))
    with pytest.raises(ValueError, match=f"field '{field}'"):
        load_model(str(tmp_path), "classify")


def test_equalize_flattens_the_histogram():
    rng = np.random.default_rng(0)
    img = torch.from_numpy((rng.beta(2, 8, (2, 64, 64)) * 120).astype(np.uint8))
    eq = equalize(img)
    assert eq.dtype == torch.uint8 and eq.min() == 0 and eq.max() == 255
    for a, b in zip(img.reshape(2, -1), eq.reshape(2, -1)):  # monotone: order of grey levels kept
        order = torch.argsort(a)
        assert (b[order].diff() >= 0).all()
    assert abs(eq.float().mean().item() - 127.5) < 10


def test_equalize_maps_the_same_with_opencv_and_with_tensor_ops():
    """On a CPU OpenCV counts and maps; on a GPU tensor ops do: the same grey-level maps."""
    from cxrscreen.preprocess import _equalize_tensors

    rng = np.random.default_rng(1)
    img = torch.from_numpy(rng.integers(0, 256, (6, 40, 48), dtype=np.uint8))
    img[1] //= 3
    img[2], img[3], img[4] = 7, 0, 255  # flat images: one grey level
    img[5] = img[5] // 2 + 100
    for x in (img, img.transpose(1, 2)):  # and a non-contiguous batch
        assert torch.equal(equalize(x), _equalize_tensors(x))
    assert (equalize(img)[2:5] == 0).all()  # the darkest level present maps to 0


def test_site_calibration_refits_and_names_the_profile(manifest, tmp_path):
    ck = _checkpoint(tmp_path / "ck", manifest)
    evaluate_model(ck, split="val")
    df = pl.read_csv(manifest)
    labels = pl.DataFrame({"path": [str(manifest.parent / p) for p in df["path"]], "label": df["label"]})
    labels.write_csv(tmp_path / "labels.csv")
    out = CliRunner().invoke(main, ["calibrate", str(manifest.parent / "images"), "--labels", str(tmp_path / "labels.csv"),
                                    "--classifier", str(ck), "-o", str(tmp_path / "site")])
    assert out.exit_code == 0, out.output
    profile = json.loads((tmp_path / "site" / "profile.json").read_text())
    assert profile["fitted_on"]["images"] == len(df) and profile["temperature"] > 0
    assert (tmp_path / "site" / "ood.safetensors").exists()
    scored = _score(labels["path"].to_list()[:20], classifier=str(ck), site=str(tmp_path / "site"))
    assert scored["status"].to_list() == ["ok"] * 20 and scored["ood_score"].is_not_null().all()
    rows = list(score_items_local([InputItem(p, p) for p in labels["path"].to_list()[:4]],
                                  ScoreConfig(classifier=str(ck), segmenter="", site=str(tmp_path / "site"))))
    assert set(rows[0]["site_profile"]) == {"site"}
    # the site's own images are no longer out of distribution: at most the val rate referred
    ood = np.concatenate([b["refer_reason"] for b in score_items_local(
        [InputItem(p, p) for p in labels["path"].to_list()], ScoreConfig(classifier=str(ck), segmenter="",
                                                                          site=str(tmp_path / "site")))])
    assert np.mean(["out_of_distribution" in r for r in ood]) <= 0.1
    other = _checkpoint(tmp_path / "other", manifest, seed=1)
    with pytest.raises(ValueError, match="other classifier weights"):
        list(score_items_local([], ScoreConfig(classifier=str(other), segmenter="", site=str(tmp_path / "site"))))


def test_drift_warning_names_the_share_out_of_distribution():
    s = ScoreSummary(ok=200, referred=Counter({"out_of_distribution": 82}),
                     labels=Counter({"covid": 170, "normal": 30}))
    msg = drift_warning(s, {"ood_refer_rate": 0.05, "train_class_share": {"covid": 0.3, "normal": 0.3,
                                                                         "viral_pneumonia": 0.2,
                                                                         "bacterial_pneumonia": 0.2}})
    assert msg.startswith("41% of images are out of distribution") and "covid 85% (train 30%)" in msg
    assert "calibrate" in msg
    calm = ScoreSummary(ok=200, referred=Counter({"out_of_distribution": 10}), labels=Counter({"covid": 60, "normal": 60,
                                                                                              "viral_pneumonia": 40,
                                                                                              "bacterial_pneumonia": 40}))
    assert drift_warning(calm, {"ood_refer_rate": 0.05, "train_class_share": {"covid": 0.3, "normal": 0.3,
                                                                              "viral_pneumonia": 0.2,
                                                                              "bacterial_pneumonia": 0.2}}) == ""


def test_python_api_scores_paths_bytes_and_arrays_alike(manifest, tmp_path):
    import cxrscreen
    from PIL import Image

    ck = _checkpoint(tmp_path / "ck", manifest)
    files = sorted(str(p) for p in (manifest.parent / "images").rglob("*.png"))[:3]
    arrays = [np.asarray(Image.open(f).convert("L")) for f in files]
    screen = cxrscreen.Screener(str(ck), segmenter="")
    df = screen(files + [open(files[0], "rb").read()] + arrays + [np.zeros((3, 3, 3))])
    assert len(df) == 8 and df["status"].to_list() == ["ok"] * 7 + ["error"]
    probs = df.select([f"prob_{c}" for c in CLASSES]).to_numpy()
    assert np.abs(probs[:3] - probs[4:7]).max() < 1e-6 and np.abs(probs[0] - probs[3]).max() < 1e-6
    assert df["format"].to_list()[4:7] == ["array"] * 3 and df["refer_reason"][7].to_list() == ["unreadable"]


def test_an_unreachable_cluster_fails_in_seconds_with_one_line(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:  # a free loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()  # a fresh process: this one may already hold a local Ray from other tests
    out = subprocess.run([sys.executable, "-m", "cxrscreen.cli", "score", str(tmp_path), "-o", str(tmp_path / "o"),
                          "--segmenter", ""], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, RAY_ADDRESS=f"127.0.0.1:{port}"))
    assert time.monotonic() - t0 < 60
    assert out.returncode == 1 and f"no Ray cluster answers at 127.0.0.1:{port}" in out.stderr
    failure = [line for line in out.stderr.strip().splitlines() if not line.startswith("scoring ")]  # not the start line
    assert "Traceback" not in out.stderr and len(failure) == 1


def test_screening_confidence_merges_the_pneumonias():
    from cxrscreen.referral import screening_confidence

    p = np.array([[0.1, 0.1, 0.4, 0.4], [0.5, 0.3, 0.1, 0.1], [0.2, 0.6, 0.1, 0.1]])
    assert np.allclose(screening_confidence(p, CLASSES), [0.8, 0.5, 0.6])  # a sure pneumonia of unsure kind
    assert np.allclose(screening_confidence(p[:, :3] / p[:, :3].sum(1, keepdims=True), CLASSES[:3]),
                       (p[:, :3] / p[:, :3].sum(1, keepdims=True)).max(1))


def test_a_reference_saved_before_the_fusion_marker_keeps_its_maximum(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    emb, app = rng.normal(size=(400, 6)) + y[:, None] * 3, rng.normal(size=(400, 576))
    ref = OODReference.fit(emb, y, app).set_scale(emb[:100], app[:100])
    ref.save(tmp_path)
    back = OODReference.load(tmp_path)
    assert back.fusion == "geometric mean" and np.allclose(back.score(emb[:9], app[:9]), ref.score(emb[:9], app[:9]))
    old = tmp_path / "old"  # an ood.safetensors written by an earlier version: tensors only, no metadata
    old.mkdir()
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in ref.__dict__.items()
               if v is not None and k != "fusion"}, str(old / "ood.safetensors"))
    legacy = OODReference.load(old)
    parts = ref.parts(emb[:9], app[:9]) / ref.scale
    assert legacy.fusion == "max" and np.allclose(legacy.score(emb[:9], app[:9]), parts.max(1), atol=1e-5)
    assert OODReference.load(BUNDLED / "cxrnet-4class").fusion == "geometric mean"  # what the shipped threshold fits
