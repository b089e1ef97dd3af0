"""Handing a big archive to Ray, and the resume index of a big OUT, in one run.

A list file of `-n` paths (the files need not exist: nothing is read), handed over as a list of
dicts (`ray.data.from_items`, first), as an Arrow table built on the driver in chunks
(`listing.pending_items` + `ray.data.from_arrow`; now single images and `--limit`), and as read
tasks that list byte ranges of the file (`listing.archive_datasource`; list files now); each way
timed from the file to a Ray dataset ready to stream and to its first block of inputs in the
driver's hands, the driver's memory growth (RSS) taken after that. An OUT of `-n` rows (part
files of 1,000 rows with the real key and content-hash columns): the resume index read as text
(before) and as hashes (`output.ResumeIndex`, now), and the end-of-run count against it (the list
read again in chunks, `score._missing_and_stale`). A folder tree of `--tree` tiny files (100
folders): listed on the driver (before) and by read tasks per folder (now).
Usage: python benchmarks/listing.py [-n 1000000] [--tree 100000] [-o benchmarks/results/listing.parquet]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import tempfile
import time
from pathlib import Path

import polars as pl
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from cxrscreen.bench import machine_info
from cxrscreen.cluster import init_ray
from cxrscreen.io.sources import list_inputs
from cxrscreen.pipeline.config import ScoreConfig
from cxrscreen.pipeline.listing import archive_datasource, input_key_chunks, pending_items
from cxrscreen.pipeline.output import output_index
from cxrscreen.pipeline.score import _missing_and_stale

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def as_dicts(ray, archive: Path, cfg: ScoreConfig):
    """What score did before: one dict per input, then from_items in blocks of batch_size rows."""
    items = [{"key": it.key, "path": os.fsencode(it.path), "expected_sha": None} for it in list_inputs(archive)]
    return ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // cfg.batch_size, 20_000))), items


def as_arrow(ray, archive: Path, cfg: ScoreConfig):
    """A table listed on the driver (what score does for single images and --limit)."""
    items = pending_items(archive, output_index(archive.parent / "no-out"))
    step = max(cfg.batch_size, -(-items.num_rows // 200))
    return ray.data.from_arrow([items.slice(i, step) for i in range(0, items.num_rows, step)]), items


def streamed(ray, archive: Path, kind: str, cfg: ScoreConfig):
    """Read tasks list byte ranges of a list file or folders of a tree (what score does now)."""
    source = archive_datasource(archive, kind, cfg.batch_size)
    return ray.data.read_datasource(source, override_num_blocks=len(source.parts)), source


def timed(rows: list, way: str, n: int, make) -> None:
    """Time ``make()`` (a dataset and what keeps it alive) to ready and to its first block."""
    gc.collect()
    before, t0 = _rss_mb(), time.perf_counter()
    ds, keep = make()
    ready = time.perf_counter() - t0
    first = next(iter(ds.iter_batches(batch_size=None, batch_format="pyarrow")))
    seconds, grown = time.perf_counter() - t0, _rss_mb() - before
    rows.append(dict(way=way, n=n, seconds=ready, first_block_s=seconds, first_block_rows=first.num_rows,
                     driver_rss_growth_mb=grown, **machine_info()))
    print(f"{way}: ready {ready:.1f} s, first block of {first.num_rows} inputs {seconds:.1f} s, "
          f"driver RSS +{grown:.0f} MB", flush=True)
    del ds, keep, first


def text_index(out: Path) -> pa.Table:
    """The resume index as it was before: every key and content hash of OUT as Arrow text."""
    return pa.concat_tables([pq.read_table(f, columns=["key", "sha256"]) for f in sorted(out.glob("part-*.parquet"))])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=1_000_000)
    p.add_argument("--tree", type=int, default=100_000)
    p.add_argument("-o", "--out", default=str(ROOT / "benchmarks" / "results" / "listing.parquet"))
    a = p.parse_args()
    archive = Path(tempfile.mkdtemp(prefix="cxr-list-")) / "inputs.txt"
    keys = [f"images/{i // 1000:05d}/{i:08d}.png" for i in range(a.n)]
    archive.write_text("".join(k + "\n" for k in keys))
    ray, cfg, rows = init_ray(None, os.cpu_count()), ScoreConfig(), []
    timed(rows, "list of dicts + from_items (first)", a.n, lambda: as_dicts(ray, archive, cfg))
    timed(rows, "Arrow table on the driver + from_arrow", a.n, lambda: as_arrow(ray, archive, cfg))
    timed(rows, "read tasks list byte ranges (list files now)", a.n,
          lambda: streamed(ray, archive, "list", cfg))
    # an OUT of n rows: the resume index before (text) and now (hashes), and the end-of-run count
    out = archive.parent / "out"
    out.mkdir()
    sha = [hashlib.sha256(k.encode()).hexdigest() for k in keys]
    for i in range(0, a.n, 1000):
        pq.write_table(pa.table({"key": keys[i:i + 1000], "sha256": sha[i:i + 1000]}),
                       out / f"part-20260101T000000-aaaaaa-{i // 1000:05d}.parquet")
    del sha
    for way, read in (("resume index of OUT as text (before)", text_index),
                      ("resume index of OUT as key hashes (ResumeIndex, now)", output_index)):
        gc.collect()
        before, t0 = _rss_mb(), time.perf_counter()
        index = read(out)
        seconds, grown = time.perf_counter() - t0, _rss_mb() - before
        held = (index.nbytes if isinstance(index, pa.Table) else
                index.hashes.nbytes + index.sha.nbytes + index.run.nbytes) / 2**20
        rows.append(dict(way=way, n=index.num_rows, seconds=seconds, driver_rss_growth_mb=grown, index_mb=held,
                         **machine_info()))
        print(f"{way}: {index.num_rows} rows in {seconds:.1f} s, {held:.0f} MB held, driver RSS +{grown:.0f} MB",
              flush=True)
        del index
    index = output_index(out)
    gc.collect()
    before, t0 = _rss_mb(), time.perf_counter()
    missing, stale, n, _ = _missing_and_stale(input_key_chunks(archive, "list", chunk=index.num_rows), index)
    seconds, grown = time.perf_counter() - t0, _rss_mb() - before
    assert n == a.n and not missing and not len(stale)
    rows.append(dict(way="end of a streamed run: the list read again and compared with OUT's index", n=n,
                     seconds=seconds, driver_rss_growth_mb=grown, **machine_info()))
    print(f"end-of-run count of {n} inputs against {index.num_rows} rows: {seconds:.1f} s, "
          f"driver RSS +{grown:.0f} MB", flush=True)
    del index, keys
    tree = archive.parent / "tree"
    for i in range(a.tree):
        (tree / f"d{i % 100:03d}").mkdir(parents=True, exist_ok=True)
        (tree / f"d{i % 100:03d}" / f"{i:07d}.png").write_bytes(b"x")
    timed(rows, "folder tree: Arrow table on the driver + from_arrow (before)", a.tree,
          lambda: as_arrow(ray, tree, cfg))
    timed(rows, "folder tree: read tasks list folders (now)", a.tree, lambda: streamed(ray, tree, "folder", cfg))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows, infer_schema_length=None).write_parquet(a.out)


if __name__ == "__main__":
    main()
