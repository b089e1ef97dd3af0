import polars as pl
from PIL import Image

from cxrscreen.data.dedup import audit_duplicates, drop_duplicates
from cxrscreen.data.manifest import read_manifest


def test_resized_reencoded_copy_found_and_dropped_from_test(phantom_archive, tmp_path):
    df = read_manifest(phantom_archive / "manifest.csv").filter(pl.col("format") == "png").head(8)
    df = df.with_columns(pl.Series("split", ["train"] * 4 + ["test"] * 4))
    # copy image 0 into the test split, resized and saved as JPEG
    src = Image.open(df["file"][0]).convert("L").resize((100, 100))
    copy = tmp_path / "copy.jpg"
    src.save(copy, quality=85)
    extra = df.head(1).with_columns(pl.lit("copy.jpg").alias("path"), pl.lit(str(copy)).alias("file"),
                                    pl.lit("test").alias("split"))
    df = pl.concat([df, extra])
    pairs = audit_duplicates(df)
    assert pairs.select("path_a", "path_b").rows() == [(df["path"][0], "copy.jpg")]
    assert pairs["cross_split"][0] and pairs["similarity"][0] > 0.99
    kept = drop_duplicates(df, pairs)
    assert len(kept) == len(df) - 1 and "copy.jpg" not in kept["path"].to_list()


def test_distinct_phantoms_are_not_duplicates(phantom_archive):
    df = read_manifest(phantom_archive / "manifest.csv")
    assert audit_duplicates(df).is_empty()
