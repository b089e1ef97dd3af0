"""Pipeline stages as plain Python: a decode function and two model classes.

Ray Data runs ``decode_batch`` as tasks and ``Segmenter`` / ``Classifier`` as actor pools;
``score_items_local`` and the benchmarks call the very same code without Ray. A batch is a
dict of equally long numpy arrays (Ray's "numpy" batch format).
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import torch

from cxrscreen import __version__
from cxrscreen.io.decode import Decoded, DecodeOptions, decode_image, deferrable_jpeg, read_bytes
from cxrscreen.io.errors import ImageError
from cxrscreen.masks import decode_mask_png, lung_regions, mask_png
from cxrscreen.preprocess import crop_boxes, resize_uint8, to_model_input

# decoded metadata key -> output column (no patient identifiers unless include_phi)
DICOM_COLUMNS = {
    "dicom_Modality": "dicom_modality", "dicom_ViewPosition": "dicom_view_position",
    "dicom_BodyPartExamined": "dicom_body_part", "dicom_StudyInstanceUID": "dicom_study_uid",
    "dicom_SeriesInstanceUID": "dicom_series_uid", "dicom_SOPInstanceUID": "dicom_sop_uid",
    "dicom_PhotometricInterpretation": "dicom_photometric", "dicom_Manufacturer": "dicom_manufacturer",
}
PHI_COLUMNS = {"dicom_PatientName": "patient_name", "dicom_PatientID": "patient_id",
               "dicom_PatientBirthDate": "patient_birth_date"}


def _col(values, dtype=object) -> np.ndarray:
    arr = np.empty(len(values), dtype=dtype)
    arr[:] = values
    return arr


def decode_batch(batch: dict[str, np.ndarray], work_size: int = 256, max_pixels: int = 80_000_000,
                 prefer_lut: bool = True, include_phi: bool = False,
                 done: dict[str, str] | None = None, defer_jpeg: bool = False) -> dict[str, np.ndarray]:
    """Read + hash + decode + resize each row; failures become error rows, never exceptions.

    Input columns: ``key``, and ``path`` or ``data`` (bytes); optional ``expected_sha`` (or
    the ``done`` map): a row whose content hash equals it was scored before and is dropped.
    With ``defer_jpeg``, plain JPEGs are not decoded here but passed on as ``jpeg_bytes`` for
    the first model actor to decode in one batch on its device (nvJPEG on a GPU).
    """
    opts = DecodeOptions(max_pixels=max_pixels, prefer_lut=prefer_lut, include_phi=include_phi)
    meta_cols = dict(DICOM_COLUMNS, **(PHI_COLUMNS if include_phi else {}))
    n = len(batch["key"])
    paths = batch.get("path", np.full(n, None, object))
    datas = batch.get("data", np.full(n, None, object))
    expected = batch.get("expected_sha", np.full(n, None, object))
    rows: dict[str, list] = {c: [] for c in (
        "key", "source_path", "sha256", "status", "error_type", "error_message", "format",
        "width", "height", "pixel_spacing_mm", "t_decode_ms", *meta_cols.values())}
    images, jpeg = [], []
    for i in range(n):
        t0 = time.perf_counter()
        key, path = str(batch["key"][i]), paths[i]
        data, sha, err, dec = datas[i], "", None, None
        try:
            if data is None:
                data = read_bytes(path)
            data = bytes(data)
            if not data:
                raise ImageError("empty", "zero bytes")
            sha = hashlib.sha256(data).hexdigest()
        except ImageError as e:
            err = e
        prior = expected[i] if expected[i] is not None else (done or {}).get(key)
        if prior is not None and prior == sha:
            continue  # scored in an earlier run with identical content
        size = deferrable_jpeg(data, opts) if err is None and defer_jpeg else None
        if size is not None:
            dec = Decoded(None, "jpeg", {"width": size[0], "height": size[1]})
        elif err is None:
            try:
                dec = decode_image(data, opts, name=str(path or key))
            except ImageError as e:
                err = e
            except Exception as e:  # noqa: BLE001 - a decoder bug must not kill the run
                err = ImageError("decode_failed", f"{type(e).__name__}: {e}")
        rows["key"].append(key)
        rows["source_path"].append(None if path is None else str(path))
        rows["sha256"].append(sha)
        rows["status"].append("ok" if err is None else "error")
        rows["error_type"].append(None if err is None else err.kind)
        rows["error_message"].append(None if err is None else err.reason)
        meta = dec.meta if dec is not None else {}
        rows["format"].append(dec.format if dec is not None else None)
        rows["width"].append(meta.get("width", -1))
        rows["height"].append(meta.get("height", -1))
        rows["pixel_spacing_mm"].append(meta.get("pixel_spacing_mm", np.nan))
        for src, dst in meta_cols.items():
            rows[dst].append(meta.get(src))
        jpeg.append(data if size is not None else None)
        images.append(resize_uint8(dec.pixels, work_size) if dec is not None and dec.pixels is not None
                      else np.zeros((work_size, work_size), np.uint8))
        rows["t_decode_ms"].append((time.perf_counter() - t0) * 1000)
    out = {k: _col(v) for k, v in rows.items()}
    for k, dt in (("width", np.int64), ("height", np.int64), ("pixel_spacing_mm", np.float64),
                  ("t_decode_ms", np.float32)):
        out[k] = np.asarray(rows[k], dtype=dt)
    out["image"] = np.stack(images) if images else np.zeros((0, work_size, work_size), np.uint8)
    if defer_jpeg:
        out["jpeg_bytes"] = _col(jpeg)
    return out


def image_batch(images: np.ndarray) -> dict[str, np.ndarray]:
    """A model-stage batch of already decoded uint8 images (B, H, W), every row ok."""
    n = len(images)
    return {"key": np.arange(n).astype(object), "status": np.full(n, "ok", object),
            "error_type": np.full(n, None, object), "error_message": np.full(n, None, object), "image": images}


def decode_items(items, work_size: int = 256, **options) -> dict[str, np.ndarray]:
    """``decode_batch`` over a sequence of ``InputItem`` (path or bytes): a model-stage batch."""
    return decode_batch({"key": _col([it.key for it in items]), "path": _col([it.path for it in items]),
                         "data": _col([it.data for it in items])}, work_size, **options)


class _ModelStage:
    """Shared set-up of the model actors: load once, pick device, precision and threads."""

    task = ""

    def __init__(self, spec: str, device: str = "auto", precision: str = "auto",
                 threads: int | None = None, runtime: str = "auto", **runtime_options):
        from cxrscreen.models import load_model
        from cxrscreen.runtime import make_runtime

        self.loaded = load_model(spec, self.task)
        self.info = self.loaded.info
        if runtime_options.get("int8_calibration"):
            runtime_options["calibration"] = self._calibration_batches(runtime_options.pop("int8_calibration"))
        self.runtime = make_runtime(self.loaded.module, device, precision, threads, runtime,
                                    self.info.in_channels, self.info.input_size, **runtime_options)

    def _calibration_batches(self, archive: str, n: int = 256, batch: int = 32) -> list[np.ndarray]:
        """Model inputs of the first ``n`` decodable images of ``archive`` (INT8 calibration)."""
        from cxrscreen.io.sources import list_inputs

        items = list(list_inputs(archive))[:n]
        out = []
        for i in range(0, len(items), batch):
            b = decode_items(items[i:i + batch])
            imgs = torch.from_numpy(b["image"][b["status"] == "ok"])
            if len(imgs):
                out.append(to_model_input(imgs, self.info.input_size, self.info.in_channels).numpy())
        return out

    def _inputs(self, images: np.ndarray, ok: np.ndarray) -> torch.Tensor | None:
        """Normalised model input of the ok rows on the runtime's device (None if there are none)."""
        if not ok.any():
            return None
        return to_model_input(self._to_device(images[ok]), self.info.input_size, self.info.in_channels)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """Host array -> tensor on the runtime's device (pinned memory, non-blocking copy on CUDA)."""
        x = torch.from_numpy(np.ascontiguousarray(array))
        if self.runtime.device.type == "cuda":
            x = x.pin_memory()
        return x.to(self.runtime.device, non_blocking=True)

    def _decode_jpegs(self, batch: dict) -> None:
        """Decode the ``jpeg_bytes`` rows (``decode_batch(defer_jpeg=True)``) in one
        ``torchvision.io.decode_jpeg`` call on the runtime's device, resize them there to the
        batch's work size and put them into ``image``; rows that fail become error rows."""
        from torchvision.io import ImageReadMode, decode_jpeg

        data = batch.pop("jpeg_bytes", None)
        if data is None:
            return
        rows = [i for i, d in enumerate(data) if d is not None and batch["status"][i] == "ok"]
        if not rows:
            return
        device = self.runtime.device
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
        for i, img in zip(rows, decoded):
            if img is not None:
                resized = torch.nn.functional.interpolate(img[None].float(), size=(size, size), mode="bilinear",
                                                          antialias=True, align_corners=False)
                batch["image"][i] = resized[0, 0].round().clamp(0, 255).to(torch.uint8).cpu().numpy()

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

    def __init__(self, spec: str = "unet-lungs", mask_size: int = 256, threshold: float = 0.5, **runtime_options):
        super().__init__(spec, **runtime_options)
        self.mask_size, self.threshold = mask_size, threshold

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        self._decode_jpegs(batch)
        n = len(batch["key"])
        ok = batch["status"] == "ok"
        masks = np.full(n, None, object)
        frac = np.full(n, np.nan, np.float32)
        boxes = np.full((n, 4), np.nan, np.float32)
        right, left = boxes.copy(), boxes.copy()
        try:
            x = self._inputs(batch["image"], ok)
            if x is not None:
                probs = torch.sigmoid(self.runtime(x)[:, 0]).cpu().numpy()
                for j, i in enumerate(np.nonzero(ok)[0]):
                    r = lung_regions(probs[j] > self.threshold)
                    masks[i], frac[i], boxes[i], right[i], left[i] = (mask_png(r.mask, self.mask_size), r.fraction,
                                                                      r.box, r.right, r.left)
        except Exception as e:  # noqa: BLE001 - one bad batch must not abort the archive
            self._fail(batch, ok, e)
        batch.update(lung_mask_png=masks, lung_fraction=frac, lung_bbox=boxes, lung_bbox_right=right, lung_bbox_left=left,
                     segmenter=_col([self.info.name] * n), segmenter_sha256=_col([self.loaded.weights_sha256] * n),
                     t_segment_ms=np.full(n, (time.perf_counter() - t0) * 1000 / max(n, 1), np.float32))
        return batch


class Classifier(_ModelStage):
    """Classification with temperature-scaled softmax, label, confidence and ``refer`` flag;
    with ``cam`` ("gradcam" / "gradcampp") also a heatmap of the predicted class (``cam_png``,
    ``cam_size`` px) and the fraction of its energy inside the lung mask (``cam_lung_energy``).

    The ``image`` column is dropped from the output: it is not needed downstream.
    """

    task = "classify"

    def __init__(self, spec: str = "cxrnet-4class", lung_crop: bool = False, refer_below: float = 0.6,
                 lung_fraction_range: tuple[float, float] = (0.05, 0.7), cam: str | None = None,
                 cam_size: int = 128, **runtime_options):
        super().__init__(spec, **runtime_options)
        self.cam, self.cam_size = None, cam_size
        if cam:
            from cxrscreen.explain import GradCAM

            self.cam = GradCAM(self.loaded.module, self.info.in_channels, self.info.input_size, cam)
        self.lung_crop = lung_crop or bool(self.info.lung_crop)  # a crop-trained model is always fed crops
        self.lung_fraction_range = lung_fraction_range
        self.refer_below = self.info.refer_threshold if self.info.refer_threshold is not None else refer_below
        self.classes = list(self.info.classes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        self._decode_jpegs(batch)
        n = len(batch["key"])
        ok = batch["status"] == "ok"
        probs = np.full((n, len(self.classes)), np.nan, np.float32)
        images = batch.pop("image")
        try:
            if self.lung_crop:
                if "lung_bbox" not in batch:
                    raise ValueError("lung crop asked for (or the model was trained on lung crops) "
                                     "but no segmenter ran: give a segmenter")
                images = crop_boxes(torch.from_numpy(images), batch["lung_bbox"], images.shape[-1]).numpy()
            x = self._inputs(images, ok)
            if x is not None:
                probs[ok] = torch.softmax(self.runtime(x) / self.info.temperature, dim=1).cpu().numpy()
                if self.cam is not None:
                    self._add_cams(batch, x, ok)
        except Exception as e:  # noqa: BLE001
            self._fail(batch, ok, e)
        ok = batch["status"] == "ok"
        for c, name in enumerate(self.classes):
            batch[f"prob_{name}"] = probs[:, c]
        top = np.nan_to_num(probs, nan=-1.0).argmax(1)
        batch["label"] = _col([self.classes[t] if k else None for t, k in zip(top, ok)])
        batch["max_prob"] = np.where(ok, np.nan_to_num(probs, nan=0).max(1), np.nan).astype(np.float32)
        batch["refer"], batch["refer_reason"] = self._refer(batch, ok)
        batch.update(classifier=_col([self.info.name] * n), classifier_sha256=_col([self.loaded.weights_sha256] * n),
                     cxrscreen_version=_col([__version__] * n),
                     t_classify_ms=np.full(n, (time.perf_counter() - t0) * 1000 / max(n, 1), np.float32))
        return batch

    def _add_cams(self, batch: dict, x: torch.Tensor, ok: np.ndarray) -> None:
        """Grad-CAM of the predicted class (fp32, on the module's device) for the ok rows,
        from their model input ``x``."""
        from cxrscreen.explain import energy_inside, heatmap_png

        n = len(ok)
        pngs, energy = np.full(n, None, object), np.full(n, np.nan, np.float32)
        heat, _, _ = self.cam(x.to(next(self.loaded.module.parameters()).device))
        small = torch.nn.functional.interpolate(torch.from_numpy(heat)[:, None], size=(self.cam_size,) * 2,
                                                mode="bilinear", align_corners=False)[:, 0].numpy()
        mask_pngs = batch.get("lung_mask_png", np.full(n, None, object))
        for j, i in enumerate(np.nonzero(ok)[0]):
            pngs[i] = heatmap_png(small[j])
            mask_bytes = mask_pngs[i]
            if mask_bytes is not None:
                mask = torch.from_numpy(decode_mask_png(mask_bytes).astype(np.uint8) * 255)
                if self.lung_crop:  # the heatmap is in the coordinates of the crop
                    mask = crop_boxes(mask[None], batch["lung_bbox"][i:i + 1], mask.shape[-1])[0]
                energy[i] = energy_inside(heat[j], mask.numpy() > 127)
        batch.update(cam_png=pngs, cam_lung_energy=energy, cam_method=_col([self.cam.method] * n))

    def _refer(self, batch, ok) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.lung_fraction_range
        frac = batch.get("lung_fraction", np.full(len(ok), np.nan))
        refer, reason = np.zeros(len(ok), bool), np.full(len(ok), None, object)
        for i in np.nonzero(ok)[0]:
            why = []
            if batch["max_prob"][i] < self.refer_below:
                why.append(f"confidence {batch['max_prob'][i]:.2f} < {self.refer_below:.2f}")
            if not np.isnan(frac[i]) and not lo <= frac[i] <= hi:
                why.append(f"lung fraction {frac[i]:.2f} outside [{lo}, {hi}]: atypical image")
            refer[i], reason[i] = bool(why), "; ".join(why) or None
        return refer, reason
