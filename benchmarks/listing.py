"""Handing a big list archive to Ray, in one run: a list of dicts (`ray.data.from_items`, first),
an Arrow table built on the driver in chunks (`listing.pending_items` + `ray.data.from_arrow`;
now for folder trees and `--limit`), and read tasks that list byte ranges of the file
(`listing.list_file_datasource`; now for list files).

A list file of `-n` paths (the files need not exist: nothing is read); each way is timed from
the list file to a Ray dataset ready to stream and to its first block of inputs in the driver's
hands, and the driver's memory growth (RSS) is taken after that. The streamed way's count at the
end of a run (`score._missing_and_stale` over the list read again in chunks) is timed too. Also a
folder tree of `--tree` tiny files (100 folders), listed the way score lists it.
Usage: python benchmarks/listing.py [-n 1000000] [--tree 100000] [-o benchmarks/results/listing.parquet]
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

import polars as pl
import psutil
import pyarrow as pa

from cxrscreen.bench import machine_info
from cxrscreen.cluster import init_ray
from cxrscreen.io.sources import list_inputs
from cxrscreen.pipeline.config import ScoreConfig
from cxrscreen.pipeline.listing import input_key_chunks, list_file_datasource, pending_items
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
    """A table listed on the driver (what score does for folder trees and --limit)."""
    items = pending_items(archive, output_index(archive.parent / "no-out"))
    step = max(cfg.batch_size, -(-items.num_rows // 200))
    return ray.data.from_arrow([items.slice(i, step) for i in range(0, items.num_rows, step)]), items


def streamed(ray, archive: Path, cfg: ScoreConfig):
    """Read tasks list byte ranges of the file (what score does for list files)."""
    source = list_file_datasource(archive, cfg.batch_size)
    return ray.data.read_datasource(source, override_num_blocks=len(source.ranges)), source


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=1_000_000)
    p.add_argument("--tree", type=int, default=100_000)
    p.add_argument("-o", "--out", default=str(ROOT / "benchmarks" / "results" / "listing.parquet"))
    a = p.parse_args()
    archive = Path(tempfile.mkdtemp(prefix="cxr-list-")) / "inputs.txt"
    archive.write_text("".join(f"images/{i // 1000:05d}/{i:08d}.png\n" for i in range(a.n)))
    ray, cfg, rows = init_ray(None, os.cpu_count()), ScoreConfig(), []
    ways = (("list of dicts + from_items (first)", as_dicts), ("Arrow table on the driver + from_arrow", as_arrow),
            ("read tasks list byte ranges (list files now)", streamed))
    for name, way in ways:
        gc.collect()
        before, t0 = _rss_mb(), time.perf_counter()
        ds, items = way(ray, archive, cfg)
        ready = time.perf_counter() - t0
        first = next(iter(ds.iter_batches(batch_size=None, batch_format="pyarrow")))
        seconds, grown = time.perf_counter() - t0, _rss_mb() - before
        rows.append(dict(way=name, n=a.n, seconds=ready, first_block_s=seconds, first_block_rows=first.num_rows,
                         driver_rss_growth_mb=grown, **machine_info()))
        print(f"{name}: ready {ready:.1f} s, first block of {first.num_rows} inputs {seconds:.1f} s, "
              f"driver RSS +{grown:.0f} MB", flush=True)
        del ds, items, first
    # the end of a streamed run: the list read again and compared with OUT's keys (every input has a row)
    have = pa.array([f"images/{i // 1000:05d}/{i:08d}.png" for i in range(a.n)], pa.string())
    gc.collect()
    before, t0 = _rss_mb(), time.perf_counter()
    missing, stale, n = _missing_and_stale(input_key_chunks(archive, "list", chunk=len(have)), have)
    seconds, grown = time.perf_counter() - t0, _rss_mb() - before
    assert n == a.n and not missing and not len(stale)
    rows.append(dict(way="end of a streamed run: the list read again and compared with OUT's keys", n=n,
                     seconds=seconds, driver_rss_growth_mb=grown, **machine_info()))
    print(f"end-of-run count of {n} inputs against {len(have)} rows: {seconds:.1f} s, driver RSS +{grown:.0f} MB",
          flush=True)
    del have
    tree = archive.parent / "tree"
    for i in range(a.tree):
        (tree / f"d{i % 100:03d}").mkdir(parents=True, exist_ok=True)
        (tree / f"d{i % 100:03d}" / f"{i:07d}.png").write_bytes(b"x")
    before, t0 = _rss_mb(), time.perf_counter()
    ds, items = as_arrow(ray, tree, cfg)
    ready = time.perf_counter() - t0
    first = next(iter(ds.iter_batches(batch_size=None, batch_format="pyarrow")))
    seconds, grown = time.perf_counter() - t0, _rss_mb() - before
    rows.append(dict(way="folder tree: Arrow table on the driver + from_arrow (now)", n=items.num_rows, seconds=ready,
                     first_block_s=seconds, first_block_rows=first.num_rows, driver_rss_growth_mb=grown,
                     **machine_info()))
    print(f"folder tree of {items.num_rows} files: ready {ready:.1f} s, first block {seconds:.1f} s, "
          f"driver RSS +{grown:.0f} MB", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows, infer_schema_length=None).write_parquet(a.out)


if __name__ == "__main__":
    main()
