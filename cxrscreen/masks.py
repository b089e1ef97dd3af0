"""Lung-mask post-processing and measurements (two largest components, holes filled)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage


@dataclass
class LungRegions:
    """A cleaned lung mask and its measurements (boxes normalised [x0, y0, x1, y1], NaN if empty)."""

    mask: np.ndarray
    fraction: float
    box: np.ndarray
    right: np.ndarray  # the patient's right lung: the image's left half (PA/AP convention)
    left: np.ndarray


def lung_regions(mask: np.ndarray) -> LungRegions:
    """Keep the two largest 4-connected components of a boolean mask, fill their holes, and
    measure area fraction, the overall box and one box per lung - with one labelling pass.
    Each component goes to the side its box centre lies on."""
    h, w = mask.shape
    labels, n = ndimage.label(mask)
    nan = np.full(4, np.nan, np.float32)
    if n == 0:
        return LungRegions(np.zeros_like(mask, bool), 0.0, nan, nan.copy(), nan.copy())
    keep = np.argsort(np.bincount(labels.ravel())[1:])[-2:] + 1
    lut = np.zeros(n + 1, bool)
    lut[keep] = True
    cleaned = fill_holes(lut[labels])  # holes lie inside a component: boxes unchanged
    slices = ndimage.find_objects(labels)
    boxes = {"right": [], "left": []}
    for k in keep:
        ys, xs = slices[k - 1]
        box = np.array([xs.start / w, ys.start / h, xs.stop / w, ys.stop / h], np.float32)
        boxes["right" if (box[0] + box[2]) / 2 < 0.5 else "left"].append(box)

    def union(bs):
        return nan.copy() if not bs else np.concatenate([np.min(bs, 0)[:2], np.max(bs, 0)[2:]]).astype(np.float32)

    return LungRegions(cleaned, float(cleaned.mean()), union(boxes["right"] + boxes["left"]),
                       union(boxes["right"]), union(boxes["left"]))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``ndimage.binary_fill_holes`` by one labelling of the background (background not
    4-connected to the border is a hole): the same result, about 3x faster at 256 px."""
    background, n = ndimage.label(~mask)
    border = np.zeros(n + 1, bool)
    border[np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])] = True
    border[0] = False  # label 0 is the mask itself
    return ~border[background]


def decode_mask_png(data: bytes) -> np.ndarray:
    """A boolean mask from ``mask_png`` bytes."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("L")) > 127


def dice_scores(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-image Dice of boolean masks (B, H, W) (1.0 where both are empty): the one Dice of
    the project (training, evaluation, adaptation, benchmarks and tests)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    inter = (pred & truth).sum((1, 2))
    total = pred.sum((1, 2)) + truth.sum((1, 2))
    return np.where(total == 0, 1.0, 2 * inter / np.maximum(total, 1))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    return float(dice_scores(a[None], b[None])[0])


def mask_png(mask: np.ndarray, size: int) -> bytes:
    """A 0/255 PNG of the mask at ``size`` x ``size`` (nearest neighbour)."""
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
