"""Grad-CAM / Grad-CAM++: target layers, localisation on phantoms with known opacities, outputs."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from cxrscreen.data.synth import make_phantom
from cxrscreen.cam import METHODS, GradCAM, energy_inside, find_target_layer
from cxrscreen.explain import explain_archive
from cxrscreen.io import list_inputs
from cxrscreen.models.registry import build_model, get_entry, list_models
from cxrscreen.pipeline import ScoreConfig, score_items_local
from cxrscreen.preprocess import to_model_input

SIZE = 128


@pytest.mark.parametrize("name", list_models("classify"))
def test_every_registry_classifier_gets_a_heatmap(name):
    size = get_entry(name).input_size
    torch.manual_seed(0)
    module = build_model(name, 4, 1)
    heat, target, logits = GradCAM(module, 1, size, "gradcampp")(torch.randn(2, 1, size, size))
    assert heat.shape == (2, size, size) and logits.shape == (2, 4)
    assert (target == logits.argmax(1).cpu().numpy()).all()
    assert heat.min() >= 0 and np.allclose(heat.reshape(2, -1).max(1), 1.0, atol=1e-5) or heat.max() == 0


def test_target_layers_are_the_last_feature_maps():
    layer = {n: find_target_layer(build_model(n, 4, 1), 1, get_entry(n).input_size)
             for n in ("resnet18", "googlenet", "densenet121", "p0_cnn_lstm")}
    assert layer == {"resnet18": "layer4", "googlenet": "inception5b", "densenet121": "features",
                     "p0_cnn_lstm": "features"}
    last = find_target_layer(build_model("cxrnet", 4, 1), 1, 224)  # an ensemble: every member's map
    assert GradCAM(build_model("ensemble", 4, 1, n=2), 1, 224).layers == [f"members.0.{last}", f"members.1.{last}"]


@pytest.fixture(scope="module")
def opacity_model():
    """cxrnet (3 blocks) trained to tell normal phantoms from ones with one focal consolidation
    (in 2 threads whatever an earlier test left: the float sums, and so the training, depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return _train_opacity_model()
    finally:
        torch.set_num_threads(threads)


def _train_opacity_model():
    torch.manual_seed(0)
    labels = ("normal", "bacterial_pneumonia")
    phantoms = [make_phantom(labels[i % 2], SIZE, seed=i) for i in range(240)]
    x = to_model_input(torch.from_numpy(np.stack([np.rint(p.image * 255).astype(np.uint8) for p in phantoms])), SIZE)
    y = torch.tensor([i % 2 for i in range(240)])
    model = build_model("cxrnet", 2, 1, widths=(16, 32, 64))
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    for _ in range(8):
        model.train()
        for idx in torch.randperm(200).split(20):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    # batch-norm statistics as the mean over the training images, not a running average of the
    # last steps (that average left the eval-mode model at chance on some CPUs: float sums differ)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for idx in torch.arange(200).split(20):
            model(x[idx])
    model.eval()
    return model, phantoms[200:], x[200:], y[200:]


@pytest.mark.parametrize("method", METHODS)
def test_heatmap_peaks_at_the_known_opacity(opacity_model, method):
    model, phantoms, x, y = opacity_model
    cam = GradCAM(model, 1, SIZE, method)
    heat, target, _ = cam(x)
    assert (target == y.numpy()).mean() >= 0.9  # the model learned the task
    cell = SIZE // 16  # the target layer's feature map is 16 x 16 here: one cell = 8 px
    near, enrichment = [], []
    for k in np.nonzero((y.numpy() == 1) & (target == 1))[0]:
        finding = phantoms[k].finding_mask.astype(bool)
        peak = np.unravel_index(heat[k].argmax(), heat[k].shape)
        near.append(ndimage.distance_transform_edt(~finding)[peak] <= cell)
        assert (peak[1] < SIZE / 2) == (np.argwhere(finding)[:, 1].mean() < SIZE / 2)  # the right lung side
        enrichment.append(energy_inside(heat[k], finding) / finding.mean())
    assert len(near) >= 15 and np.mean(near) >= 0.9
    assert np.median(enrichment) > 4  # far more heat on the opacity than its area share


def test_energy_inside():
    cam = np.zeros((8, 8))
    cam[:4] = 1.0
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True  # resized to the heatmap: the top-left quarter
    assert energy_inside(cam, mask) == pytest.approx(0.5)
    assert np.isnan(energy_inside(np.zeros((8, 8)), mask))


def test_score_with_cam_writes_heatmaps_and_lung_energy(mixed_archive):
    archive, bad = mixed_archive
    items = list(list_inputs(archive))
    batch = next(iter(score_items_local(items, ScoreConfig(device="cpu", batch_size=len(items), cam="gradcam",
                                                           cam_size=64))))
    ok = batch["status"] == "ok"
    assert ok.sum() == len(items) - len(bad)
    for png, energy in zip(batch["cam_png"][ok], batch["cam_lung_energy"][ok]):
        heat = np.asarray(Image.open(io.BytesIO(png)))
        assert heat.shape == (64, 64) and heat.max() >= 240 and 0 <= energy <= 1
    assert all(p is None for p in batch["cam_png"][~ok]) and np.isnan(batch["cam_lung_energy"][~ok]).all()


def test_explain_archive_writes_table_and_overlays(phantom_archive, tmp_path):
    df = explain_archive(phantom_archive / "images", tmp_path, method="gradcampp", limit=5)
    assert len(df) == 5 and (df["status"] == "ok").all() and (df["cam_method"] == "gradcampp").all()
    overlays = sorted((tmp_path / "overlays").glob("*.png"))
    assert len(overlays) == 5
    assert not any(p.name.endswith(".png.png") for p in overlays)
    img = np.asarray(Image.open(overlays[0]))
    side = img.shape[1] // 3
    assert img.shape[2] == 3 and img.shape[0] == side + 30  # image | lungs | heatmap, then the caption strip
    strip = img[side:].astype(int)
    assert (strip < 60).all(2).sum() > 50  # caption text (label, probability, CAM energy)
    blue = (strip[..., 2] > 150) & (strip[..., 0] < 60)
    red = (strip[..., 0] > 150) & (strip[..., 2] < 60)
    assert blue.sum() > 20 and red.sum() > 20  # the colour bar: 0 = blue ... 1 = red
