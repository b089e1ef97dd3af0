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
    to ``size``, in one batched ``roi_align`` on the images' device (each output pixel averages
    the input pixels it covers); rows whose box is NaN keep the whole image. Returns uint8."""
    from torchvision.ops import roi_align

    b = torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4))
    b = torch.where(torch.isnan(b).any(1, keepdim=True), torch.tensor([0.0, 0.0, 1.0, 1.0]), b)
    b = torch.cat([(b[:, :2] - margin).clamp(0, 1), (b[:, 2:] + margin).clamp(0, 1)], 1)
    h, w = images.shape[-2:]
    rois = torch.cat([torch.arange(len(b), dtype=torch.float32)[:, None], b * torch.tensor([w, h, w, h])], 1)
    out = roi_align(images[:, None].float(), rois.to(images.device), (size, size), sampling_ratio=-1, aligned=True)
    return out[:, 0].round().clamp(0, 255).to(torch.uint8)
