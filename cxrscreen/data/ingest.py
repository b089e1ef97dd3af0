"""Ingest a labeled image collection into sharded Parquet (encoded image bytes + labels)."""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from cxrscreen.io.decode import as_uint8, decode_image, read_bytes
from cxrscreen.io.errors import ImageError

SHARD_SCHEMA = pa.schema([
    ("key", pa.string()), ("image", pa.binary()), ("label", pa.string()), ("source", pa.string()),
    ("patient_id", pa.string()), ("split", pa.string()), ("sha256", pa.string()),
    ("error", pa.string()),
])


PIXEL_FORMATS = ("png", "pgm")  # how ``--resize`` re-encodes: compact, or raw pixels (about 4% of PNG's decode time)


def _load(file: str, resize: int | None, encoding: str = "png") -> tuple[bytes | None, str | None]:
    """Original bytes, or the image resized to ``resize`` x ``resize`` (aspect ignored, as the
    papers do) and re-encoded as 8-bit ``encoding``: PNG, or PGM (raw pixels behind a short header,
    pre-decoded: 2.2x PNG's size, decoded in 0.06 vs 0.8 ms at 256 px, benchmarks/README.md).
    Undecodable files are kept as rows with an error instead of bytes."""
    try:
        data = read_bytes(file)
        if resize is None:
            return data, None
        decoded = decode_image(data, name=file)
    except ImageError as e:
        return None, f"{e.kind}: {e.reason}"
    img = Image.fromarray(as_uint8(decoded.data)).resize((resize, resize), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PPM" if encoding == "pgm" else "PNG")  # Pillow writes an L image as binary PGM
    return buf.getvalue(), None


def write_atomic_parquet(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` via a hidden temporary file and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def ingest(manifest: pl.DataFrame, out_dir: str | Path, shard_size: int = 1000,
           resize: int | None = None, workers: int | None = None, progress: bool = True,
           pixels: str = "png") -> list[Path]:
    """Write ``manifest`` (needs ``file``, ``path``, ``label``) as ``shard-XXXXX.parquet`` files;
    with ``resize``, images re-encoded at that size as ``pixels`` (``PIXEL_FORMATS``).

    Each row carries the encoded image bytes, its sha256 and the label columns; a file that
    cannot be read is kept as a row with ``error`` set (nothing is dropped silently).
    """
    if pixels not in PIXEL_FORMATS:
        raise ValueError(f"pixels {pixels!r}: expected one of {', '.join(PIXEL_FORMATS)}")
    if pixels != "png" and resize is None:
        raise ValueError("pixels is how --resize re-encodes: give resize too (without it the original bytes are kept)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    rows = manifest.to_dicts()
    shards = []
    bar = tqdm(total=len(rows), unit="img", desc="ingest", disable=not progress)
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(rows), shard_size):
            chunk = rows[start:start + shard_size]
            loaded = list(pool.map(lambda r: _load(r["file"], resize, pixels), chunk))
            cols = {k: [] for k in SHARD_SCHEMA.names}
            for r, (data, err) in zip(chunk, loaded):
                cols["key"].append(r["path"])
                cols["image"].append(data)
                for k in ("label", "source", "patient_id", "split"):
                    v = r.get(k)
                    cols[k].append(None if v is None else str(v))
                cols["sha256"].append(hashlib.sha256(data).hexdigest() if data else None)
                cols["error"].append(err)
            path = out / f"shard-{start // shard_size:05d}.parquet"
            write_atomic_parquet(pa.table(cols, schema=SHARD_SCHEMA), path)
            shards.append(path)
            bar.update(len(chunk))
    bar.close()
    return shards


def read_shards(path: str | Path, columns: list[str] | None = None) -> pl.DataFrame:
    """All rows of an ingested shard folder (or one shard file)."""
    path = Path(path)
    files = sorted(path.glob("shard-*.parquet")) if path.is_dir() else [path]
    return pl.concat([pl.read_parquet(f, columns=columns) for f in files])
