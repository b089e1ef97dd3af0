"""Lung-mask post-processing and measurements (two largest components, holes filled).

``lung_regions`` cleans one mask with OpenCV (fastest on a CPU: about 2x scipy's labelling,
benchmarks/README.md); ``lung_regions_batch`` cleans a batch where it lies: on a GPU as tensor
ops in one pass over the batch (no per-image Python), or with ``lung_regions`` per image in a
pool of threads. ``mask_pngs`` encodes a batch of masks as 1-bit PNGs.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


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
    measure area fraction, the overall box and one box per lung, with one OpenCV labelling pass
    (components, areas and boxes together) and one flood fill. Each component goes to the side
    its box centre lies on."""
    h, w = mask.shape
    n, labels, stats, _ = cv2.connectedComponentsWithStats(np.ascontiguousarray(mask, bool).view(np.uint8),
                                                           connectivity=4, ltype=cv2.CV_32S)
    nan = np.full(4, np.nan, np.float32)
    if n <= 1:
        return LungRegions(np.zeros((h, w), bool), 0.0, nan, nan.copy(), nan.copy())
    keep = np.argsort(stats[1:, cv2.CC_STAT_AREA], kind="stable")[-2:] + 1
    kept = cv2.compare(labels, int(keep[0]), cv2.CMP_EQ)  # OpenCV: no GIL held (threads: lung_regions_batch)
    for k in keep[1:]:
        kept |= cv2.compare(labels, int(k), cv2.CMP_EQ)
    cleaned = fill_holes(kept)  # holes lie inside a component: boxes unchanged
    boxes = {"right": [], "left": []}
    for k in keep:
        x, y, bw, bh = stats[k, :4]
        box = np.array([x / w, y / h, (x + bw) / w, (y + bh) / h], np.float32)
        boxes["right" if (box[0] + box[2]) / 2 < 0.5 else "left"].append(box)

    def union(bs):
        return nan.copy() if not bs else np.concatenate([np.min(bs, 0)[:2], np.max(bs, 0)[2:]]).astype(np.float32)

    return LungRegions(cleaned, np.count_nonzero(cleaned) / cleaned.size, union(boxes["right"] + boxes["left"]),
                       union(boxes["right"]), union(boxes["left"]))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``ndimage.binary_fill_holes``: background not 4-connected to the border is a hole. One
    OpenCV flood fill of the background from a one-pixel frame around the mask."""
    h, w = mask.shape
    framed = np.zeros((h + 2, w + 2), np.uint8)
    framed[1:-1, 1:-1] = mask != 0
    cv2.floodFill(framed, None, (0, 0), 2, flags=4)
    return framed[1:-1, 1:-1] != 2


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
    """A 1-bit PNG of one boolean mask at ``size`` x ``size`` (nearest neighbour)."""
    return mask_pngs(resize_masks(mask[None], size))[0]


def resize_masks(masks, size: int):
    """Boolean masks (B, H, W), numpy or torch, resized to ``size`` x ``size`` (nearest)."""
    if masks.shape[-1] == size and masks.shape[-2] == size:
        return masks
    t = torch.as_tensor(masks)
    out = F.interpolate(t[:, None].float(), size=(size, size), mode="nearest")[:, 0] > 0.5
    return out if isinstance(masks, torch.Tensor) else out.numpy()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def mask_pngs(masks: np.ndarray, level: int = 1, workers: int = 1) -> list[bytes]:
    """1-bit greyscale PNGs of boolean masks (B, H, W): rows bit-packed for the whole batch at
    once, then one zlib call per image, in ``workers`` threads (about 20x cheaper than PIL's
    8-bit PNG; any viewer shows them, ``decode_mask_png`` reads them)."""
    masks = np.asarray(masks, bool)
    b, h, w = masks.shape
    rows = np.packbits(masks, axis=2)  # (B, H, ceil(W / 8)), most significant bit first
    raw = np.concatenate([np.zeros((b, h, 1), np.uint8), rows], axis=2)  # filter byte 0 per row
    head = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
    end = _png_chunk(b"IEND", b"")
    return map_threads(lambda r: head + _png_chunk(b"IDAT", zlib.compress(r.tobytes(), level)) + end, list(raw), workers)


@dataclass
class BatchRegions:
    """``lung_regions`` of a batch: cleaned masks (B, H, W) on the input's device, and numpy
    fractions (B,) and boxes (B, 4) (overall, the patient's right lung, left lung)."""

    masks: torch.Tensor
    fraction: np.ndarray
    box: np.ndarray
    right: np.ndarray
    left: np.ndarray


def map_threads(fn, xs, workers: int = 1) -> list:
    """``[fn(x) for x in xs]``, in ``workers`` threads of a pool kept per size (for work that
    releases the GIL: OpenCV, zlib). Our threads are then the parallelism: OpenCV's own per-call
    threads are turned off for the process (beside ours they cost more than they give on a 256 px
    mask: 4 threads 1,918 vs 2,363 masks/s on a 16-core H200 node, benchmarks/README.md)."""
    if workers <= 1 or len(xs) < 2:
        return [fn(x) for x in xs]
    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)
    pool = _POOLS.get(workers) or _POOLS.setdefault(workers, ThreadPoolExecutor(workers, "cxrscreen-masks"))
    return list(pool.map(fn, xs))


_POOLS: dict[int, ThreadPoolExecutor] = {}
os.register_at_fork(after_in_child=_POOLS.clear)  # a forked child has none of the parent's threads


def lung_regions_batch(masks: torch.Tensor, workers: int = 1) -> BatchRegions:
    """``lung_regions`` of every boolean mask of a batch (B, H, W): OpenCV per image on the host
    in ``workers`` threads, or, for masks on a GPU with ``workers`` 1, tensor ops on the device
    (on a 16-core H200 node, clean-up + PNG: tensor ops 1,546 masks/s, OpenCV with 1 / 2 / 4
    threads 1,386 / 1,877 / 2,363; benchmarks/README.md). Both agree exactly (tests/test_masks.py,
    tests/test_gpu.py)."""
    if masks.device.type == "cpu" or workers > 1:
        regions = map_threads(lung_regions, list(masks.cpu().numpy()), workers)
        stack = (lambda xs, shape: np.stack(xs) if xs else np.zeros(shape, np.float32))  # noqa: E731
        return BatchRegions(torch.from_numpy(stack([r.mask for r in regions], (0, *masks.shape[1:])).astype(bool)),
                            np.array([r.fraction for r in regions], np.float32),
                            stack([r.box for r in regions], (0, 4)), stack([r.right for r in regions], (0, 4)),
                            stack([r.left for r in regions], (0, 4)))
    return _lung_regions_tensor(masks)


def _spread_runs(lab: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Every run of consecutive mask pixels along ``dim`` (1: columns, 2: rows) of a batch
    (B, H, W) takes its largest label (one scatter-max into a slot per run: its first pixel)."""
    b, h, w = mask.shape
    prev = torch.zeros_like(mask)
    if dim == 2:
        prev[:, :, 1:] = mask[:, :, :-1]
    else:
        prev[:, 1:] = mask[:, :-1]
    pos = torch.arange(mask.shape[dim], device=mask.device).view((1, -1, 1) if dim == 1 else (1, 1, -1))
    start = torch.where(mask & ~prev, pos, -1).cummax(dim).values  # where this pixel's run began
    ys = start if dim == 1 else torch.arange(h, device=mask.device).view(1, -1, 1)
    xs = start if dim == 2 else torch.arange(w, device=mask.device).view(1, 1, -1)
    slot = torch.where(mask, torch.arange(b, device=mask.device).view(-1, 1, 1) * (h * w) + ys * w + xs, b * h * w)
    best = torch.zeros(b * h * w + 1, dtype=lab.dtype, device=lab.device).scatter_reduce(
        0, slot.reshape(-1), lab.reshape(-1), "amax")
    return torch.where(mask, best[slot], 0)


def components(mask: torch.Tensor) -> torch.Tensor:
    """4-connected component labels of a boolean batch (B, H, W) as tensor ops (``ndimage.label``
    on a GPU): background 0, each component the id of one of its pixels (unique over the batch,
    int64). Each round, every horizontal then every vertical run of pixels takes its largest
    label, and labels jump to the label their own pixel holds (pointer jumping); a component
    settles in about as many rounds as a path through it has turns."""
    b, h, w = mask.shape
    lab = torch.where(mask, torch.arange(1, b * h * w + 1, device=mask.device).view(b, h, w), 0)
    for _ in range(h * w):
        new = _spread_runs(_spread_runs(lab, mask, 2), mask, 1)
        new = torch.maximum(new, torch.where(new > 0, new.view(-1)[(new - 1).clamp(min=0)], 0))
        if torch.equal(new, lab):
            return new
        lab = new
    return lab


def _lung_regions_tensor(mask: torch.Tensor) -> BatchRegions:
    b, h, w = mask.shape
    n = b * h * w
    lab = components(mask)
    sizes = torch.bincount(lab.reshape(-1), minlength=n + 1)[1:].view(b, h * w)  # by id - 1
    top_size, top = sizes.topk(min(2, h * w), dim=1)  # the two largest components of each image
    keep = torch.where(top_size > 0, top + 1 + torch.arange(b, device=mask.device)[:, None] * (h * w), 0)
    slot_of = torch.full((n + 1,), -1, dtype=torch.int64, device=mask.device)
    slot_of[keep.reshape(-1)] = torch.arange(keep.numel(), device=mask.device)  # image * 2 + rank
    slot_of[0] = -1
    kept = slot_of[lab] >= 0
    background = components(~kept)
    touches = torch.zeros(n + 1, dtype=torch.bool, device=mask.device)
    touches[torch.cat([background[:, 0], background[:, -1], background[:, :, 0], background[:, :, -1]], 1)] = True
    cleaned = kept | ((background > 0) & ~touches[background])
    bi, y, x = kept.nonzero(as_tuple=True)
    s = slot_of[lab[bi, y, x]]
    lo = torch.full((b * 2, 2), max(h, w), device=mask.device, dtype=torch.int64)
    hi = torch.full((b * 2, 2), -1, device=mask.device, dtype=torch.int64)
    xy = torch.stack([x, y], 1)
    lo = lo.scatter_reduce(0, s[:, None].expand(-1, 2), xy, "amin")
    hi = hi.scatter_reduce(0, s[:, None].expand(-1, 2), xy, "amax")
    scale = np.array([w, h, w, h], np.float32)
    boxes = (torch.cat([lo, hi + 1], 1).cpu().numpy() / scale).reshape(b, 2, 4).astype(np.float32)
    present = (hi[:, 0] >= 0).cpu().numpy().reshape(b, 2)
    right = present & ((boxes[:, :, 0] + boxes[:, :, 2]) / 2 < 0.5)

    def union(sel: np.ndarray) -> np.ndarray:
        lo_ = np.where(sel[..., None], boxes[:, :, :2], np.inf).min(1)
        hi_ = np.where(sel[..., None], boxes[:, :, 2:], -np.inf).max(1)
        return np.where(sel.any(1)[:, None], np.concatenate([lo_, hi_], 1), np.nan).astype(np.float32)

    fraction = cleaned.float().mean((1, 2)).cpu().numpy()
    return BatchRegions(cleaned, fraction, union(present), union(right), union(present & ~right))


def mask_outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The ``width`` px border of a boolean mask (the mask minus its erosion), for drawing."""
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    return mask & ~ndimage.binary_erosion(mask, iterations=max(1, width))
