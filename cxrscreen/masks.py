"""Lung-mask post-processing and measurements (two largest components, holes filled)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """Keep the two largest 4-connected components of a boolean mask and fill their holes."""
    labels, n = ndimage.label(mask)
    if n > 2:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        keep = 1 + np.argsort(sizes)[-2:]
        mask = np.isin(labels, keep)
    return ndimage.binary_fill_holes(mask)


def lung_box(mask: np.ndarray) -> np.ndarray:
    """Normalised [x0, y0, x1, y1] of the mask (NaN when empty)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return np.full(4, np.nan, np.float32)
    h, w = mask.shape
    return np.array([xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h], np.float32)


def lung_side_boxes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of the patient's right and left lung (PA/AP convention: the right lung is on the
    image's left). Each component goes to the side of its centroid; a side without lung is NaN."""
    labels, n = ndimage.label(mask)
    sides = {"right": np.zeros_like(mask, bool), "left": np.zeros_like(mask, bool)}
    for k in range(1, n + 1):
        comp = labels == k
        side = "right" if np.nonzero(comp)[1].mean() < mask.shape[1] / 2 else "left"
        sides[side] |= comp
    return lung_box(sides["right"]), lung_box(sides["left"])


def decode_mask_png(data: bytes) -> np.ndarray:
    """A boolean mask from ``mask_png`` bytes."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("L")) > 127


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def mask_png(mask: np.ndarray, size: int) -> bytes:
    """A 0/255 PNG of the mask at ``size`` x ``size`` (nearest neighbour)."""
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
