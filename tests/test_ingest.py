import hashlib

import polars as pl

from cxrscreen.data.ingest import ingest, read_shards
from cxrscreen.data.manifest import read_manifest
from cxrscreen.io import decode_image
from tests.conftest import shared_path


def test_roundtrip_bytes_and_labels_identical(phantom_archive, tmp_path):
    df = read_manifest(phantom_archive / "manifest.csv")
    shards = ingest(df, tmp_path / "shards", shard_size=10, progress=False)
    assert len(shards) == 5 and not list((tmp_path / "shards").glob(".*tmp"))
    back = read_shards(tmp_path / "shards")
    assert back["key"].to_list() == df["path"].to_list()
    assert back["label"].to_list() == df["label"].to_list()
    assert back["patient_id"].to_list() == df["patient_id"].to_list()
    assert back["split"].to_list() == df["split"].to_list()
    for key, data, sha in back.select("key", "image", "sha256").iter_rows():
        assert data == (phantom_archive / key).read_bytes()
        assert sha == hashlib.sha256(data).hexdigest()


def test_resize_and_error_rows(phantom_archive, tmp_path):
    df = read_manifest(phantom_archive / "manifest.csv").head(4)
    broken = df.head(1).with_columns(pl.lit("gone.png").alias("path"), pl.lit(str(tmp_path / "gone.png")).alias("file"))
    back = read_shards(ingest(pl.concat([df, broken]), tmp_path / "s", resize=64, progress=False)[0])
    assert len(back) == 5
    ok = back.filter(pl.col("error").is_null())
    assert len(ok) == 4 and all(decode_image(b).pixels.shape == (64, 64) for b in ok["image"])
    bad = back.filter(pl.col("error").is_not_null())
    assert bad["key"].to_list() == ["gone.png"] and bad["error"][0].startswith("missing")


def test_pgm_pixels_decode_to_the_same_image_as_png(phantom_archive, tmp_path):
    """``--pixels pgm`` stores the very pixels the PNG holds (lossless both), as binary PGM."""
    import pytest

    df = read_manifest(phantom_archive / "manifest.csv").head(6)
    png = read_shards(ingest(df, tmp_path / "png", resize=96, progress=False)[0])
    pgm = read_shards(ingest(df, tmp_path / "pgm", resize=96, progress=False, pixels="pgm")[0])
    for a, b in zip(png["image"], pgm["image"]):
        assert b.startswith(b"P5\n96 96\n255\n") and len(b) == len(b"P5\n96 96\n255\n") + 96 * 96
        da, db = decode_image(a), decode_image(b)
        assert db.format == "pgm" and (da.pixels == db.pixels).all()
    with pytest.raises(ValueError, match="resize"):
        ingest(df, tmp_path / "x", pixels="pgm", progress=False)


def test_shared_cxr_subset(tmp_path):
    df = read_manifest(shared_path("cxr", "manifest.csv"))
    sub = df.filter(pl.col("split") == "val").head(50)
    back = read_shards(ingest(sub, tmp_path, progress=False)[0])
    assert back["sha256"].to_list() == sub["sha256"].to_list()  # manifest hashes match the bytes


def test_shared_seg_manifest_masks_align():
    import numpy as np

    from cxrscreen.data.manifest import read_seg_manifest
    from cxrscreen.io import read_bytes

    df = read_seg_manifest(shared_path("seg", "manifest.csv"))
    assert set(df["subset"]) == {"expert", "pseudo"} and (df["subset"] == "expert").sum() == 12
    for row in df.filter(pl.col("subset") == "expert").head(3).iter_rows(named=True):
        img = decode_image(read_bytes(row["file"])).pixels
        mask = decode_image(read_bytes(row["mask_file"])).pixels > 0.5
        assert img.shape == mask.shape == (256, 256)
        assert abs(mask.mean() - row["mask_fraction"]) < 0.01
    assert df.filter(pl.col("subset") == "pseudo")["cxr_split"].is_in(["train", "val"]).all()
    assert np.isfinite(df["mask_fraction"].to_numpy()).all()
