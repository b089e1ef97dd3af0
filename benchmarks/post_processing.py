"""The CPU work around the models, before and after, in one run on the same inputs and one
thread: lung-mask clean-up (scipy's two labellings, the first way; OpenCV's labelling with stats
and one flood fill, the second; OpenCV's outer contours, `masks.lung_regions` now) on the shipped
U-Net's masks of ../shared/data/cxr (phantoms without it), and the lung crop (torchvision's
`roi_align`, as before, vs `preprocess.crop_boxes` now) on the same images and boxes; with how far
the outputs are apart (masks identical / Dice against scipy's, boxes, crop grey levels).
Usage: python benchmarks/post_processing.py [-n 512] [-o benchmarks/results/post_processing.parquet]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from scipy import ndimage

from cxrscreen.bench import machine_info, prepare_inputs
from cxrscreen.io.batch import decode_items
from cxrscreen.io.sources import list_inputs
from cxrscreen.masks import _labelled_regions, _outer_regions, dice_scores, lung_regions
from cxrscreen.predict import ModelRunner
from cxrscreen.preprocess import crop_boxes

ROOT = Path(__file__).resolve().parents[1]


def scipy_regions(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The clean-up as it was: scipy labels, the two largest components, holes filled by a
    second labelling of the background; the cleaned mask and its box."""
    h, w = mask.shape
    labels, n = ndimage.label(mask)
    if n == 0:
        return np.zeros_like(mask, bool), np.full(4, np.nan, np.float32)
    keep = np.argsort(np.bincount(labels.ravel())[1:])[-2:] + 1
    kept = np.isin(labels, keep)
    background, m = ndimage.label(~kept)
    border = np.zeros(m + 1, bool)
    border[np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])] = True
    border[0] = False
    slices = ndimage.find_objects(labels)
    ys = slice(min(slices[k - 1][0].start for k in keep), max(slices[k - 1][0].stop for k in keep))
    xs = slice(min(slices[k - 1][1].start for k in keep), max(slices[k - 1][1].stop for k in keep))
    return ~border[background], np.array([xs.start / w, ys.start / h, xs.stop / w, ys.stop / h], np.float32)


def labelled_regions(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The clean-up of stops 14-17, now ``lung_regions``' fallback (``masks._labelled_regions``:
    OpenCV labels with statistics, one flood fill) for every mask; mask and overall box."""
    h, w = mask.shape
    cleaned, rects = _labelled_regions(np.ascontiguousarray(mask, bool).view(np.uint8))
    if not len(rects):
        return cleaned.view(bool), np.full(4, np.nan, np.float32)
    r = np.array(rects)
    return cleaned.view(bool), np.array([r[:, 0].min() / w, r[:, 1].min() / h, (r[:, 0] + r[:, 2]).max() / w,
                                         (r[:, 1] + r[:, 3]).max() / h], np.float32)


def roi_align_crop(images: torch.Tensor, boxes: np.ndarray, size: int, margin: float = 0.05) -> torch.Tensor:
    """The lung crop as it was: one torchvision roi_align (aligned, adaptive sampling)."""
    from torchvision.ops import roi_align

    b = torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4))
    b = torch.where(torch.isnan(b).any(1, keepdim=True), torch.tensor([0.0, 0.0, 1.0, 1.0]), b)
    b = torch.cat([(b[:, :2] - margin).clamp(0, 1), (b[:, 2:] + margin).clamp(0, 1)], 1)
    h, w = images.shape[-2:]
    rois = torch.cat([torch.arange(len(b), dtype=torch.float32)[:, None], b * torch.tensor([w, h, w, h])], 1)
    out = roi_align(images[:, None].float(), rois, (size, size), sampling_ratio=-1, aligned=True)
    return out[:, 0].round().clamp(0, 255).to(torch.uint8)


def per_image_ms(fn, n: int, reps: int = 3) -> float:
    best = np.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / n * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=512)
    p.add_argument("--source", default="cxr")
    p.add_argument("-o", "--out", default=str(ROOT / "benchmarks" / "results" / "post_processing.parquet"))
    a = p.parse_args()
    torch.set_num_threads(1)
    folder = prepare_inputs(a.source, a.n, Path(tempfile.mkdtemp(prefix="cxrbench-post-")), ROOT.parent / "shared" / "data")
    items = list(list_inputs(folder))
    seg = ModelRunner("unet-lungs-fast", "segment", "cpu", "fp32", 2, "torch", False)
    images, masks = [], []
    for i in range(0, len(items), 32):
        b = decode_items(items[i:i + 32], 256)
        ok = b["image"][b["status"] == "ok"]
        images.append(ok)
        masks.append((seg.segment_probs(ok) > 0.5).numpy())
    images, masks = np.concatenate(images), np.concatenate(masks)
    n, info, rows = len(masks), machine_info(), []
    before = [scipy_regions(m) for m in masks]
    labelled = [labelled_regions(m) for m in masks]
    now = [lung_regions(m) for m in masks]
    now_out = [(r.mask, r.box) for r in now]
    ref_masks, ref_boxes = np.stack([b[0] for b in before]), np.stack([b[1] for b in before])
    for way, fn, out in (
            ("mask clean-up: scipy, two labellings (first)", lambda: [scipy_regions(m) for m in masks], before),
            ("mask clean-up: OpenCV, labels with stats + flood fill (stops 14-17)",
             lambda: [labelled_regions(m) for m in masks], labelled),
            ("mask clean-up: OpenCV, outer contours, labels where they could differ (now)", lambda: [lung_regions(m) for m in masks],
             now_out)):
        got, got_boxes = np.stack([o[0] for o in out]), np.stack([o[1] for o in out])
        dice = dice_scores(ref_masks, got)
        box_px = np.nanmax(np.abs(got_boxes - ref_boxes), 1) * masks.shape[-1]
        rows.append(dict(way=way, n=n, ms_per_image=per_image_ms(fn, n), identical=int((dice == 1).sum()),
                         on_contours=sum(_outer_regions(m.view(np.uint8)) is not None for m in masks) if out is now_out else None,
                         min_dice=float(dice.min()), mean_dice=float(dice.mean()),
                         max_box_px=float(np.nanmax(box_px)), share_boxes_same=float(np.mean(box_px == 0)), **info))
    boxes = np.stack([r.box for r in now])
    # what the clean-up's boxes change downstream: the shipped lung-crop classifier's probabilities
    cls = ModelRunner("cxrnet-4class", "classify", "cpu", "fp32", 2, "torch", False)

    def probs(bxs):
        return np.concatenate([torch.softmax(torch.from_numpy(cls.classify(images[i:i + 32], bxs[i:i + 32]).logits), 1)
                               .numpy() for i in range(0, n, 32)])

    dp = np.abs(probs(boxes) - probs(np.stack([b[1] for b in labelled]))).max(1)
    rows.append(dict(way="classifier probabilities: boxes now vs stops 14-17", n=n, max_dp=float(dp.max()),
                     share_dp_over_1e4=float((dp > 1e-4).mean()), **info))
    x = torch.from_numpy(images)
    old = torch.cat([roi_align_crop(x[i:i + 16], boxes[i:i + 16], 224) for i in range(0, n, 16)])
    new = torch.cat([crop_boxes(x[i:i + 16], boxes[i:i + 16], 224) for i in range(0, n, 16)])
    diff = (old.int() - new.int()).abs()
    for way, crop in (("lung crop 256 -> 224 px: roi_align (before)", roi_align_crop),
                      ("lung crop 256 -> 224 px: grouped grid_sample (crop_boxes, now)", crop_boxes)):
        fn = (lambda c=crop: [c(x[i:i + 16], boxes[i:i + 16], 224) for i in range(0, n, 16)])
        rows.append(dict(way=way, n=n, ms_per_image=per_image_ms(fn, n), max_grey_diff=int(diff.max()),
                         share_pixels_differing=float((diff > 0).float().mean()), **info))
    for r in rows:
        print(f"{r['way']}" + (f": {r['ms_per_image']:.3f} ms per image" if "ms_per_image" in r else ""), flush=True)
        if "max_dp" in r:
            print(f"  max |dp| {r['max_dp']:.2e}; over 1e-4 on {r['share_dp_over_1e4']:.2%} of images")
        if "identical" in r:
            print(f"  against scipy's: identical {r['identical']}/{n}, min Dice {r['min_dice']:.5f}, mean "
                  f"{r['mean_dice']:.6f}; boxes the same {r['share_boxes_same']:.2%}, at most {r['max_box_px']:.0f} px apart"
                  + (f"; {r['on_contours']} on the contours" if r["on_contours"] is not None else ""))
    print(f"crops differ by at most {int(diff.max())} grey level in {float((diff > 0).float().mean()):.2%} of pixels")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows, infer_schema_length=None).write_parquet(a.out)


if __name__ == "__main__":
    main()
