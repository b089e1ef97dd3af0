"""Manifests: one table of labeled images (path or bytes, label, source, patient_id, split)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from cxrscreen.io.sources import DEFAULT_LABEL_MAP, list_inputs

MANIFEST_COLUMNS = ("path", "label", "source", "patient_id", "split")


def read_manifest(path: str | Path, root: str | Path | None = None) -> pl.DataFrame:
    """Read a CSV or Parquet manifest; adds ``file`` = absolute image path (``root`` or the
    manifest's folder + ``path``). Missing optional columns are added empty."""
    path = Path(path)
    df = pl.read_parquet(path) if path.suffix in (".parquet", ".pq") else \
        pl.read_csv(path, schema_overrides={"patient_id": pl.Utf8}, infer_schema_length=10000)
    for col in ("path", "label"):
        if col not in df.columns:
            raise ValueError(f"{path}: manifest needs a {col!r} column (has {df.columns})")
    for col in ("source", "patient_id", "split"):
        if col not in df.columns:
            df = df.with_columns(pl.lit(None, pl.Utf8).alias(col))
    base = Path(root) if root is not None else path.parent
    return df.with_columns((pl.lit(str(base.resolve()) + "/") + pl.col("path")).alias("file"))


def read_seg_manifest(path: str | Path) -> pl.DataFrame:
    """Read ``seg/manifest.csv`` (image ``path`` + ``mask_path``, ``subset`` expert/pseudo):
    adds absolute ``file`` and ``mask_file``."""
    path = Path(path)
    df = pl.read_csv(path, schema_overrides={"patient_id": pl.Utf8}, infer_schema_length=10000)
    base = str(path.parent.resolve()) + "/"
    return df.with_columns((pl.lit(base) + pl.col("path")).alias("file"),
                           (pl.lit(base) + pl.col("mask_path")).alias("mask_file"))


def manifest_from_folder(folder: str | Path, label_map: dict[str, str] | None = None,
                         source: str | None = None) -> pl.DataFrame:
    """A manifest of a labeled folder tree (labels from sub-folder names, see DEFAULT_LABEL_MAP)."""
    folder = Path(folder)
    items = [it for it in list_inputs(folder, labels_from_folders=True,
                                      label_map=label_map or DEFAULT_LABEL_MAP)]
    unlabeled = [it.key for it in items if it.label is None]
    if unlabeled:
        raise ValueError(f"{len(unlabeled)} images have no class folder, e.g. {unlabeled[:3]}; "
                         "pass a label_map that names their folders")
    return pl.DataFrame({
        "path": [it.key for it in items], "label": [it.label for it in items],
        "source": [source or folder.name] * len(items), "patient_id": [None] * len(items),
        "split": [None] * len(items), "file": [str(Path(it.path).resolve()) for it in items],
    }, schema_overrides={"patient_id": pl.Utf8, "split": pl.Utf8})


def load_manifest(src: str | Path) -> pl.DataFrame:
    """A manifest from a manifest file (CSV/Parquet) or a labeled folder tree."""
    src = Path(src)
    return manifest_from_folder(src) if src.is_dir() else read_manifest(src)
