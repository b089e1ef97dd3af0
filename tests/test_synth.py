import numpy as np
import polars as pl
import torch
from torch import nn

from cxrscreen.data.manifest import read_manifest
from cxrscreen.data.splits import leaking_groups
from cxrscreen.data.synth import CLASSES, make_phantom
from cxrscreen.io import decode_image, read_bytes


def test_deterministic_and_masks_consistent():
    for label in CLASSES:
        a, b = make_phantom(label, 128, 11), make_phantom(label, 128, 11)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.lung_mask, b.lung_mask)
        assert 0.1 < a.lung_mask.mean() < 0.4
        assert not np.array_equal(a.image, make_phantom(label, 128, 12).image)
        if label == "normal":
            assert a.finding_mask.sum() == 0
        else:
            assert a.finding_mask.sum() > 20
            assert (a.finding_mask & a.lung_mask).sum() == a.finding_mask.sum()  # findings in lungs
            inside = a.image[a.finding_mask == 1].mean()
            assert inside > a.image[(a.lung_mask == 1) & (a.finding_mask == 0)].mean()  # opacity is brighter


def test_archive_formats_decode_to_the_phantom(phantom_archive):
    df = read_manifest(phantom_archive / "manifest.csv")
    assert len(df) == 48 and set(df["format"]) == {"png", "png16", "jpeg", "dicom"}
    assert set(df["label"]) == set(CLASSES) and leaking_groups(df) == []
    for row in df.iter_rows(named=True):
        ph = make_phantom(row["label"], 128, row["seed"])
        pixels = decode_image(read_bytes(row["file"]), name=row["file"]).pixels
        tol = 0.03 if row["format"] == "jpeg" else 0.003
        assert np.abs(pixels - ph.image).mean() < tol, row["path"]
        mask = decode_image(read_bytes(phantom_archive / row["mask_path"])).pixels
        assert np.array_equal(mask > 0.5, ph.lung_mask == 1)
    assert pl.read_parquet(phantom_archive / "phantoms.parquet").height == 48


def test_tiny_cnn_learns_phantoms_quickly():
    torch.manual_seed(0)

    def data(n, offset):
        x = np.stack([make_phantom(CLASSES[i % 4], 64, offset + i).image for i in range(n)])
        return torch.from_numpy(x)[:, None], torch.arange(n) % 4

    xtr, ytr = data(240, 0)
    xte, yte = data(80, 10_000)

    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]

    model = nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 32), nn.AdaptiveAvgPool2d(4),
                          nn.Flatten(), nn.Linear(512, 4))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(20):
        model.train()
        for idx in torch.randperm(240).split(32):
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    assert acc > 0.9
