"""Labeled images for training: manifest -> class map -> splits -> in-memory uint8 arrays."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cxrscreen.data.manifest import load_manifest
from cxrscreen.data.splits import leaking_groups, patient_split
from cxrscreen.io.decode import decode_image, read_bytes
from cxrscreen.io.errors import ImageError
from cxrscreen.preprocess import MEAN, STD, crop_boxes, resize_uint8
from cxrscreen.train.config import AugmentConfig, TrainConfig, class_map_for


def labeled_splits(cfg: TrainConfig) -> tuple[pl.DataFrame, list[str]]:
    """Manifest rows mapped to the task's classes, with a patient-level ``split``."""
    df = load_manifest(cfg.data)
    cmap = class_map_for(cfg)
    if cfg.sources:
        df = df.filter(pl.col("source").is_in(cfg.sources))
    if cfg.exclude_sources:
        df = df.filter(~pl.col("source").is_in(cfg.exclude_sources))
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


def load_images(files: list[str], size: int, lung_crop: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode and resize every file to uint8 ``size`` x ``size``; returns (images, ok mask).
    With ``lung_crop`` (a segmenter), each image is cropped to its lung box first."""
    work = 256 if lung_crop else size
    images = np.zeros((len(files), work, work), np.uint8)
    ok = np.ones(len(files), bool)
    for i, f in enumerate(files):
        try:
            images[i] = resize_uint8(decode_image(read_bytes(f), name=f).pixels, work)
        except ImageError:
            ok[i] = False
    return (lung_crops(images, lung_crop, size) if lung_crop else images), ok


def lung_crops(images: np.ndarray, segmenter: str, size: int, batch: int = 32) -> np.ndarray:
    """uint8 images cropped to the lung box the segmenter finds (whole image if none), ``size`` px."""
    from cxrscreen.pipeline.stages import Segmenter, image_batch

    seg = Segmenter(segmenter, device="cpu")
    out = []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        b = seg(image_batch(chunk))
        out.append(crop_boxes(torch.from_numpy(chunk), b["lung_bbox"], size).numpy())
    return np.concatenate(out) if out else np.zeros((0, size, size), np.uint8)


def segmentation_splits(cfg: TrainConfig) -> pl.DataFrame:
    """Image + mask rows with ``split``. For ../shared/data/seg: pseudo masks split as their cxr
    image (train/val), the expert masks are ``test`` (the only ground truth; never trained on).
    Other manifests (e.g. phantoms) keep their own ``split``."""
    from cxrscreen.data.manifest import read_seg_manifest

    df = read_seg_manifest(cfg.data)
    if "subset" in df.columns:
        split = pl.when(pl.col("subset") == "expert").then(pl.lit("test")).otherwise(pl.col("cxr_split"))
        df = df.with_columns(split.alias("split"))
    if cfg.max_images_per_split:
        df = pl.concat([g.sample(min(len(g), cfg.max_images_per_split), seed=cfg.seed)
                        for _, g in df.group_by("split", maintain_order=True)])
    return df


class ArrayDataset(Dataset):
    """uint8 images + targets (class indices, or uint8 masks for segmentation) -> normalised
    float tensors; with ``augment``, one random warp is applied to the image and its mask."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, channels: int = 1,
                 augment: AugmentConfig | None = None):
        self.images, self.channels, self.augment = torch.from_numpy(images), channels, augment
        self.masks = targets.ndim == 3
        # class indices (N,), class probabilities (N, C) or masks (N, H, W)
        self.targets = torch.from_numpy(targets.astype(np.int64 if targets.ndim == 1 else np.float32))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        x = self.images[i].float().div(255.0)[None]
        y = self.targets[i][None] if self.masks else self.targets[i]
        if self.augment is not None:
            x, m = augment_image(x, self.augment, y if self.masks else None)
            y = (m > 0.5).float() if self.masks else y
        x = (x - MEAN) / STD
        return (x.expand(self.channels, -1, -1) if self.channels > 1 else x), y


def augment_image(x: torch.Tensor, a: AugmentConfig, mask: torch.Tensor | None = None):
    """Random zoom / shift / rotation (one affine warp, shared with ``mask``), flip, brightness,
    contrast, gamma and random erasing (image only). Returns (image, mask)."""
    g = torch.empty(5).uniform_(-1, 1)
    scale = 1 + a.zoom * g[0].item()
    angle = math.radians(a.rotate * g[1].item())
    tx, ty = 2 * a.shift * g[2].item(), 2 * a.shift * g[3].item()
    theta = torch.tensor([[math.cos(angle) / scale, -math.sin(angle) / scale, tx],
                          [math.sin(angle) / scale, math.cos(angle) / scale, ty]], dtype=x.dtype)
    grid = F.affine_grid(theta[None], [1, *x.shape], align_corners=False)
    x = F.grid_sample(x[None], grid, padding_mode="border", align_corners=False)[0]
    if mask is not None:
        mask = F.grid_sample(mask[None], grid, padding_mode="zeros", align_corners=False)[0]
    if a.hflip and torch.rand(()) < 0.5:
        x = x.flip(-1)
        mask = mask.flip(-1) if mask is not None else None
    if mask is not None and a.opacity and torch.rand(()) < a.opacity:
        x = paint_opacity(x, mask)
    if a.intensity:
        b, c = a.intensity * g[4].item(), 1 + a.intensity * torch.empty(()).uniform_(-1, 1).item()
        x = ((x - x.mean()) * c + x.mean() + b).clamp(0, 1)
    if a.gamma:
        x = x.pow(math.exp(a.gamma * torch.empty(()).uniform_(-1, 1).item()))
    if a.erase and torch.rand(()) < a.erase:
        x = erase_rectangle(x)
    return x, mask


def erase_rectangle(x: torch.Tensor) -> torch.Tensor:
    """``x`` (C, H, W) with one random rectangle (2-20% of the area, aspect 0.3-3.3) set to the
    image mean: the classifier cannot lean on any one region (Zhong et al., random erasing)."""
    h, w = x.shape[-2:]
    area = torch.empty(()).uniform_(0.02, 0.2).item() * h * w
    aspect = math.exp(torch.empty(()).uniform_(math.log(0.3), math.log(3.3)).item())
    eh, ew = min(h, max(1, round(math.sqrt(area * aspect)))), min(w, max(1, round(math.sqrt(area / aspect))))
    top, left = torch.randint(0, h - eh + 1, ()).item(), torch.randint(0, w - ew + 1, ()).item()
    x = x.clone()
    x[..., top:top + eh, left:left + ew] = x.mean()
    return x


def paint_opacity(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Image (1, H, W) in [0, 1] with a random patchy opacity blended in inside ``mask``
    (feathered edges): a smooth random field, thresholded, pulls the lung toward soft-tissue grey."""
    h, w = x.shape[-2:]
    coarse = torch.rand(1, 1, *torch.randint(3, 8, (2,)).tolist())
    field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]
    field = ((field - torch.empty(()).uniform_(0.3, 0.7)) * 4).clamp(0, 1)
    k = max(3, h // 24) | 1
    inside = F.avg_pool2d(mask[None], k, 1, k // 2)[0] * (mask > 0.5)
    alpha = torch.empty(()).uniform_(0.3, 0.9) * field * inside
    return x + alpha * (torch.empty(()).uniform_(0.5, 0.85) - x)
