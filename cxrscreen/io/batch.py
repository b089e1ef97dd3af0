"""A batch of inputs -> a model-stage batch: read, hash, decode and resize each row to the
work size; failures become error rows, never exceptions.

This is the first half of the one path from pixels to model input (the second half is
``cxrscreen.preprocess.to_model_input``): ``score``, ``evaluate``, ``train``, ``calibrate``,
``explain`` and ``bench`` all decode through ``decode_items`` / ``decode_batch``.
A batch is a dict of equally long numpy arrays (Ray's "numpy" batch format).
"""

from __future__ import annotations

import hashlib
import os
import time

import cv2
import numpy as np
from PIL import Image

from cxrscreen.io.decode import MAX_BYTES, Decoded, DecodeOptions, as_uint8, decode_image, deferrable_jpeg, read_bytes
from cxrscreen.io.errors import ImageError
from cxrscreen.io.sources import safe_text

# decoded metadata key -> output column (no patient identifiers unless include_phi)
DICOM_COLUMNS = {
    "dicom_Modality": "dicom_modality", "dicom_ViewPosition": "dicom_view_position",
    "dicom_BodyPartExamined": "dicom_body_part", "dicom_StudyInstanceUID": "dicom_study_uid",
    "dicom_SeriesInstanceUID": "dicom_series_uid", "dicom_SOPInstanceUID": "dicom_sop_uid",
    "dicom_PhotometricInterpretation": "dicom_photometric", "dicom_Manufacturer": "dicom_manufacturer",
}
PHI_COLUMNS = {"dicom_PatientName": "patient_name", "dicom_PatientID": "patient_id",
               "dicom_PatientBirthDate": "patient_birth_date"}


WORK_SIZE = 256  # decoded images travel as uint8 WORK_SIZE x WORK_SIZE

# The batch contract: every column a stage adds to the batch (name, type, stage), in output
# order; ``prob_{class}`` stands for one column per class, stage ``phi`` is decode's with
# ``include_phi``, ``cam`` the classifier's with a heatmap. Types: string, float32, float64,
# int64, bool, binary, box (4 float32: x0, y0, x1, y1), codes (list of strings).
# ``pipeline.output.output_schema`` is built from it; tests check each stage adds exactly these.
COLUMNS = (
    ("key", "string", "decode"), ("source_path", "string", "decode"), ("sha256", "string", "decode"),
    ("status", "string", "decode"), ("error_type", "string", "decode"), ("error_message", "string", "decode"),
    ("prob_{class}", "float32", "classify"), ("label", "string", "classify"), ("max_prob", "float32", "classify"),
    ("screening_confidence", "float32", "classify"), ("ood_score", "float32", "classify"),
    ("polarity", "float32", "decode"), ("refer", "bool", "classify"), ("refer_reason", "codes", "classify"),
    ("lung_mask_png", "binary", "segment"), ("lung_fraction", "float32", "segment"), ("lung_bbox", "box", "segment"),
    ("lung_bbox_right", "box", "segment"), ("lung_bbox_left", "box", "segment"),
    ("cam_png", "binary", "cam"), ("cam_method", "string", "cam"), ("cam_lung_energy", "float32", "cam"),
    ("format", "string", "decode"), ("width", "int64", "decode"), ("height", "int64", "decode"),
    ("pixel_spacing_mm", "float64", "decode"), *((c, "string", "decode") for c in DICOM_COLUMNS.values()),
    *((c, "string", "phi") for c in PHI_COLUMNS.values()),
    ("classifier", "string", "classify"), ("classifier_sha256", "string", "classify"),
    ("site_profile", "string", "classify"), ("segmenter", "string", "segment"), ("segmenter_sha256", "string", "segment"),
    ("cxrscreen_version", "string", "classify"), ("t_decode_ms", "float32", "decode"),
    ("t_segment_ms", "float32", "segment"), ("t_classify_ms", "float32", "classify"),
)
TRANSIENT_COLUMNS = ("image", "jpeg_bytes")  # travel between stages (work images, JPEGs for the device); never written


def stage_columns(stages: tuple[str, ...], classes: list[str] = ()) -> list[tuple[str, str]]:
    """(name, type) of the columns the given stages add, in output order."""
    return [(name.format(**{"class": c}), kind) for name, kind, stage in COLUMNS if stage in stages
            for c in (classes if "{class}" in name else [None])]


# every text or bytes column whose missing values are None (and the JPEGs left for the device)
OBJECT_COLUMNS = tuple(n for n, kind, _ in COLUMNS if kind in ("string", "binary")) + ("jpeg_bytes",)


def restore_nulls(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data hands a text or bytes column that was None in every row of a block back as float
    NaN (a block of unreadable files has no lung masks); a stage that passed it on so would give
    its blocks a float column where others have text or bytes, and Ray could not join them
    (issue 17.1). Turn such columns back into None objects."""
    for k in OBJECT_COLUMNS:
        v = batch.get(k)
        if v is not None and v.dtype.kind == "f":
            batch[k] = np.full(len(v), None, object)
    return batch


def resize_uint8(pixels: np.ndarray, size: int = WORK_SIZE) -> np.ndarray:
    """[0, 1] float (or uint8) image -> ``size`` x ``size`` uint8 (area filter when shrinking)."""
    img = as_uint8(pixels)
    if img.shape == (size, size):
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0))


def polarity(img: np.ndarray) -> float:
    """Contrast of the mediastinum against the lung fields of a frontal chest film, in units
    of the image's standard deviation: the central band (x 42-58%, y 25-75%) minus the two
    lateral bands (x 12-32% and 68-88%). Positive on a film with bones white and lungs dark;
    negative when the grey scale is inverted (e.g. MONOCHROME1 data labelled MONOCHROME2);
    0 for a flat image. ``refer_reason`` ``atypical_intensity`` is raised below a threshold."""
    h, w = img.shape
    band = img[h // 4: 3 * h // 4]  # OpenCV's means: 0.03 vs 0.11 ms per 256 px image with numpy's
    centre = cv2.mean(band[:, int(0.42 * w): int(0.58 * w)])[0]
    lungs = (cv2.mean(band[:, int(0.12 * w): int(0.32 * w)])[0] + cv2.mean(band[:, int(0.68 * w): int(0.88 * w)])[0]) / 2
    sd = float(cv2.meanStdDev(img)[1][0, 0])
    return float((centre - lungs) / sd) if sd > 1.0 else 0.0


def col(values, dtype=object) -> np.ndarray:
    arr = np.empty(len(values), dtype=dtype)
    arr[:] = values
    return arr


def unchanged(expected: str | None, sha: str) -> bool:
    """Whether content hashing to ``sha`` is what a row of an earlier run hashed: ``expected`` is
    that row's hash or its first characters (the resume index keeps 16); an unreadable input
    hashes to "" and stays unchanged while it is still unreadable. Not a string (None, or the NaN
    Ray makes of an all-None column): no earlier row."""
    return isinstance(expected, str) and (expected == sha or (expected != "" and sha.startswith(expected)))


def decode_batch(batch: dict[str, np.ndarray], work_size: int = WORK_SIZE, max_pixels: int = 80_000_000,
                 max_bytes: int = MAX_BYTES, prefer_lut: bool = True, include_phi: bool = False,
                 defer_jpeg: bool = False) -> dict[str, np.ndarray]:
    """Read + hash + decode + resize each row; failures become error rows, never exceptions.

    Input columns: ``key``, and ``path`` or ``data`` (bytes); optional ``expected_sha``: a
    row whose content hash equals it, or begins with it, was scored before and is dropped.
    With ``defer_jpeg``, plain JPEGs are not decoded here but passed on as ``jpeg_bytes`` for
    the first model actor to decode in one batch on its device (nvJPEG on a GPU).
    """
    opts = DecodeOptions(max_pixels=max_pixels, prefer_lut=prefer_lut, include_phi=include_phi)
    meta_cols = dict(DICOM_COLUMNS, **(PHI_COLUMNS if include_phi else {}))
    n = len(batch["key"])
    paths = batch.get("path", np.full(n, None, object))
    datas = batch.get("data", np.full(n, None, object))
    expected = batch.get("expected_sha", np.full(n, None, object))
    rows: dict[str, list] = {c: [] for c, _ in stage_columns(("decode", "phi") if include_phi else ("decode",))}
    images, jpeg = [], []
    for i in range(n):
        t0 = time.perf_counter()
        key, path = str(batch["key"][i]), paths[i]
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        path = path if isinstance(path, str) else None  # Ray hands an all-null column back as NaN
        data, sha, err, dec = datas[i], "", None, None
        data = data if isinstance(data, (bytes, bytearray, memoryview)) else None
        try:
            if data is None and path is None:
                raise ImageError("missing", "no image: the archive's row holds no bytes (null)")
            if data is None:
                data = read_bytes(path, max_bytes)
            data = bytes(data)
            if not data:
                raise ImageError("empty", "zero bytes")
            sha = hashlib.sha256(data).hexdigest()
        except ImageError as e:
            err = e
        if unchanged(expected[i], sha):
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
        rows["source_path"].append(None if path is None else safe_text(str(path)))
        rows["sha256"].append(sha)
        rows["status"].append("ok" if err is None else "error")
        rows["error_type"].append(None if err is None else err.kind)
        rows["error_message"].append(None if err is None else safe_text(err.reason))
        meta = dec.meta if dec is not None else {}
        rows["format"].append(dec.format if dec is not None else None)
        rows["width"].append(meta.get("width", -1))
        rows["height"].append(meta.get("height", -1))
        rows["pixel_spacing_mm"].append(meta.get("pixel_spacing_mm", np.nan))
        for src, dst in meta_cols.items():
            rows[dst].append(meta.get(src))
        jpeg.append(data if size is not None else None)
        decoded = dec is not None and dec.data is not None
        image = resize_uint8(dec.data, work_size) if decoded else np.zeros((work_size, work_size), np.uint8)
        images.append(image)
        rows["polarity"].append(polarity(image) if decoded else np.nan)
        rows["t_decode_ms"].append((time.perf_counter() - t0) * 1000)
    out = {k: col(v) for k, v in rows.items()}
    for k, dt in (("width", np.int64), ("height", np.int64), ("pixel_spacing_mm", np.float64),
                  ("polarity", np.float32), ("t_decode_ms", np.float32)):
        out[k] = np.asarray(rows[k], dtype=dt)
    if images:  # an all-skipped batch has no image column: Ray cannot store a zero-length tensor
        out["image"] = np.stack(images)  # column as a tensor and would fall back to pickling it
        if defer_jpeg:
            out["jpeg_bytes"] = col(jpeg)
    return out


def image_batch(images: np.ndarray) -> dict[str, np.ndarray]:
    """A model-stage batch of already decoded uint8 images (B, H, W), every row ok."""
    n = len(images)
    return {"key": np.arange(n).astype(object), "status": np.full(n, "ok", object),
            "error_type": np.full(n, None, object), "error_message": np.full(n, None, object), "image": images}


def decode_items(items, work_size: int = WORK_SIZE, expected_sha=None, **options) -> dict[str, np.ndarray]:
    """``decode_batch`` over a sequence of ``InputItem`` (path or bytes): a model-stage batch
    (with an empty ``image`` array when no row is left, for callers outside Ray). ``expected_sha``:
    per item, the content hash (prefix) of an earlier run's row, or None (``decode_batch``)."""
    batch = {"key": col([it.key for it in items]), "path": col([it.path for it in items]),
             "data": col([it.data for it in items])}
    if expected_sha is not None:
        batch["expected_sha"] = col(list(expected_sha))
    out = decode_batch(batch, work_size, **options)
    out.setdefault("image", np.zeros((0, work_size, work_size), np.uint8))
    if options.get("defer_jpeg"):
        out.setdefault("jpeg_bytes", col([]))
    return out
