"""Pipeline stages as plain Python: two model classes over batches from ``cxrscreen.io.batch``.

Ray Data runs ``decode_batch`` as tasks and ``Segmenter`` / ``Classifier`` as actor pools;
``score_items_local``, ``cxrscreen.Screener`` and the benchmarks call the very same code
without Ray. Each stage loads its model once in ``__init__`` (a ``cxrscreen.predict.ModelRunner``)
and maps a batch (a dict of equally long numpy arrays, Ray's "numpy" format) in ``__call__``;
a failing batch becomes error rows, never an exception.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from cxrscreen import __version__
from cxrscreen.io.batch import col, polarity, restore_nulls
from cxrscreen.masks import decode_mask_png, lung_regions_batch, mask_pngs, resize_masks
from cxrscreen.models.ood import appearance_features
from cxrscreen.models.site import SiteProfile
from cxrscreen.pipeline.config import ClassifierOptions, RuntimeOptions, SegmenterOptions
from cxrscreen.pipeline.output import REFER_CODES
from cxrscreen.predict import ModelRunner
from cxrscreen.referral import screening_confidence
from cxrscreen.preprocess import crop_boxes


def select_rows(images, ok: np.ndarray):
    """The ``ok`` rows of the work images: a numpy array, or a tensor already on the device."""
    if isinstance(images, torch.Tensor):
        return images[torch.from_numpy(np.asarray(ok, bool)).to(images.device)]
    return images[ok]


class _ModelStage:
    """Shared set-up of the model actors: load once, pick device, precision and threads."""

    task = ""

    def __init__(self, spec: str, runtime: RuntimeOptions, allow_untrained: bool = False):
        self.runner = ModelRunner(spec, self.task, runtime.device, runtime.precision, runtime.threads, runtime.runtime,
                                  allow_untrained, runtime.int8_calibration, cuda_graphs=runtime.cuda_graphs,
                                  compile=runtime.compile)
        self.loaded, self.info = self.runner.loaded, self.runner.info

    def _prepare(self, batch: dict) -> None:
        """What every model stage does first: text columns Ray turned into NaN back to nulls
        (``restore_nulls``), then JPEGs left for the device decoded (``_decode_jpegs``)."""
        restore_nulls(batch)
        self._decode_jpegs(batch)

    def _decode_jpegs(self, batch: dict) -> None:
        """Decode the ``jpeg_bytes`` rows (``decode_batch(defer_jpeg=True)``) in one
        ``torchvision.io.decode_jpeg`` call on the runtime's device, resize them there to the
        batch's work size and put them into ``image``; rows that fail become error rows.
        torchvision is imported only then (about a second of CPU per process otherwise)."""
        data = batch.pop("jpeg_bytes", None)
        if data is None:
            return
        rows = [i for i, d in enumerate(data) if d is not None and batch["status"][i] == "ok"]
        if not rows:
            return
        from torchvision.io import ImageReadMode, decode_jpeg

        device = self.runner.device
        encoded = [torch.frombuffer(bytearray(data[i]), dtype=torch.uint8) for i in rows]
        try:
            decoded = decode_jpeg(encoded, mode=ImageReadMode.GRAY, device=device)
        except RuntimeError:  # one bad file fails the batched call: decode one by one
            decoded = []
            for i, enc in zip(rows, encoded):
                try:
                    decoded.append(decode_jpeg(enc, mode=ImageReadMode.GRAY, device=device))
                except RuntimeError as e:
                    decoded.append(None)
                    batch["status"][i], batch["error_type"][i] = "error", "decode_failed"
                    batch["error_message"][i] = f"jpeg: {e}"
        size = batch["image"].shape[-1]
        done = [(i, img) for i, img in zip(rows, decoded) if img is not None]
        if done:  # resized one by one on the device (sizes differ), copied to the host at once
            resized = torch.cat([torch.nn.functional.interpolate(img[None].float(), size=(size, size), mode="bilinear",
                                                                 antialias=True, align_corners=False)[:, 0]
                                 for _, img in done]).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
            for (i, _), image in zip(done, resized):
                batch["image"][i] = image
                if "polarity" in batch:
                    batch["polarity"][i] = polarity(image)

    @staticmethod
    def _fail(batch: dict, ok: np.ndarray, exc: Exception) -> None:
        """Turn the ok rows of a batch whose forward pass failed into error rows."""
        batch["status"] = np.where(ok, "error", batch["status"]).astype(object)
        batch["error_type"] = np.where(ok, "inference_failed", batch["error_type"]).astype(object)
        msg = f"{type(exc).__name__}: {exc}"
        batch["error_message"] = np.where(ok, msg, batch["error_message"]).astype(object)


class Segmenter(_ModelStage):
    """U-Net lung segmentation: adds ``lung_mask_png``, ``lung_fraction``, ``lung_bbox`` and the
    patient's ``lung_bbox_right`` / ``lung_bbox_left``."""

    task = "segment"

    def __init__(self, options: SegmenterOptions = SegmenterOptions(), runtime: RuntimeOptions = RuntimeOptions()):
        super().__init__(options.spec, runtime, options.allow_untrained)
        self.mask_size, self.threshold = options.mask_size, options.threshold
        # on a GPU the masks are the actor's bottleneck: cleaned in its threads; on CPUs the forward
        # is, and the cores are shared with decoding: one thread (measured: benchmarks/README.md)
        self.workers = (runtime.threads or 1) if str(self.runner.device).startswith("cuda") else 1

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        self._prepare(batch)
        n = len(batch["key"])
        ok = batch["status"] == "ok"
        masks = np.full(n, None, object)
        frac = np.full(n, np.nan, np.float32)
        boxes = np.full((n, 4), np.nan, np.float32)
        right, left = boxes.copy(), boxes.copy()
        try:
            if ok.any():
                probs = self.runner.segment_probs(select_rows(batch["image"], ok))
                regions = lung_regions_batch(probs > self.threshold, self.workers)
                pngs = mask_pngs(resize_masks(regions.masks, self.mask_size).cpu().numpy(), workers=self.workers)
                rows = np.nonzero(ok)[0]
                for i, png in zip(rows, pngs):
                    masks[i] = png
                frac[rows], boxes[rows], right[rows], left[rows] = (regions.fraction, regions.box, regions.right,
                                                                    regions.left)
        except Exception as e:  # noqa: BLE001 - one bad batch must not abort the archive
            self._fail(batch, ok, e)
        batch.update(lung_mask_png=masks, lung_fraction=frac, lung_bbox=boxes, lung_bbox_right=right, lung_bbox_left=left,
                     segmenter=col([self.loaded.weights_name] * n), segmenter_sha256=col([self.loaded.weights_sha256] * n),
                     t_segment_ms=np.full(n, (time.perf_counter() - t0) * 1000 / max(n, 1), np.float32))
        return batch


class Classifier(_ModelStage):
    """Classification with temperature-scaled softmax, label, confidence, ``ood_score`` and the
    ``refer`` flag with its ``refer_reason`` codes (``pipeline.output.REFER_CODES``); with
    ``cam`` ("gradcam" / "gradcampp") also a heatmap of the predicted class (``cam_png``,
    ``cam_size`` px) and the fraction of its energy inside the lung mask (``cam_lung_energy``).

    Thresholds: an explicit ``refer_below`` / ``ood_threshold`` wins; else the site profile's
    (``site``, from ``cxrscreen calibrate``); else the checkpoint's (fitted on its validation
    split by ``cxrscreen evaluate``); else ``DEFAULT_REFER_BELOW`` (and no OOD referral).
    The ``image`` column is dropped from the output: it is not needed downstream.
    """

    task = "classify"
    DEFAULT_REFER_BELOW = 0.6

    def __init__(self, options: ClassifierOptions = ClassifierOptions(), runtime: RuntimeOptions = RuntimeOptions()):
        super().__init__(options.spec, runtime, options.allow_untrained)
        self.cam, self.cam_size = None, options.cam_size
        if options.cam:
            from cxrscreen.cam import GradCAM

            self.loaded.module.to(self.runner.device)  # the runtime holds its own copy; CAM runs beside it
            self.cam = GradCAM(self.loaded.module, self.info.in_channels, self.info.input_size, options.cam)
        self.site = SiteProfile.load(options.site, self.loaded) if options.site else None
        self.lung_crop = options.lung_crop or bool(self.info.lung_crop)  # a crop-trained model is always fed crops
        self.lung_fraction_range, self.min_polarity = options.lung_fraction_range, options.min_polarity
        site = self.site or SiteProfile.from_checkpoint(self.loaded)
        self.temperature = site.temperature
        self.refer_below = next(v for v in (options.refer_below, site.refer_threshold, self.DEFAULT_REFER_BELOW)
                                if v is not None)
        self.ood_threshold = options.ood_threshold if options.ood_threshold is not None else site.ood_threshold
        self.ood = site.reference if site.reference is not None else self.loaded.ood
        self.classes = list(self.info.classes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        self._prepare(batch)
        n = len(batch["key"])
        ok = batch["status"] == "ok"
        probs = np.full((n, len(self.classes)), np.nan, np.float32)
        ood = np.full(n, np.nan, np.float32)
        images = batch.pop("image", None)  # absent from a batch whose rows were all skipped
        try:
            if ok.any():
                kept = select_rows(images, ok)  # selected once: the model input, the boxes and the appearance
                x = self.runner.model_input(kept, self._boxes(batch, kept, ok), self.lung_crop)
                out = self.runner.classify_input(x, appearance_features(kept), self.ood)
                probs[ok] = torch.softmax(torch.from_numpy(out.logits) / self.temperature, dim=1).numpy()
                if out.ood_score is not None:
                    ood[ok] = out.ood_score
                if self.cam is not None:
                    self._add_cams(batch, x, ok)
        except Exception as e:  # noqa: BLE001
            self._fail(batch, ok, e)
        ok = batch["status"] == "ok"
        for c, name in enumerate(self.classes):
            batch[f"prob_{name}"] = probs[:, c]
        top = np.nan_to_num(probs, nan=-1.0).argmax(1)
        batch["label"] = col([self.classes[t] if k else None for t, k in zip(top, ok)])
        batch["max_prob"] = np.where(ok, np.nan_to_num(probs, nan=0).max(1), np.nan).astype(np.float32)
        batch["screening_confidence"] = np.where(ok, screening_confidence(np.nan_to_num(probs, nan=0), self.classes),
                                                 np.nan).astype(np.float32)
        batch["ood_score"] = np.where(ok, ood, np.nan).astype(np.float32)
        batch["refer"], batch["refer_reason"] = self._refer(batch, ok)
        batch.update(classifier=col([self.loaded.weights_name] * n),
                     classifier_sha256=col([self.loaded.weights_sha256] * n),
                     site_profile=col([self.site.name if self.site else None] * n),
                     cxrscreen_version=col([__version__] * n),
                     t_classify_ms=np.full(n, (time.perf_counter() - t0) * 1000 / max(n, 1), np.float32))
        return batch

    def _boxes(self, batch: dict, kept, ok: np.ndarray) -> np.ndarray | None:
        """Lung boxes of the ok rows (``kept``: their work images): a crop-trained model's come
        from the segmenter it was trained with (the pipeline's when that is the one, else its own copy of it), so its
        input is the same whichever segmenter draws the masks; others use the pipeline's."""
        from pathlib import Path

        trained_with = self.info.lung_crop
        pipeline = batch["segmenter"][0] if "segmenter" in batch and len(batch["segmenter"]) else None
        if trained_with and pipeline != Path(trained_with).name:
            return self.runner.lung_boxes(kept)
        return batch["lung_bbox"][ok] if "lung_bbox" in batch else None

    def _add_cams(self, batch: dict, x: torch.Tensor, ok: np.ndarray) -> None:
        """Grad-CAM of the predicted class (fp32, on the module's device) for the ok rows,
        from their model input ``x``."""
        from cxrscreen.cam import energy_inside, heatmap_png

        n = len(ok)
        pngs, energy = np.full(n, None, object), np.full(n, np.nan, np.float32)
        heat, _, _ = self.cam(x.to(next(self.loaded.module.parameters()).device))
        small = torch.nn.functional.interpolate(torch.from_numpy(heat)[:, None], size=(self.cam_size,) * 2,
                                                mode="bilinear", align_corners=False)[:, 0].numpy()
        stored_masks = batch.get("lung_mask_png", np.full(n, None, object))
        for j, i in enumerate(np.nonzero(ok)[0]):
            pngs[i] = heatmap_png(small[j])
            mask_bytes = stored_masks[i]
            if mask_bytes is not None:
                mask = torch.from_numpy(decode_mask_png(mask_bytes).astype(np.uint8) * 255)
                if self.lung_crop:  # the heatmap is in the coordinates of the crop
                    mask = crop_boxes(mask[None], batch["lung_bbox"][i:i + 1], mask.shape[-1])[0]
                energy[i] = energy_inside(heat[j], mask.numpy() > 127)
        batch.update(cam_png=pngs, cam_lung_energy=energy, cam_method=col([self.cam.method] * n))

    def _refer(self, batch, ok) -> tuple[np.ndarray, np.ndarray]:
        """``refer`` and the list of reason codes of every row (error rows: ``unreadable``)."""
        lo, hi = self.lung_fraction_range
        n = len(ok)
        frac = np.asarray(batch.get("lung_fraction", np.full(n, np.nan)), np.float64)
        polarity = np.asarray(batch.get("polarity", np.full(n, np.nan)), np.float64)
        tests = {
            "low_confidence": batch["screening_confidence"] < self.refer_below,
            "out_of_distribution": (batch["ood_score"] > self.ood_threshold) if self.ood_threshold is not None
            else np.zeros(n, bool),
            "atypical_lungs": ~np.isnan(frac) & ((frac < lo) | (frac > hi)),
            "atypical_intensity": ~np.isnan(polarity) & (polarity < self.min_polarity),
        }
        reasons = np.empty(n, object)
        for i in range(n):
            reasons[i] = [c for c in REFER_CODES if c in tests and tests[c][i]] if ok[i] else ["unreadable"]
        return np.array([bool(r) for r in reasons], dtype=bool), reasons



class SegmentClassify:
    """``Segmenter`` then ``Classifier`` in one actor (the fused model stage): one process and one
    model load fewer, no batch handed between actors, and on a GPU the work images are copied to
    the device once and stay there for both models. Same columns as the two stages in a row."""

    def __init__(self, segmenter: SegmenterOptions = SegmenterOptions(),
                 classifier: ClassifierOptions = ClassifierOptions(), runtime: RuntimeOptions = RuntimeOptions()):
        self.segmenter = Segmenter(segmenter, runtime)
        self.classifier = Classifier(classifier, runtime)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.segmenter._prepare(batch)  # JPEGs left for the device decoded before the images move
        if isinstance(batch.get("image"), np.ndarray):  # on a CPU a view, on a GPU one copy for both models
            try:
                batch["image"] = self.segmenter.runner.to_device(batch["image"])
            except Exception:  # noqa: BLE001 - left on the host: each stage copies, or fails into error rows
                pass
        return self.classifier(self.segmenter(batch))
