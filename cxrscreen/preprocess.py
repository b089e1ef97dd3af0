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
CROP_CHUNK = 8  # rows per grid_sample call of crop_boxes: 0.37 vs 0.48 ms per image for 64 at once (CPU, 256 px)


def equalize(images: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of each uint8 image (B, H, W), batched on the images' device:
    every image's grey levels are mapped through its own cumulative histogram, so the model
    sees the same intensity distribution whatever the source's windowing and processing.
    On a CPU OpenCV counts and maps (0.08 vs 0.37 ms per 256 px image), elsewhere tensor ops;
    the same mapping (``_equalize_luts``) either way."""
    if images.device.type == "cpu":
        import cv2

        arr = np.ascontiguousarray(images.numpy())
        hist = torch.from_numpy(np.stack([cv2.calcHist([a], [0], None, [256], [0, 256]).ravel() for a in arr]))
        luts = _equalize_luts(hist, arr[0].size).numpy()
        return torch.from_numpy(np.stack([cv2.LUT(a, lut) for a, lut in zip(arr, luts)]))
    return _equalize_tensors(images)


def _equalize_tensors(images: torch.Tensor) -> torch.Tensor:
    """``equalize`` as tensor ops on the images' device."""
    b, n = images.shape[0], images[0].numel()
    flat = images.reshape(b, -1).long()
    hist = torch.zeros(b, 256, dtype=torch.float32, device=images.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    return _equalize_luts(hist, n).gather(1, flat).reshape(images.shape)


def _equalize_luts(hist: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 grey-level maps (B, 256) from histograms (B, 256) of images of ``n`` pixels: each
    level's cumulative count, the darkest level present mapped to 0."""
    cdf = hist.cumsum(1)
    lo = cdf.gather(1, (hist > 0).int().argmax(1, keepdim=True))
    return ((cdf - lo) / (n - lo).clamp(min=1) * 255).round().clamp(0, 255).to(torch.uint8)


def to_unit(images: torch.Tensor, size: int, intensity: str = "raw") -> torch.Tensor:
    """uint8 (B, H, W) -> float (B, 1, size, size) in [0, 1] on the same device (antialiased
    bilinear resize), after the checkpoint's intensity standardisation."""
    if intensity not in INTENSITIES:
        raise ValueError(f"intensity {intensity!r}: expected one of {', '.join(INTENSITIES)}")
    if intensity == "equalize" and len(images):
        images = equalize(images)
    x = images.to(torch.float32, copy=True).div_(255.0).unsqueeze(1)  # a new tensor: normalised in place
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def normalise(x: torch.Tensor, channels: int = 1, inplace: bool = False) -> torch.Tensor:
    """[0, 1] float (B, 1, H, W) -> the registry's normalisation, repeated to ``channels``
    (``inplace``: in ``x`` itself, the same arithmetic without two new tensors)."""
    x = x.sub_(MEAN).div_(STD) if inplace else (x - MEAN) / STD
    return x.expand(-1, channels, -1, -1) if channels > 1 else x


def to_model_input(images: torch.Tensor, size: int, channels: int = 1, intensity: str = "raw") -> torch.Tensor:
    """uint8 (B, H, W) on any device -> normalised float (B, channels, size, size) on that device."""
    return normalise(to_unit(images, size, intensity), channels, inplace=True)  # to_unit's tensor is new


def crop_boxes(images: torch.Tensor, boxes: np.ndarray, size: int, margin: float = 0.05) -> torch.Tensor:
    """Crop each uint8 image (B, H, W) to its normalised box [x0, y0, x1, y1] (+margin), resized
    to ``size``, on the images' device; rows whose box is NaN keep the whole image. Returns uint8.

    The arithmetic of ``torchvision.ops.roi_align(aligned=True, sampling_ratio=-1)``: each output
    pixel averages ceil(box / size) x ceil(box / size) bilinear samples spread over the input
    pixels it covers; done as one ``grid_sample`` (and an average pool where a box is larger than
    ``size``) per group of rows with the same sample count, on a CPU a few rows at a time (``CROP_CHUNK``),
    about 2.5x faster than roi_align on a CPU (tests/test_preprocess.py checks that they agree)."""
    b = torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4))
    if len(b) != len(images):
        raise ValueError(f"crop_boxes: {len(b)} boxes for {len(images)} images")
    b = torch.where(torch.isnan(b).any(1, keepdim=True), torch.tensor([0.0, 0.0, 1.0, 1.0]), b)
    b = torch.cat([(b[:, :2] - margin).clamp(0, 1), (b[:, 2:] + margin).clamp(0, 1)], 1)
    h, w = images.shape[-2:]
    px = b * torch.tensor([w, h, w, h], dtype=torch.float32)  # box corners in pixels
    samples = torch.stack([((px[:, 3] - px[:, 1]) / size).ceil(), ((px[:, 2] - px[:, 0]) / size).ceil()], 1)
    samples = samples.clamp(min=1).to(torch.int64)  # per row: samples per output pixel, down and across
    out = torch.empty((len(b), size, size), dtype=torch.uint8, device=images.device)
    for rh, rw in torch.unique(samples, dim=0).tolist():
        group = torch.nonzero((samples == torch.tensor([rh, rw])).all(1))[:, 0]
        r = px[group]
        # sample k of an axis lies at start - 0.5 + (k + 0.5) * bin / samples (k < size * samples)
        ky = (torch.arange(size * rh, dtype=torch.float32) + 0.5) / rh
        kx = (torch.arange(size * rw, dtype=torch.float32) + 0.5) / rw
        ys = r[:, 1:2] - 0.5 + ky[None] * ((r[:, 3] - r[:, 1]) / size)[:, None]
        xs = r[:, 0:1] - 0.5 + kx[None] * ((r[:, 2] - r[:, 0]) / size)[:, None]
        gy, gx = (2 * ys + 1) / h - 1, (2 * xs + 1) / w - 1  # grid_sample's coordinates (align_corners=False)
        chunk = CROP_CHUNK if images.device.type == "cpu" else len(group)  # CPU: grids that stay in the cache
        for start in range(0, len(group), chunk):
            j = slice(start, start + chunk)
            grid = torch.empty((len(gy[j]), len(ky), len(kx), 2), dtype=torch.float32)
            grid[..., 0], grid[..., 1] = gx[j, None, :], gy[j, :, None]
            idx = group[j].to(images.device)
            crop = F.grid_sample(images[idx][:, None].float(), grid.to(images.device), mode="bilinear",
                                 padding_mode="border", align_corners=False)
            crop = F.avg_pool2d(crop, (rh, rw)) if rh * rw > 1 else crop
            out[idx] = crop[:, 0].round_().clamp_(0, 255).to(torch.uint8)
    return out
