"""Near-duplicate audit with a perceptual thumbnail fingerprint.

Each image becomes a 32x32 grayscale thumbnail (box filter), mean-removed and L2-normalised;
two images are near-duplicates when the cosine similarity of their fingerprints is at least
``threshold`` (0.99 by default, the rule the shared data set was deduplicated with). Unlike a
64-bit difference hash, which calls most chest radiographs "similar" because they share one
anatomy, the fingerprint keeps enough detail to separate different patients while surviving
resizing, re-encoding and small intensity changes.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from PIL import Image

from cxrscreen.io.decode import decode_image, read_bytes
from cxrscreen.io.errors import ImageError

SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}
THUMB = 32


def fingerprint(pixels: np.ndarray, size: int = THUMB) -> np.ndarray:
    """Mean-removed, unit-norm ``size`` x ``size`` thumbnail of a [0, 1] image (float32 vector)."""
    img = Image.fromarray(np.clip(pixels, 0, 1).astype(np.float32), mode="F")
    v = np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32).ravel()
    v = v - v.mean()
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def fingerprint_files(files: list[str]) -> np.ndarray:
    """Fingerprints of files (a zero vector, matching nothing, for undecodable files)."""
    out = np.zeros((len(files), THUMB * THUMB), dtype=np.float32)
    for i, f in enumerate(files):
        try:
            out[i] = fingerprint(decode_image(read_bytes(f), name=f).pixels)
        except ImageError:
            pass
    return out


def near_duplicate_pairs(prints: np.ndarray, threshold: float = 0.99, chunk: int = 1024) -> list[tuple[int, int, float]]:
    """All index pairs (i < j) with fingerprint cosine similarity >= ``threshold``."""
    pairs = []
    for s in range(0, len(prints), chunk):
        sim = prints[s:s + chunk] @ prints.T
        ii, jj = np.nonzero(sim >= threshold)
        for i, j in zip(ii, jj):
            if s + i < j:
                pairs.append((int(s + i), int(j), float(sim[i, j])))
    return sorted(pairs)


def audit_duplicates(df: pl.DataFrame, threshold: float = 0.99, prints: np.ndarray | None = None) -> pl.DataFrame:
    """Near-duplicate pairs of a manifest (needs ``file``): paths, labels, splits, similarity."""
    if prints is None:
        prints = fingerprint_files(df["file"].to_list())
    split = df["split"].to_list() if "split" in df.columns else [None] * len(df)
    rows = [{"path_a": df["path"][i], "path_b": df["path"][j], "label_a": df["label"][i],
             "label_b": df["label"][j], "split_a": split[i], "split_b": split[j], "similarity": s,
             "cross_split": split[i] != split[j], "index_a": i, "index_b": j}
            for i, j, s in near_duplicate_pairs(prints, threshold)]
    schema = {"path_a": pl.Utf8, "path_b": pl.Utf8, "label_a": pl.Utf8, "label_b": pl.Utf8,
              "split_a": pl.Utf8, "split_b": pl.Utf8, "similarity": pl.Float64, "cross_split": pl.Boolean,
              "index_a": pl.Int64, "index_b": pl.Int64}
    return pl.DataFrame(rows, schema=schema)


def drop_duplicates(df: pl.DataFrame, pairs: pl.DataFrame) -> pl.DataFrame:
    """Drop one image of each pair: the one in the later split (test > val > train), else the second."""
    drop = set()
    for r in pairs.iter_rows(named=True):
        a, b = r["index_a"], r["index_b"]
        if a in drop or b in drop:
            continue
        later_a = SPLIT_ORDER.get(r["split_a"], 0) > SPLIT_ORDER.get(r["split_b"], 0)
        drop.add(a if later_a else b)
    return df.with_row_index("_i").filter(~pl.col("_i").is_in(sorted(drop))).drop("_i")
