"""Reading a Parquet archive into the pipeline: Ray's own reader (`ray.data.read_parquet`, as
`score` used until 2026-11-28) vs cxrscreen's read tasks (`listing.archive_datasource(...,
"parquet")`: one task per row group, key text and image bytes in blocks of 256 rows), in one run.

Each measurement is a fresh process with its own embedded Ray (2 CPUs unless `--cpus`) and the
pipeline's block size, reading the key and image columns of the same ingested archive (cxr
PNGs of ../shared/data ingested at 256 px, as `cxrscreen bench --ceiling` makes it; phantoms
without ../shared). Reported: seconds to build the dataset, to its first block and to its last
row, and the rows read (every row must arrive once). Readers alternate, `--reps` times each.
Usage: python benchmarks/parquet_read.py [-n 8192] [--reps 2] [-o benchmarks/results/parquet_read.parquet]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import polars as pl

from cxrscreen.bench import ceiling_inputs, machine_info

ROOT = Path(__file__).resolve().parents[1]

_RUN = """
import glob, json, sys, time
import ray
from cxrscreen.cluster import init_ray
from cxrscreen.pipeline.listing import archive_datasource

archive, reader, cpus = sys.argv[1], sys.argv[2], int(sys.argv[3])
init_ray(None, cpus)
t0 = time.perf_counter()
if reader == "ray_read_parquet":
    ds = ray.data.read_parquet(sorted(glob.glob(archive + "/*.parquet")), num_cpus=0.5).select_columns(["key", "image"])
else:
    source = archive_datasource(archive, "parquet", 16)
    ds = ray.data.read_datasource(source, override_num_blocks=len(source.parts), num_cpus=0.5)
ds.context.target_max_block_size = 16 * 256 * 256  # as score sets it: about one batch of work images
built = time.perf_counter() - t0
first, rows = None, 0
for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
    first = first if first is not None else time.perf_counter() - t0
    rows += block.num_rows
print(json.dumps(dict(build_s=built, first_block_s=first, all_rows_s=time.perf_counter() - t0, rows=rows)))
"""


def measure(archive: Path, reader: str, cpus: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run([sys.executable, "-c", _RUN, str(archive), reader, str(cpus)], capture_output=True,
                         text=True, env=env, check=True, cwd=tempfile.gettempdir())
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=8192)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("-o", "--out", default=str(ROOT / "benchmarks" / "results" / "parquet_read.parquet"))
    a = p.parse_args()
    source = "cxr" if Path(a.shared, "cxr", "manifest.csv").exists() else "phantoms"
    archive = ceiling_inputs(source, a.n, Path(tempfile.mkdtemp(prefix="cxr-pqread-")), Path(a.shared))["parquet"]
    info, rows = machine_info(), []
    for rep in range(a.reps):
        for reader in ("ray_read_parquet", "read_tasks"):
            r = measure(archive, reader, a.cpus)
            if r["rows"] != a.n:
                raise RuntimeError(f"{reader}: {r['rows']} rows read of {a.n}")
            rows.append(dict(reader=reader, rep=rep, n=a.n, source=source, cpus=a.cpus, **r, **info))
            print(f"{reader}: built {r['build_s']:.2f} s, first block {r['first_block_s']:.2f} s, "
                  f"all {r['rows']} rows {r['all_rows_s']:.2f} s", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows).write_parquet(a.out)


if __name__ == "__main__":
    main()
