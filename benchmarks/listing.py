"""Handing a big list archive to Ray: a list of dicts (`ray.data.from_items`, before) vs an Arrow
table built in chunks (`score._pending_items` + `ray.data.from_arrow`, now), in one run.

A list file of `-n` paths (the files need not exist: nothing is read); each way is timed from
the list file to a Ray dataset ready to stream, and the driver's memory growth (RSS) is taken
after it. Also a folder tree of `--tree` tiny files (100 folders), listed the way score lists now.
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

from cxrscreen.bench import machine_info
from cxrscreen.cluster import init_ray
from cxrscreen.io.sources import list_inputs
from cxrscreen.pipeline.config import ScoreConfig
from cxrscreen.pipeline.score import _pending_items

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def as_dicts(ray, archive: Path, cfg: ScoreConfig):
    """What score did before: one dict per input, then from_items in blocks of batch_size rows."""
    items = [{"key": it.key, "path": os.fsencode(it.path), "expected_sha": None} for it in list_inputs(archive)]
    return ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // cfg.batch_size, 20_000))), items


def as_arrow(ray, archive: Path, cfg: ScoreConfig):
    """What score does now (pipeline/score.py)."""
    items = _pending_items(archive, cfg, {})
    step = max(cfg.batch_size, -(-items.num_rows // 200))
    return ray.data.from_arrow([items.slice(i, step) for i in range(0, items.num_rows, step)]), items


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=1_000_000)
    p.add_argument("--tree", type=int, default=100_000)
    p.add_argument("-o", "--out", default=str(ROOT / "benchmarks" / "results" / "listing.parquet"))
    a = p.parse_args()
    archive = Path(tempfile.mkdtemp(prefix="cxr-list-")) / "inputs.txt"
    archive.write_text("".join(f"images/{i // 1000:05d}/{i:08d}.png\n" for i in range(a.n)))
    ray, cfg, rows = init_ray(None, os.cpu_count()), ScoreConfig(), []
    for name, way in (("list of dicts + from_items (before)", as_dicts), ("Arrow table + from_arrow (now)", as_arrow)):
        gc.collect()
        before, t0 = _rss_mb(), time.perf_counter()
        ds, items = way(ray, archive, cfg)
        seconds, grown = time.perf_counter() - t0, _rss_mb() - before
        rows.append(dict(way=name, n=a.n, seconds=seconds, driver_rss_growth_mb=grown, **machine_info()))
        print(f"{name}: {seconds:.1f} s, driver RSS +{grown:.0f} MB", flush=True)
        del ds, items
    tree = archive.parent / "tree"
    for i in range(a.tree):
        (tree / f"d{i % 100:03d}").mkdir(parents=True, exist_ok=True)
        (tree / f"d{i % 100:03d}" / f"{i:07d}.png").write_bytes(b"x")
    before, t0 = _rss_mb(), time.perf_counter()
    ds, items = as_arrow(ray, tree, cfg)
    seconds, grown = time.perf_counter() - t0, _rss_mb() - before
    rows.append(dict(way="folder tree: Arrow table + from_arrow (now)", n=items.num_rows, seconds=seconds,
                     driver_rss_growth_mb=grown, **machine_info()))
    print(f"folder tree of {items.num_rows} files: {seconds:.1f} s, driver RSS +{grown:.0f} MB", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows, infer_schema_length=None).write_parquet(a.out)


if __name__ == "__main__":
    main()
