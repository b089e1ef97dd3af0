"""Issue 17.15: 1,000+ generated malformed files mixed with good phantoms through the real
pipeline: exactly one row per input, no good file lost, the run ends normally."""

import io
import zlib

import numpy as np
import polars as pl
import pytest

from cxrscreen.data.synth import encode_dicom, encode_jpeg, encode_png, make_phantom, write_bad_inputs
from cxrscreen.pipeline import ScoreConfig, score_archive

FAST = dict(classifier="mobilenet_v3_small", allow_untrained=True, batch_size=64, rows_per_file=500)


def _odd_dicoms(image: np.ndarray) -> dict[str, bytes]:
    """DICOMs written with pydicom that break the rules in the ways archives do."""
    import pydicom

    base = encode_dicom(image, "m2_16bit_window")
    out = {}
    edits = {
        "rows_zero": lambda ds: setattr(ds, "Rows", 0),
        "columns_huge": lambda ds: setattr(ds, "Columns", 60000),
        "bits_allocated_8": lambda ds: (setattr(ds, "BitsAllocated", 8), setattr(ds, "BitsStored", 8),
                                        setattr(ds, "HighBit", 7)),
        "bits_allocated_32": lambda ds: setattr(ds, "BitsAllocated", 32),
        "photometric_ybr": lambda ds: setattr(ds, "PhotometricInterpretation", "YBR_FULL"),
        "photometric_missing": lambda ds: delattr(ds, "PhotometricInterpretation"),
        "frames_3": lambda ds: setattr(ds, "NumberOfFrames", 3),
        "samples_3": lambda ds: setattr(ds, "SamplesPerPixel", 3),
        "window_width_zero": lambda ds: setattr(ds, "WindowWidth", 0),
        "slope_zero": lambda ds: setattr(ds, "RescaleSlope", 0),
        "no_transfer_syntax": lambda ds: delattr(ds.file_meta, "TransferSyntaxUID"),
        "unknown_syntax": lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", "1.2.3.4.5.6"),
        "pixel_data_empty": lambda ds: setattr(ds, "PixelData", b""),
        "pixel_data_odd": lambda ds: setattr(ds, "PixelData", ds.PixelData[:-1]),
    }
    for name, edit in edits.items():
        ds = pydicom.dcmread(io.BytesIO(base))
        edit(ds)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=False)
        out[f"{name}.dcm"] = buf.getvalue()
    return out


def write_fuzz_archive(folder, n_good: int = 24, seed: int = 0) -> tuple[list[str], int]:
    """Good phantoms (PNG, JPEG, DICOM) and 1,000+ malformed files; returns (good keys, total)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    good: dict[str, bytes] = {}
    for i in range(n_good):
        img = make_phantom(("covid", "normal", "viral_pneumonia")[i % 3], 96, seed + i).image
        ext, enc = ((".png", encode_png), (".jpg", encode_jpeg), (".dcm", encode_dicom))[i % 3]
        good[f"good/{i:03d}{ext}"] = enc(img)
    bad: dict[str, bytes] = {}
    for key, data in good.items():
        stem, ext = key[5:-4], key[-4:]
        for k, cut in enumerate(rng.integers(1, len(data) - 1, 20)):  # truncations at many offsets
            bad[f"cut/{stem}_{k}{ext}"] = data[:cut]
        for k in range(20):  # bit flips, header and body
            flipped = bytearray(data)
            for pos in rng.integers(0, min(len(data), 256 if k < 10 else len(data)), 1 + k % 4):
                flipped[pos] ^= 1 << int(rng.integers(0, 8))
            bad[f"flip/{stem}_{k}{ext}"] = bytes(flipped)
        bad[f"zeros/{stem}{ext}"] = bytes(len(data))
        bad[f"padded/{stem}{ext}"] = data + bytes(int(rng.integers(1, 4096)))  # trailing junk: still good?
    for k in range(80):
        ext = (".png", ".jpg", ".dcm", ".tif", ".bmp", "")[k % 6]
        bad[f"random/r{k}{ext or '.jpeg'}"] = rng.bytes(int(rng.integers(1, 20000)))
    for k, side in enumerate((3000, 9000, 20000, 40000, 65535)):  # decompression bombs: tiny files, huge images
        row = b"\x00" + bytes(side)
        raw = zlib.compress(row * 8, 9)
        ihdr = side.to_bytes(4, "big") + side.to_bytes(4, "big") + b"\x08\x00\x00\x00\x00"
        chunk = (lambda t, d: len(d).to_bytes(4, "big") + t + d + zlib.crc32(t + d).to_bytes(4, "big"))
        bad[f"bomb/b{k}.png"] = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    for name, data in _odd_dicoms(make_phantom("normal", 64, 3).image).items():
        bad[f"dicom/{name}"] = data
    for key, data in {**good, **bad}.items():
        path = folder / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    write_bad_inputs(folder / "kinds")
    total = sum(1 for p in folder.rglob("*") if p.is_file())
    return sorted(good), total


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_thousand_malformed_files_one_row_each_no_good_file_lost(tmp_path, ray_2cpu):
    good, total = write_fuzz_archive(tmp_path / "arch")
    assert total >= 1000
    s = score_archive(tmp_path / "arch", tmp_path / "out", ScoreConfig(**FAST), progress=False)
    df = pl.read_parquet(tmp_path / "out" / "*.parquet")
    assert s.inputs == df.height and df["key"].n_unique() == df.height and not s.missing
    # every listed input has its row (extension-less random files are not inputs: no DICOM magic)
    rows = dict(zip(df["key"], df["status"]))
    assert all(rows.get(k) == "ok" for k in good), [k for k in good if rows.get(k) != "ok"]
    kind = df.with_columns(group=pl.col("key").str.split("/").list.first())
    for group in ("zeros", "random"):
        assert set(kind.filter(pl.col("group") == group)["error_type"]) == {"not_image"}
    assert kind.filter(pl.col("key").str.contains("bomb/b[1-4]"))["error_type"].to_list() == ["too_large"] * 4
    cut = kind.filter(pl.col("group") == "cut")
    assert (cut["status"] == "error").mean() > 0.95  # a cut that spares every pixel may still decode
    errors = df.filter(pl.col("status") == "error")
    assert errors.height > 700 and errors["error_type"].null_count() == 0
    assert errors["error_message"].null_count() == 0 and (errors["error_message"].str.len_chars() > 5).all()
    assert errors["refer"].all()
