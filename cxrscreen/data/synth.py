"""Synthetic chest-radiograph phantoms with known labels, lung masks and finding masks.

A phantom is a torso with two lung fields, mediastinum, heart, ribs and diaphragm, plus a
class-specific finding inside the lungs:

- ``normal``: clear lungs;
- ``covid``: bilateral, peripheral, lower-zone ground-glass opacities;
- ``bacterial_pneumonia``: one dense focal (lobar) consolidation;
- ``viral_pneumonia``: a diffuse bilateral interstitial (reticular) pattern.

Everything is deterministic in the seed. Writers produce PNG (8/16-bit), JPEG, DICOM
(MONOCHROME1/2, 8/16-bit, window or VOI LUT, rescale slope/intercept) and Parquet, and
:func:`write_bad_inputs` produces the broken files that a screening run must survive.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

CLASSES = ("covid", "normal", "viral_pneumonia", "bacterial_pneumonia")
DICOM_VARIANTS = ("m2_8bit", "m2_16bit_window", "m1_16bit_window", "m1_16bit_voilut")
FORMATS = ("png", "png16", "jpeg", "dicom")


@dataclass
class Phantom:
    image: np.ndarray  # float32 HxW in [0, 1], 0 = black
    lung_mask: np.ndarray  # uint8 HxW, 1 = lung
    finding_mask: np.ndarray  # uint8 HxW, 1 = where the finding adds opacity
    label: str


def _ellipse(yy, xx, cy, cx, ry, rx, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u, v = dx * c + dy * s, -dx * s + dy * c
    return (u / rx) ** 2 + (v / ry) ** 2


def _blob(yy, xx, cy, cx, sigma):
    return np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)))


def make_phantom(label: str, size: int = 256, seed: int = 0) -> Phantom:
    """One phantom of class ``label`` (see module docstring), deterministic in ``seed``."""
    if label not in CLASSES:
        raise ValueError(f"unknown phantom class {label!r}; choose from {CLASSES}")
    rng = np.random.default_rng(seed)
    j = lambda scale: rng.uniform(-scale, scale)  # noqa: E731 - small jitter helper
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size

    img = np.full((size, size), 0.04, np.float32)
    body = _ellipse(yy, xx, 0.56 + j(0.02), 0.5 + j(0.02), 0.56, 0.44 + j(0.03)) <= 1
    img[body] = 0.50 + j(0.05)
    lungs = np.zeros((size, size), bool)
    for side in (-1, 1):
        lung = _ellipse(yy, xx, 0.47 + j(0.02), 0.5 + side * (0.18 + j(0.015)),
                        0.29 + j(0.02), 0.125 + j(0.01), angle=side * (0.12 + j(0.04))) <= 1
        lungs |= lung & (yy > 0.17)
    heart = _ellipse(yy, xx, 0.64 + j(0.02), 0.54 + j(0.02), 0.12 + j(0.01), 0.14 + j(0.015)) <= 1
    lungs &= ~heart
    img[lungs] = 0.17 + j(0.03)
    spine = (np.abs(xx - 0.5) < 0.035) & body
    img[spine] += 0.12
    img[heart & body] = 0.58 + j(0.04)
    # ribs: thin curved bands across the thorax
    for k in range(9):
        y0 = 0.2 + 0.068 * k + j(0.01)
        curve = y0 + 0.09 * ((xx - 0.5) / 0.4) ** 2
        rib = (np.abs(yy - curve) < 0.011) & body & (np.abs(xx - 0.5) > 0.04)
        img[rib] += 0.07
    # diaphragm below the lungs is soft tissue already (body value)

    finding = np.zeros((size, size), np.float32)
    left, right = lungs & (xx < 0.5), lungs & (xx >= 0.5)
    if label == "covid":
        for side, half in ((-1, left), (1, right)):
            for _ in range(rng.integers(2, 4)):
                cx = 0.5 + side * (0.25 + j(0.03))
                cy = 0.6 + j(0.07)
                finding += (0.22 + j(0.05)) * _blob(yy, xx, cy, cx, 0.055 + j(0.015)) * half
    elif label == "bacterial_pneumonia":
        half = left if rng.random() < 0.5 else right
        side = -1 if half is left else 1
        cy, cx = 0.35 + rng.uniform(0, 0.3), 0.5 + side * (0.18 + j(0.04))
        blob = _blob(yy, xx, cy, cx, 0.07 + j(0.015))
        finding += 0.42 * np.clip((blob - 0.35) * 3.0, 0, 1) * half
    elif label == "viral_pneumonia":
        noise = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), size / 96)
        reticular = np.abs(noise) < 0.25 * noise.std()  # thin network lines
        haze = 0.06 * _blob(yy, xx, 0.45, 0.5, 0.22)
        finding += (0.16 * reticular + haze) * lungs
    img += finding
    img = ndimage.gaussian_filter(img, size / 256.0)
    img += rng.normal(0, 0.015, img.shape).astype(np.float32)
    img = np.clip(img, 0, 1).astype(np.float32)
    return Phantom(img, lungs.astype(np.uint8), (finding > 0.05).astype(np.uint8), label)


# --------------------------------------------------------------------------- encoders


def encode_png(pixels: np.ndarray, bits: int = 8) -> bytes:
    """Encode a [0, 1] float image (or a 0/1 mask scaled by the caller) as 8- or 16-bit PNG."""
    buf = io.BytesIO()
    if bits == 16:
        Image.fromarray(np.rint(pixels * 65535).astype(np.uint16)).save(buf, format="PNG")
    else:
        Image.fromarray(np.rint(pixels * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def encode_jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.rint(pixels * 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_dicom(pixels: np.ndarray, variant: str = "m2_16bit_window", patient_id: str = "SYN-0",
                 seed: int = 0) -> bytes:
    """Encode a [0, 1] image as a DX DICOM file whose display pipeline reproduces ``pixels``.

    Variants: ``m2_8bit`` (MONOCHROME2, 8-bit, window), ``m2_16bit_window`` and
    ``m1_16bit_window`` (12 bits stored, rescale intercept -1024, window), ``m1_16bit_voilut``
    (MONOCHROME1, VOI LUT sequence and a decoy window, to exercise ``prefer_lut``).
    Fake patient identifiers are written so that PHI stripping can be tested.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    if variant not in DICOM_VARIANTS:
        raise ValueError(f"unknown DICOM variant {variant!r}; choose from {DICOM_VARIANTS}")
    sop_class = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    uid = generate_uid(entropy_srcs=[str(seed), variant])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(seed), "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(seed), "series"])
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "DX", "PA", "CHEST"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "PHANTOM^TEST", patient_id, "19700101"
    ds.PixelSpacing = [0.5, 0.5]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    mono1 = variant.startswith("m1")
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    shown = 1.0 - pixels if mono1 else pixels
    if variant == "m2_8bit":
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        stored = np.rint(shown * 255).astype(np.uint8)
        ds.WindowCenter, ds.WindowWidth = 128.0, 256.0
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        stored = (np.rint(shown * 4000) + 48).astype(np.uint16)
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "US"
        # window exactly spanning the modality range [48 - 1024, 4048 - 1024]
        ds.WindowCenter, ds.WindowWidth = 2048.0 - 1024 + 0.5, 4001.0
        if variant == "m1_16bit_voilut":
            ds.WindowCenter, ds.WindowWidth = 0.0, 10.0  # decoy: a LUT-preferring reader ignores it
            del ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType  # LUT input = stored value
            item = Dataset()
            ramp = np.clip((np.arange(4096) - 48) / 4000.0, 0, 1)
            item.LUTDescriptor = [4096, 0, 16]
            item.add_new(0x00283006, "US", [int(v) for v in np.rint(ramp * 65535)])  # LUTData
            item.LUTExplanation = "linear"
            ds.VOILUTSequence = [item]
            ds.PixelRepresentation = 0
    ds.PixelData = stored.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --------------------------------------------------------------------------- archives


def phantom_plan(n: int, seed: int = 0, classes=CLASSES) -> list[dict]:
    """Labels, patient ids and seeds of ``n`` phantoms: balanced classes, 1-2 images per patient."""
    rng = np.random.default_rng(seed)
    plan, patient = [], 0
    while len(plan) < n:
        label = classes[patient % len(classes)]
        for _ in range(min(int(rng.integers(1, 3)), n - len(plan))):
            plan.append({"label": label, "patient_id": f"syn{patient:05d}",
                         "seed": int(rng.integers(0, 2**31 - 1))})
        patient += 1
    return plan


def write_archive(out_dir: str | Path, n: int, seed: int = 0, size: int = 256,
                  formats: tuple[str, ...] = ("png",), parquet: bool = False,
                  classes=CLASSES) -> Path:
    """Write ``n`` phantoms as ``images/<label>/<name>.<ext>``, ``masks/``, ``findings/`` and
    ``manifest.csv`` (paths relative to ``out_dir``).

    Formats are assigned round-robin over ``formats`` (DICOM cycles through its variants).
    With ``parquet=True`` the same images also go to ``phantoms.parquet`` (PNG bytes).
    Returns the manifest path; its ``split`` column comes from the patient-level splitter.
    """
    from cxrscreen.data.splits import patient_split

    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"unknown formats {bad}; choose from {FORMATS}")
    out = Path(out_dir)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "findings").mkdir(exist_ok=True)
    rows = []
    for i, item in enumerate(phantom_plan(n, seed, classes)):
        ph = make_phantom(item["label"], size, item["seed"])
        fmt = formats[i % len(formats)]
        name = f"{item['patient_id']}_{i:06d}"
        if fmt == "png":
            data, ext = encode_png(ph.image), ".png"
        elif fmt == "png16":
            data, ext = encode_png(ph.image, bits=16), ".png"
        elif fmt == "jpeg":
            data, ext = encode_jpeg(ph.image), ".jpg"
        else:
            variant = DICOM_VARIANTS[(i // len(formats)) % len(DICOM_VARIANTS)]
            data, ext = encode_dicom(ph.image, variant, item["patient_id"], item["seed"]), ".dcm"
        rel = f"images/{item['label']}/{name}{ext}"
        (out / "images" / item["label"]).mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
        (out / "masks" / f"{name}.png").write_bytes(encode_png(ph.lung_mask.astype(np.float32)))
        (out / "findings" / f"{name}.png").write_bytes(encode_png(ph.finding_mask.astype(np.float32)))
        rows.append({"path": rel, "label": item["label"], "source": "phantom",
                     "patient_id": item["patient_id"], "format": fmt,
                     "mask_path": f"masks/{name}.png", "finding_path": f"findings/{name}.png",
                     "seed": item["seed"]})
    import polars as pl

    df = patient_split(pl.DataFrame(rows), seed=seed)
    manifest = out / "manifest.csv"
    df.write_csv(manifest)
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        images = [(out / p).read_bytes() for p in df["path"]]
        table = pa.table({"key": df["path"].to_list(), "image": pa.array(images, pa.binary()),
                          "label": df["label"].to_list(), "patient_id": df["patient_id"].to_list(),
                          "split": df["split"].to_list()})
        pq.write_table(table, out / "phantoms.parquet")
    return manifest


def write_bad_inputs(out_dir: str | Path, size: int = 64) -> dict[str, str]:
    """Write one file per failure mode; returns {file name: expected ImageError kind}."""
    from pydicom.uid import JPEGBaseline8Bit

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    good = make_phantom("normal", size, 1).image
    png = encode_png(good)
    dcm = encode_dicom(good, "m2_16bit_window")
    expected = {
        "empty.png": ("empty", b""),
        "truncated.png": ("truncated", png[: len(png) // 2]),
        "truncated.jpg": ("truncated", encode_jpeg(good)[:300]),
        "not_an_image.png": ("not_image", b"this is plain text, not a radiograph\n" * 20),
        "random_bytes.jpg": ("not_image", np.random.default_rng(0).bytes(4096)),
        "truncated.dcm": ("truncated", dcm[: len(dcm) - 3000]),
    }
    # a decompression bomb: a tiny PNG header claiming 40000 x 40000 pixels
    bomb = io.BytesIO()
    Image.new("L", (1, 1)).save(bomb, format="PNG")
    raw = bytearray(bomb.getvalue())
    ihdr = raw[12:29]
    ihdr[4:8] = (40000).to_bytes(4, "big")
    ihdr[8:12] = (40000).to_bytes(4, "big")
    raw[12:29] = ihdr
    raw[29:33] = zlib.crc32(bytes(ihdr)).to_bytes(4, "big")
    expected["bomb.png"] = ("too_large", bytes(raw))
    # DICOM with an RGB photometric interpretation and DICOM without pixel data
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dcm))
    rgb = np.repeat((good * 255).astype(np.uint8)[..., None], 3, axis=2)
    ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration = "RGB", 3, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = rgb.tobytes()
    expected["rgb.dcm"] = ("unsupported_photometric", _dicom_bytes(ds))
    ds = pydicom.dcmread(io.BytesIO(dcm))
    del ds.PixelData
    expected["no_pixels.dcm"] = ("no_pixel_data", _dicom_bytes(ds))
    # a compressed transfer syntax claimed but the bytes are garbage
    ds = pydicom.dcmread(io.BytesIO(dcm))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\xff\xd8garbage-not-a-jpeg\xff\xd9"])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    expected["garbage_jpeg.dcm"] = ("decode_failed", _dicom_bytes(ds))
    for name, (_, data) in expected.items():
        (out / name).write_bytes(data)
    return {name: kind for name, (kind, _) in expected.items()}


def _dicom_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()

