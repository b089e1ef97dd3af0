"""Reading an ingested Parquet shard folder vs reading the original image folder.

Both produce the same thing: every image's encoded bytes with its label. Page cache is
warmed for both before timing (best of 3), so the comparison is of file-count overhead,
not of disk speed. Usage: python benchmarks/ingest_read.py [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import polars as pl

from cxrscreen.bench import machine_info
from cxrscreen.data.ingest import ingest, read_shards
from cxrscreen.data.manifest import read_manifest
from cxrscreen.data.synth import write_archive


def read_folder(df: pl.DataFrame) -> int:
    n = 0
    for f, label in zip(df["file"], df["label"]):
        with open(f, "rb") as fh:
            n += len(fh.read()) > 0 and label is not None
    return n


def best_of(fn, k=3) -> float:
    fn()
    times = []
    for _ in range(k):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default="../shared/data")
    ap.add_argument("-o", "--out", default="benchmarks/results/ingest_read.parquet")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cxr-ingest-"))
    manifest = Path(args.shared) / "cxr" / "manifest.csv"
    if manifest.exists():
        source, df = "shared cxr (5300 PNG)", read_manifest(manifest)
    else:
        source, df = "phantoms (2000 PNG)", read_manifest(write_archive(work / "ph", 2000, size=224))
    ingest(df, work / "shards", shard_size=1000, progress=False)
    t_folder = best_of(lambda: read_folder(df))
    t_shards = best_of(lambda: read_shards(work / "shards", columns=["image", "label"]).height)
    rows = [dict(source=source, n=len(df), mode=m, seconds=t, images_per_s=len(df) / t, **machine_info())
            for m, t in (("folder", t_folder), ("parquet_shards", t_shards))]
    out = pl.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out.write_parquet(args.out)
    print(out.select("source", "n", "mode", "seconds", "images_per_s"))
    print(f"shards / folder speed-up: {t_folder / t_shards:.1f}x")


if __name__ == "__main__":
    main()
