"""Work image -> model input: the second half of the one path from pixels to predictions.

Every consumer (score, evaluate, train, calibrate, explain, bench) decodes with
``cxrscreen.io.batch`` to uint8 work images (256 x 256), optionally crops them to the lung box
(``crop_boxes``, at the work size), and turns them into model input here, with the intensity
standardisation the checkpoint names (``ModelInfo.intensity``). Training splits
``to_model_input`` into ``to_unit`` -> augmentation -> ``normalise``; without augmentation
that is the same arithmetic.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MEAN, STD = 0.5, 0.25  # grayscale normalisation used by every model of the registry
INTENSITIES = ("raw", "equalize")  # ModelInfo.intensity: none, or per-image histogram equalisation


def equalize(images: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of each uint8 image (B, H, W), batched on the images' device:
    every image's grey levels are mapped through its own cumulative histogram, so the model
    sees the same intensity distribution whatever the source's windowing and processing."""
    b, n = images.shape[0], images[0].numel()
    flat = images.reshape(b, -1).long()
    hist = torch.zeros(b, 256, dtype=torch.float32, device=images.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    cdf = hist.cumsum(1)
    lo = cdf.gather(1, flat.min(1, keepdim=True).values)  # the darkest level maps to 0
    lut = ((cdf - lo) / (n - lo).clamp(min=1) * 255).round().clamp(0, 255)
    return lut.gather(1, flat).to(torch.uint8).reshape(images.shape)


def to_unit(images: torch.Tensor, size: int, intensity: str = "raw") -> torch.Tensor:
    """uint8 (B, H, W) -> float (B, 1, size, size) in [0, 1] on the same device (antialiased
    bilinear resize), after the checkpoint's intensity standardisation."""
    if intensity not in INTENSITIES:
        raise ValueError(f"intensity {intensity!r}: expected one of {', '.join(INTENSITIES)}")
    if intensity == "equalize" and len(images):
        images = equalize(images)
    x = images.float().div_(255.0).unsqueeze(1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def normalise(x: torch.Tensor, channels: int = 1) -> torch.Tensor:
    """[0, 1] float (B, 1, H, W) -> the registry's normalisation, repeated to ``channels``."""
    x = (x - MEAN) / STD
    return x.expand(-1, channels, -1, -1) if channels > 1 else x


def to_model_input(images: torch.Tensor, size: int, channels: int = 1, intensity: str = "raw") -> torch.Tensor:
    """uint8 (B, H, W) on any device -> normalised float (B, channels, size, size) on that device."""
    return normalise(to_unit(images, size, intensity), channels)


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
