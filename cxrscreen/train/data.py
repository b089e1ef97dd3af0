"""Labeled images for training: manifest -> class map -> splits -> in-memory uint8 work images
(decoded, and lung-cropped, by the scoring path: ``cxrscreen.predict``), and the dataset that
turns them into augmented model input with ``cxrscreen.preprocess``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cxrscreen.data.manifest import load_manifest
from cxrscreen.data.splits import leaking_groups, patient_split
from cxrscreen.preprocess import crop_boxes, normalise, to_unit
from cxrscreen.train.config import AugmentConfig, TrainConfig, class_map_for


def require_data(path: str) -> str:
    """``path`` if it exists, else a ValueError that says where it was looked for and how to
    give another (a checkpoint's ``data`` is relative to the folder it was trained from)."""
    if not Path(path).exists():
        raise ValueError(f"data {path!r} not found from {Path.cwd()} (a checkpoint's train_config.yaml names it "
                         "relative to where it was trained): give the manifest with --data PATH")
    return path


def labeled_splits(cfg: TrainConfig) -> tuple[pl.DataFrame, list[str]]:
    """Manifest rows mapped to the task's classes, with a patient-level ``split``."""
    df = load_manifest(require_data(cfg.data))
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


def load_images(files: list[str], lung_crop: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 work images of ``files`` exactly as ``score`` decodes them, and the mask of those that
    decoded; with ``lung_crop`` (a segmenter), each cropped to its lung box as ``score`` crops."""
    from cxrscreen.predict import ModelRunner, decode_files, lung_boxes

    images, ok = decode_files(files)
    if lung_crop:
        boxes = lung_boxes(ModelRunner(lung_crop, "segment", device="cpu"), images)
        images = crop_boxes(torch.from_numpy(images), boxes, images.shape[-1]).numpy()
    return images, ok


def segmentation_splits(cfg: TrainConfig) -> pl.DataFrame:
    """Image + mask rows with ``split``. For ../shared/data/seg: pseudo masks split as their cxr
    image (train/val), the expert masks are ``test`` (the only ground truth; never trained on).
    Other manifests (e.g. phantoms) keep their own ``split``."""
    from cxrscreen.data.manifest import read_seg_manifest

    df = read_seg_manifest(require_data(cfg.data))
    if "subset" in df.columns:
        split = pl.when(pl.col("subset") == "expert").then(pl.lit("test")).otherwise(pl.col("cxr_split"))
        df = df.with_columns(split.alias("split"))
    if cfg.max_images_per_split:
        df = pl.concat([g.sample(min(len(g), cfg.max_images_per_split), seed=cfg.seed)
                        for _, g in df.group_by("split", maintain_order=True)])
    return df


class ArrayDataset(Dataset):
    """uint8 work images + targets (class indices, or uint8 masks at ``size`` for segmentation)
    -> model input at ``size`` (``preprocess.to_unit`` -> augmentation -> ``preprocess.normalise``:
    without ``augment`` exactly ``preprocess.to_model_input``); with ``augment``, one random warp
    is applied to the image and its mask."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, size: int, channels: int = 1,
                 augment: AugmentConfig | None = None, intensity: str = "raw"):
        self.images, self.channels, self.augment = torch.from_numpy(images), channels, augment
        self.size, self.intensity = size, intensity
        self.masks = targets.ndim == 3
        # class indices (N,), class probabilities (N, C) or masks (N, H, W)
        self.targets = torch.from_numpy(targets.astype(np.int64 if targets.ndim == 1 else np.float32))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        x = to_unit(self.images[i][None], self.size, self.intensity)[0]
        y = self.targets[i][None] if self.masks else self.targets[i]
        if self.augment is not None:
            x, m = augment_image(x, self.augment, y if self.masks else None)
            y = (m > 0.5).float() if self.masks else y
        return normalise(x[None], self.channels)[0], y


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
    return acquisition_style(x, a), mask


def _chance(p: float) -> bool:
    return bool(p) and torch.rand(()).item() < p


def _u(lo: float, hi: float) -> float:
    return torch.empty(()).uniform_(lo, hi).item()


def acquisition_style(x: torch.Tensor, a: AugmentConfig) -> torch.Tensor:
    """Random acquisition and processing style of ``x`` (1, H, W) in [0, 1]: resampling, blur,
    JPEG re-compression, noise, borders and burned-in markers, each with its chance in ``a``.
    They vary what differs between sources and hospitals, not the lungs."""
    h, w = x.shape[-2:]
    if _chance(a.resample):
        f = _u(0.3, 0.8)
        small = F.interpolate(x[None], size=(max(8, int(h * f)), max(8, int(w * f))), mode="bilinear",
                              antialias=True, align_corners=False)
        x = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]
    if _chance(a.blur):
        sigma = _u(0.3, 1.5)
        r = max(1, int(3 * sigma))
        k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype) ** 2 / (2 * sigma ** 2))
        k = k / k.sum()
        x = F.conv2d(F.pad(x[None], (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))[0]
    if _chance(a.jpeg):
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray((x[0].clamp(0, 1) * 255).round().byte().numpy()).save(buf, "JPEG", quality=int(_u(15, 90)))
        x = torch.from_numpy(np.asarray(Image.open(buf), np.float32) / 255.0)[None]
    if _chance(a.noise):
        x = x + torch.randn_like(x) * _u(0.01, 0.05)
    if _chance(a.border):
        value = float(torch.randint(0, 2, ()).item())
        x = x.clone()
        for side in torch.randperm(4)[:int(torch.randint(1, 3, ()).item())].tolist():
            n = max(1, int(_u(0.02, 0.1) * (h if side < 2 else w)))
            if side == 0:
                x[..., :n, :] = value
            elif side == 1:
                x[..., h - n:, :] = value
            elif side == 2:
                x[..., :, :n] = value
            else:
                x[..., :, w - n:] = value
    if _chance(a.text):
        x = x.clone()
        for _ in range(int(torch.randint(1, 4, ()).item())):
            bh, bw = max(2, int(_u(0.02, 0.06) * h)), max(2, int(_u(0.03, 0.15) * w))
            top = int(_u(0, 0.15) * h) if torch.rand(()) < 0.5 else h - bh - int(_u(0, 0.15) * h)
            left = int(_u(0, 1) * (w - bw))
            x[..., max(0, top):max(0, top) + bh, left:left + bw] = _u(0.85, 1.0)
    return x.clamp(0, 1)


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
