"""Decode PNG / JPEG / DICOM bytes into one float32 grayscale array in [0, 1].

DICOM follows the standard display pipeline: stored values -> modality LUT (rescale
slope/intercept or LUT) -> VOI (explicit window, the file's VOI LUT or window) ->
MONOCHROME1 inversion. Compressed transfer syntaxes are decoded by pydicom's plugins:
RLE (pydicom), JPEG baseline/extended (pillow or pylibjpeg-libjpeg), JPEG lossless and
JPEG-LS (pylibjpeg-libjpeg), JPEG 2000 and HTJ2K (pylibjpeg-openjpeg or pillow).
Every failure raises :class:`ImageError`; nothing else escapes ``decode_image``.
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cxrscreen.io.errors import ImageError

# Broken DICOM files become error rows; pydicom's own log lines and warnings would flood the
# log and can quote raw tag values (patient identifiers): both are silenced where pydicom runs.
logging.getLogger("pydicom").setLevel(logging.CRITICAL)
# Pillow's own bomb check would fire before ours with a less useful message.
Image.MAX_IMAGE_PIXELS = None

DICOM_SCREENING_FIELDS = (
    "Modality", "ViewPosition", "BodyPartExamined", "StudyInstanceUID", "SeriesInstanceUID",
    "SOPInstanceUID", "PhotometricInterpretation", "BitsStored", "Manufacturer",
)
DICOM_PHI_FIELDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge")
# what a value of each VR may look like (DICOM PS3.5 6.2); anything else is dropped, never shown
_VR_GRAMMAR = {"UI": r"[0-9.]{1,64}", "CS": r"[A-Z0-9 _]{1,16}", "IS": r"[+-]?[0-9]{1,12}",
               "DA": r"[0-9]{8}", "AS": r"[0-9]{3}[DWMY]"}


def _scrub(message: str) -> str:
    """An error message without any quoted value (pydicom quotes tag values in its messages).
    A quote opens a value unless a letter, digit or backslash precedes it (so "doesn't" stays),
    and closes it unless one follows (so 'O'BRIEN' is hidden whole); escaped quotes inside, as
    Python's repr writes them ('X\\'Y"Z'), do not close it; an unclosed value hides the rest."""
    return re.sub(r"""(?<![\w\\])b?(['"])(?:\\.|(?!\1(?!\w))[^\\])*(?:\1(?!\w)|$)""", "<value>", message,
                  flags=re.S)[:300]


def _pydicom():
    """pydicom, imported with its logging silenced and value validation off (its warnings quote
    raw values); pydicom resets its logger's level when first imported."""
    import pydicom

    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    return pydicom


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode. ``window`` = (center, width) in modality units overrides the file's VOI."""

    max_pixels: int = 80_000_000
    window: tuple[float, float] | None = None
    prefer_lut: bool = True
    include_phi: bool = False


@dataclass
class Decoded:
    """A decoded image: ``data`` as read, float32 HxW in [0, 1] (0 = black) or, from an 8-bit
    source, uint8 (the scoring path then skips a float round trip), plus
    metadata. ``data`` is None for a JPEG left to a model actor to decode on its device
    (``deferrable_jpeg``)."""

    data: np.ndarray | None
    format: str
    meta: dict = field(default_factory=dict)

    @property
    def pixels(self) -> np.ndarray | None:
        """float32 HxW in [0, 1]."""
        if self.data is None or self.data.dtype == np.float32:
            return self.data
        return self.data.astype(np.float32) / 255.0


def as_uint8(pixels: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 (rounded, clipped); uint8 as it is."""
    return pixels if pixels.dtype == np.uint8 else np.rint(np.clip(pixels, 0, 1) * 255).astype(np.uint8)


MAX_BYTES = 512 * 2**20  # default cap on the bytes read per input file


def read_bytes(path: str | os.PathLike, max_bytes: int = MAX_BYTES) -> bytes:
    """Read a whole regular file of at most ``max_bytes``, mapping every OS failure to an
    ImageError. Opened non-blocking and checked with fstat before reading, so a FIFO, socket
    or device never blocks the run (``unreadable``), and a huge or growing file is refused
    without being read into memory (``too_large``)."""
    import stat

    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ImageError("missing", f"no such file: {p}") from None
    except IsADirectoryError:
        raise ImageError("unreadable", f"is a directory: {p}") from None
    except OSError as e:
        raise ImageError("unreadable", f"{type(e).__name__}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("unreadable", "not a regular file (a pipe, socket, device or directory)")
        if st.st_size > max_bytes:
            raise ImageError("too_large", f"{st.st_size} bytes, more than max_bytes={max_bytes}")
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise ImageError("unreadable", f"{type(e).__name__}: {e.strerror or e}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > max_bytes:
        raise ImageError("too_large", f"more than max_bytes={max_bytes} bytes (the file grew while read)")
    if not data:
        raise ImageError("empty", f"zero-byte file: {p}")
    return data


def is_dicom(data: bytes) -> bool:
    """True when the bytes carry the DICOM Part 10 preamble magic."""
    return len(data) >= 132 and data[128:132] == b"DICM"


RASTER_MAGIC = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg", b"II*\x00": "tiff", b"MM\x00*": "tiff",
                b"BM": "bmp", **{magic + space: "pgm" for magic in (b"P5", b"P2") for space in (b"\n", b" ", b"\t", b"\r")}}
_PGM_SEP = rb"(?:\s|#[^\r\n]*[\r\n])+"  # whitespace and '#' comments, as Netpbm headers allow
_PGM_NUMBER = rb"(\d{1,10})"  # no 4,300-digit integers (Python refuses to parse them)
_PGM_HEADER = re.compile(rb"P5" + _PGM_SEP + _PGM_NUMBER + _PGM_SEP + _PGM_NUMBER + _PGM_SEP + _PGM_NUMBER + rb"\s")  # binary


def sniff_format(data: bytes) -> str | None:
    """'dicom', 'png', 'jpeg', 'tiff', 'bmp' or 'pgm' from the bytes themselves (never the file name).
    DICOM first: its 128-byte preamble may itself hold a TIFF header (dual-format files)."""
    if is_dicom(data):
        return "dicom"
    return next((fmt for magic, fmt in RASTER_MAGIC.items() if data.startswith(magic)), None)


def decode_image(data: bytes, options: DecodeOptions = DecodeOptions(), name: str = "") -> Decoded:
    """Decode image bytes. The format comes from the content: a PNG named ``.dcm`` is a PNG.
    ``name`` only admits DICOM without the Part 10 preamble (a raw dataset named .dcm)."""
    if not data:
        raise ImageError("empty", "zero bytes")
    fmt = sniff_format(data)
    if fmt == "dicom" or (fmt is None and name.lower().endswith((".dcm", ".dicom")) and _looks_like_raw_dicom(data)):
        return _decode_dicom(data, options)
    if fmt is None:
        raise ImageError("not_image", "not a PNG, JPEG, TIFF, BMP, PGM or DICOM file (no known signature in its first bytes)")
    return _decode_raster(data, fmt, options)


def _looks_like_raw_dicom(data: bytes) -> bool:
    """A DICOM dataset without preamble starts with an element of group 0002 or 0008 (little endian)."""
    return len(data) >= 8 and data[:2] in (b"\x02\x00", b"\x08\x00") and data[3:4] == b"\x00"


def _ends_early(data: bytes, fmt: str) -> bool:
    """True when a PNG lacks its IEND chunk, a JPEG its end-of-image marker or a PGM some of the
    pixels its header declares: the file was cut."""
    if fmt == "pgm":
        m = _PGM_HEADER.match(data)
        return bool(m) and len(data) - m.end() < int(m[1]) * int(m[2]) * (1 if int(m[3]) < 256 else 2)
    tail = data.rstrip(b"\0")
    if fmt == "png":
        return not tail.endswith(b"IEND\xaeB`\x82")
    if fmt == "jpeg":
        return not tail.endswith(b"\xff\xd9")
    return False


# --------------------------------------------------------------------------- raster


def deferrable_jpeg(data: bytes, options: DecodeOptions = DecodeOptions()) -> tuple[int, int] | None:
    """(width, height) when ``data`` is a JPEG a model actor may decode itself (complete, header
    readable, no EXIF rotation, 8-bit L/RGB, within ``max_pixels``); None sends it the normal way."""
    if not data.startswith(b"\xff\xd8\xff") or not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return None  # not a JPEG, or cut short (the normal path reports it as truncated)
    try:
        img = Image.open(io.BytesIO(data))
        ok = img.format == "JPEG" and img.mode in ("L", "RGB") and img.getexif().get(0x0112, 1) == 1
    except Exception:  # noqa: BLE001 - the normal path reports what is wrong
        return None
    w, h = img.size
    return (w, h) if ok and w * h <= options.max_pixels else None


def _plain_png_chunks(data: bytes) -> bool:
    """Every chunk of a PNG whole with a right checksum (libpng only warns where Pillow refuses),
    and none that may carry an orientation Pillow would apply (EXIF, text: XMP, raw profiles)."""
    pos = 8
    while pos + 12 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + size
        if end > len(data) or kind in (b"eXIf", b"tEXt", b"zTXt", b"iTXt"):
            return False
        if kind != b"IDAT" and zlib.crc32(data[pos + 4:end - 4]) != struct.unpack(">I", data[end - 4:end])[0]:
            return False  # (the image data's checksums are libpng's to check: an error there)
        if kind == b"IEND":
            return True
        pos = end
    return False


RASTER_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "PPM")  # what Pillow may open: no EPS, PDF, SVG, ...


def _plain_8bit(data: bytes, sniffed: str, max_pixels: int) -> np.ndarray | None:
    """The pixels of a complete 8-bit greyscale PGM (maxval 255: its bytes as they are) or PNG
    (colour type 0, ``_plain_png_chunks``: OpenCV's decoder, 0.61 vs 0.78 ms for Pillow at 224 px,
    the same pixels) within ``max_pixels``, without Pillow; None for anything else, which Pillow decodes
    (or explains)."""
    if sniffed == "pgm" and (m := _PGM_HEADER.match(data)) and m[3] == b"255":
        w, h = int(m[1]), int(m[2])
        return np.frombuffer(data, np.uint8, w * h, m.end()).reshape(h, w).copy() if 0 < w * h <= max_pixels else None
    if sniffed != "png" or data[12:16] != b"IHDR" or data[24:26] != b"\x08\x00" or not _plain_png_chunks(data):
        return None
    w, h = struct.unpack(">II", data[16:24])
    if not 0 < w * h <= max_pixels:
        return None
    import cv2

    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return pixels if pixels is not None and pixels.shape == (h, w) and pixels.dtype == np.uint8 else None


def _decode_raster(data: bytes, sniffed: str, options: DecodeOptions) -> Decoded:
    """PNG / JPEG / TIFF / BMP / PGM (``sniffed`` by ``sniff_format``; PGM, Netpbm greyscale, binary
    (what ``cxrscreen ingest --pixels pgm`` stores: raw pixels behind a short header) or plain
    text). ``truncated`` only when the file ends early (no PNG IEND, no JPEG end marker, fewer
    binary PGM pixels than its header says); a complete file that fails to decode is corrupt
    (``decode_failed``)."""
    cut = _ends_early(data, sniffed)
    plain = None if cut else _plain_8bit(data, sniffed, options.max_pixels)
    if plain is not None:
        return Decoded(plain, sniffed, {"width": plain.shape[1], "height": plain.shape[0], "bits": 8, "source_mode": "L"})
    try:
        img = Image.open(io.BytesIO(data), formats=RASTER_FORMATS)
    except UnidentifiedImageError:
        kind, what = ("truncated", "cut short") if cut else ("decode_failed", "corrupt")
        raise ImageError(kind, f"{sniffed} header {what}: its signature is there but the header does not parse") from None
    except Exception as e:  # noqa: BLE001 - any parser failure is a bad header
        kind = "truncated" if cut else "decode_failed"
        raise ImageError(kind, f"{sniffed} header {'cut short' if cut else 'corrupt'}: {type(e).__name__}: {e}") from None
    w, h = img.size
    if w * h > options.max_pixels:
        raise ImageError("too_large", f"{w}x{h} = {w * h} pixels > limit {options.max_pixels}")
    fmt = "pgm" if sniffed == "pgm" else (img.format or "unknown").lower()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            img = ImageOps.exif_transpose(img)
    except Exception as e:  # noqa: BLE001 - OSError, SyntaxError on bad PNG chunks, ...
        kind = "truncated" if cut else "decode_failed"
        raise ImageError(kind, f"{fmt} pixel data {'cut short' if cut else 'corrupt'}: {type(e).__name__}: {e}") from None
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L"):
        # 16-bit containers often hold 10-14 significant bits: scale by the smallest bit depth
        # that holds the data (a 12-bit image divided by 65535 would come out nearly black)
        arr = np.asarray(img, dtype=np.float32)
        top = arr.max(initial=0)
        bits = next(b for b in (8, 10, 12, 14, 16) if top < 2**b)
        pixels = arr / float(2**bits - 1)
    elif mode == "I" and sniffed == "pgm":  # a 16-bit PGM: Pillow scales its maxval to 65535
        pixels = np.asarray(img, dtype=np.float32) / 65535.0
        bits = 16
    elif mode == "I":  # 32-bit integers: no fixed range, use the data's
        pixels = _minmax(np.asarray(img, dtype=np.float64).astype(np.float32))
        bits = 32
    elif mode == "F":
        pixels = _minmax(np.asarray(img, dtype=np.float32))
        bits = 32
    else:
        meta = {"width": w, "height": h, "bits": 8, "source_mode": mode}
        return Decoded(np.array(img if mode == "L" else img.convert("L"), dtype=np.uint8), fmt, meta)  # writable
    meta = {"width": w, "height": h, "bits": bits, "source_mode": mode}
    return Decoded(np.ascontiguousarray(pixels, dtype=np.float32), fmt, meta)


# --------------------------------------------------------------------------- DICOM


def _decode_dicom(data: bytes, options: DecodeOptions) -> Decoded:
    """``_read_dicom`` with every warning silenced and every message free of tag values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _read_dicom(data, options)
        except ImageError as e:
            raise ImageError(e.kind, _scrub(e.reason)) from None
        except Exception as e:  # noqa: BLE001 - any pydicom failure is this file's error row
            raise ImageError("decode_failed", _scrub(f"DICOM: {type(e).__name__}: {e}")) from None


def _read_dicom(data: bytes, options: DecodeOptions) -> Decoded:
    pydicom = _pydicom()
    from pydicom import pixels as pxl
    from pydicom.uid import ImplicitVRLittleEndian

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as e:  # noqa: BLE001
        raise ImageError("decode_failed", f"DICOM header: {type(e).__name__}: {e}") from None
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if _ends_inside_an_element(ds):
            raise ImageError("truncated", "the file ends inside an element of the header, before Pixel Data (7FE0,0010)")
        if len(ds) == 0:
            raise ImageError("not_image", "no DICOM element could be read")
        raise ImageError("no_pixel_data", "DICOM file has no Pixel Data element (7FE0,0010): not an image object, "
                                          "or a file cut just before it")
    pi = str(ds.get("PhotometricInterpretation", "")).strip()
    if pi not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageError("unsupported_photometric", f"PhotometricInterpretation (0028,0004) {pi or 'missing'!r}; "
                         "only MONOCHROME1/MONOCHROME2 radiographs are screened")
    rows, cols = _number(ds, "Rows", 0), _number(ds, "Columns", 0)
    if rows * cols > options.max_pixels:
        raise ImageError("too_large", f"{cols}x{rows} = {rows * cols} pixels > limit {options.max_pixels}")
    for keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        _number(ds, keyword, 0, float)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ts = ds.file_meta.TransferSyntaxUID
    if ts.is_compressed:
        try:
            decoder = pxl.get_decoder(ts)
        except NotImplementedError:
            decoder = None
        if decoder is None or not decoder.is_available:
            raise ImageError("unsupported_transfer_syntax", f"no installed decoder for {ts.name} ({ts})")
    if not ts.is_compressed and "PixelData" in ds:
        _check_pixel_data_length(ds, rows, cols)
    try:
        arr = ds.pixel_array
    except (KeyError, AttributeError) as e:
        raise ImageError("decode_failed", f"a required element is missing: {_element_name(e)}") from None
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {e}"
        truncated = any(s in msg.lower() for s in ("truncat", "less than expected", "end of"))
        raise ImageError("truncated" if truncated else "decode_failed", f"DICOM pixels: {msg}") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ImageError("unsupported_photometric", f"expected one grayscale plane, got shape {arr.shape}")
    values = pxl.apply_modality_lut(arr, ds).astype(np.float64)
    pixels, voi = _apply_voi(values, ds, options)
    if pi == "MONOCHROME1":
        pixels = 1.0 - pixels
    meta = {"width": cols, "height": rows, "bits": int(ds.get("BitsStored", 8)), "frames": frames,
            "voi": voi, "transfer_syntax": ts.name}
    meta.update(dicom_metadata(ds, include_phi=options.include_phi))
    return Decoded(np.ascontiguousarray(pixels, dtype=np.float32), "dicom", meta)


def _ends_inside_an_element(ds) -> bool:
    """True when the last element read holds fewer bytes than its header declares (pydicom
    stops silently at the end of a cut file)."""
    if not len(ds):
        return False
    raw = ds.get_item(list(ds.keys())[-1])
    length, value = getattr(raw, "length", 0), getattr(raw, "value", None)
    return isinstance(value, bytes) and length != 0xFFFFFFFF and len(value) < length


def _number(ds, keyword: str, default, kind=int):
    """A numeric element (the first value of a multi-valued one) or ``default`` when absent;
    a value that is not a number is an error naming the element, never quoting the value."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.multival import MultiValue
    from pydicom.tag import Tag

    if keyword not in ds:
        return default
    try:
        value = ds[keyword].value
        value = value[0] if isinstance(value, (list, tuple, MultiValue)) else value
        return kind(value)
    except Exception:  # noqa: BLE001
        raise ImageError("decode_failed", f"{keyword} {Tag(tag_for_keyword(keyword))} is not a number") from None


def _element_name(e: Exception) -> str:
    """'BitsAllocated (0028,0100)' from pydicom's KeyError(tag) / AttributeError('... BitsAllocated')."""
    from pydicom.datadict import keyword_for_tag
    from pydicom.tag import Tag

    arg = e.args[0] if e.args else ""
    try:
        tag = Tag(arg)
        return f"{keyword_for_tag(tag) or 'element'} {tag}"
    except Exception:  # noqa: BLE001
        words = re.findall(r"[A-Z][A-Za-z]+", str(arg))
        return words[-1] if words else "an element"


def _check_pixel_data_length(ds, rows: int, cols: int) -> None:
    """Uncompressed Pixel Data must hold Rows x Columns x frames x samples x BitsAllocated / 8 bytes."""
    bits = _number(ds, "BitsAllocated", 0)
    frames, samples = _number(ds, "NumberOfFrames", 1) or 1, _number(ds, "SamplesPerPixel", 1) or 1
    expected = rows * cols * frames * samples * bits // 8
    actual = len(ds.PixelData)
    if not expected:
        raise ImageError("decode_failed", "Rows (0028,0010), Columns (0028,0011) or BitsAllocated (0028,0100) is 0 or missing")
    if actual < expected:
        raise ImageError("truncated", f"Pixel Data (7FE0,0010) holds {actual} bytes; Rows x Columns x BitsAllocated "
                                      f"declare {expected}: the file was cut")
    if actual >= 2 * expected:
        raise ImageError("decode_failed", f"Pixel Data (7FE0,0010) holds {actual // expected}x the {expected} bytes that "
                                          f"Rows x Columns x BitsAllocated ({bits}) declare: BitsAllocated (0028,0100) "
                                          "or the image size is wrong")


def _apply_voi(values: np.ndarray, ds, options: DecodeOptions) -> tuple[np.ndarray, str]:
    """Map modality values to [0, 1]; returns the pixels and which VOI was used."""
    from pydicom import pixels as pxl

    has_lut = "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    if options.window is not None:
        c, w = options.window
        return _window(values, c, w, "LINEAR"), f"explicit window c={c} w={w}"
    if has_lut and (options.prefer_lut or not has_window):
        item = ds.VOILUTSequence[0]
        out = pxl.apply_voi(np.rint(values).astype(np.int64), ds, index=0).astype(np.float64)
        top = float(out.max()) if out.size else 1.0
        if isinstance(item.LUTData, (bytes, bytearray)):  # OW: raw little-endian words
            lut = np.frombuffer(item.LUTData, dtype="<u2" if int(item.LUTDescriptor[2]) > 8 else "u1")
        else:
            lut = np.asarray(item.LUTData, dtype=np.float64).ravel()
        top = float(lut.max()) if lut.size and lut.max() > 0 else max(top, 1.0)
        return np.clip(out / top, 0.0, 1.0), "file VOI LUT"
    if has_window:
        c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
        fn = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        return _window(values, c, w, fn), f"file window c={c} w={w} {fn}"
    return _minmax(values), "min-max"


def _first(v) -> float:
    try:
        return float(v[0])
    except TypeError:
        return float(v)


def _window(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing to [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / max(width, 1e-6)))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / max(width, 1e-6) + 0.5, 0.0, 1.0)
    width = max(width, 1.0)
    return np.clip((x - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5, 0.0, 1.0)


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(x)), float(np.max(x))
    return np.zeros_like(x, dtype=np.float64) if hi <= lo else (x - lo) / (hi - lo)


def dicom_metadata(ds, include_phi: bool = False) -> dict:
    """Screening-relevant DICOM attributes as plain strings; patient identifiers only if asked.
    A value that breaks its VR's grammar (say a UID whose corrupted length swallowed the
    following elements, patient name included) is dropped, not copied."""
    meta = {}
    for k in DICOM_SCREENING_FIELDS + (DICOM_PHI_FIELDS if include_phi else ()):
        try:
            elem = ds.data_element(k)
            value = "" if elem is None or elem.value is None else str(elem.value).strip()
        except Exception:  # noqa: BLE001 - an unreadable element is a missing one
            continue
        grammar = _VR_GRAMMAR.get(elem.VR, r"[^\x00-\x1f\x7f\\]{1,64}")
        if value and re.fullmatch(grammar, value):
            meta[f"dicom_{k}"] = value
    try:
        spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
        if spacing:
            meta["pixel_spacing_mm"] = float(spacing[0])
    except Exception:  # noqa: BLE001 - unparseable spacing is unknown spacing
        pass
    return meta
