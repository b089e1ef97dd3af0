"""Preprocessing shared by scoring and training: resize, normalise, lung crop (numpy and torch)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MEAN, STD = 0.5, 0.25  # grayscale normalisation used by every model of the registry


def resize_uint8(pixels: np.ndarray, size: int) -> np.ndarray:
    """[0, 1] float (or uint8) image -> ``size`` x ``size`` uint8 (area filter when shrinking)."""
    img = pixels if pixels.dtype == np.uint8 else np.rint(np.clip(pixels, 0, 1) * 255).astype(np.uint8)
    if img.shape == (size, size):
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0))


def to_model_input(images: torch.Tensor, size: int, channels: int = 1) -> torch.Tensor:
    """uint8 (B, H, W) on any device -> normalised float (B, channels, size, size) on that device."""
    x = images.float().div_(255.0).unsqueeze(1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = (x - MEAN) / STD
    return x.expand(-1, channels, -1, -1) if channels > 1 else x


def crop_boxes(images: torch.Tensor, boxes: np.ndarray, size: int, margin: float = 0.05) -> torch.Tensor:
    """Crop each uint8 image (B, H, W) to its normalised box [x0, y0, x1, y1] (+margin), resized
    to ``size``; rows whose box is NaN keep the whole image. Returns uint8 (B, size, size)."""
    out = []
    h, w = images.shape[-2:]
    for img, box in zip(images, boxes):
        if np.isnan(box).any():
            crop = img
        else:
            x0, y0, x1, y1 = box
            x0, y0 = max(0.0, x0 - margin), max(0.0, y0 - margin)
            x1, y1 = min(1.0, x1 + margin), min(1.0, y1 + margin)
            crop = img[int(y0 * h):max(int(y0 * h) + 1, int(np.ceil(y1 * h))),
                       int(x0 * w):max(int(x0 * w) + 1, int(np.ceil(x1 * w)))]
        crop = F.interpolate(crop[None, None].float(), size=(size, size), mode="bilinear",
                             antialias=True, align_corners=False)
        out.append(crop[0, 0].round().clamp(0, 255).to(torch.uint8))
    return torch.stack(out) if out else images.new_zeros((0, size, size))
