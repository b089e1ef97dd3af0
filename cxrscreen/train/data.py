"""Labeled images for training: manifest -> class map -> splits -> in-memory uint8 arrays."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from torch.utils.data import Dataset

from cxrscreen.data.manifest import load_manifest
from cxrscreen.data.splits import leaking_groups, patient_split
from cxrscreen.io.decode import decode_image, read_bytes
from cxrscreen.io.errors import ImageError
from cxrscreen.preprocess import MEAN, STD, resize_uint8
from cxrscreen.train.config import AugmentConfig, TrainConfig, class_map_for


def labeled_splits(cfg: TrainConfig) -> tuple[pl.DataFrame, list[str]]:
    """Manifest rows mapped to the task's classes, with a patient-level ``split``."""
    df = load_manifest(cfg.data)
    cmap = class_map_for(cfg)
    df = df.filter(pl.col("label").is_in(list(cmap))).with_columns(
        pl.col("label").replace_strict(cmap, default=None).alias("target"))
    if df["split"].null_count() > 0 or cfg.cap_per_class:
        df = patient_split(df.drop("split"), seed=cfg.split_seed, label_col="target",
                           cap_per_class=cfg.cap_per_class)
    leaks = leaking_groups(df)
    if leaks:
        raise ValueError(f"{len(leaks)} patients appear in more than one split, e.g. {leaks[:3]}")
    if cfg.max_images_per_split:
        df = pl.concat([g.sample(min(len(g), cfg.max_images_per_split), seed=cfg.seed)
                        for _, g in df.group_by("split", maintain_order=True)])
    classes = sorted(set(cmap.values()), key=list(dict.fromkeys(cmap.values())).index)
    return df, classes


def load_images(files: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode and resize every file to uint8 ``size`` x ``size``; returns (images, ok mask)."""
    images = np.zeros((len(files), size, size), np.uint8)
    ok = np.ones(len(files), bool)
    for i, f in enumerate(files):
        try:
            images[i] = resize_uint8(decode_image(read_bytes(f), name=f).pixels, size)
        except ImageError:
            ok[i] = False
    return images, ok


class ArrayDataset(Dataset):
    """uint8 images + integer targets -> normalised float tensors, optionally augmented."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, channels: int = 1,
                 augment: AugmentConfig | None = None):
        self.images, self.targets = torch.from_numpy(images), torch.from_numpy(targets.astype(np.int64))
        self.channels, self.augment = channels, augment

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        x = self.images[i].float().div(255.0)[None]
        if self.augment is not None:
            x = augment_image(x, self.augment)
        x = (x - MEAN) / STD
        return x.expand(self.channels, -1, -1) if self.channels > 1 else x, self.targets[i]


def augment_image(x: torch.Tensor, a: AugmentConfig) -> torch.Tensor:
    """Random zoom / shift / rotation (one affine warp), flip, brightness and contrast."""
    import math

    import torch.nn.functional as F

    g = torch.empty(5).uniform_(-1, 1)
    scale = 1 + a.zoom * g[0].item()
    angle = math.radians(a.rotate * g[1].item())
    tx, ty = 2 * a.shift * g[2].item(), 2 * a.shift * g[3].item()
    theta = torch.tensor([[math.cos(angle) / scale, -math.sin(angle) / scale, tx],
                          [math.sin(angle) / scale, math.cos(angle) / scale, ty]], dtype=x.dtype)
    grid = F.affine_grid(theta[None], [1, *x.shape], align_corners=False)
    x = F.grid_sample(x[None], grid, padding_mode="border", align_corners=False)[0]
    if a.hflip and torch.rand(()) < 0.5:
        x = x.flip(-1)
    if a.intensity:
        b, c = a.intensity * g[4].item(), 1 + a.intensity * torch.empty(()).uniform_(-1, 1).item()
        x = ((x - x.mean()) * c + x.mean() + b).clamp(0, 1)
    return x
