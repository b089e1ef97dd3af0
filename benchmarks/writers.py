"""Who writes the part files: the driver (`writers: driver`) vs write tasks on the workers
(`writers: workers`), in one run.

Each measurement is `score_archive` in a fresh process with its own embedded Ray (all CPUs) on
the same archive (../shared/data/cxr PNGs, else phantoms), shipped default models and settings
but `writers`. Settings alternate, `--reps` times each. Reported: images/s (steady and overall),
seconds to the first result, and the driver process's CPU seconds per wall second (its share of
the machine). Every row must be ok (an all-error run would look fast).
Usage: python benchmarks/writers.py [-n 4096] [--reps 2] [-o benchmarks/results/writers.parquet]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import polars as pl

from cxrscreen.bench import machine_info, prepare_inputs

ROOT = Path(__file__).resolve().parents[1]

_RUN = """
import json, resource, shutil, sys, tempfile, time, os
from pathlib import Path
from cxrscreen.cluster import init_ray
from cxrscreen.pipeline.config import ScoreConfig
from cxrscreen.pipeline.score import score_archive

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

init_ray(None, os.cpu_count())
out = Path(tempfile.mkdtemp(prefix="cxr-writers-"))
c0, t0 = cpu(), time.perf_counter()
s = score_archive(sys.argv[1], out, ScoreConfig(writers=sys.argv[2]), progress=False)
wall = time.perf_counter() - t0
shutil.rmtree(out, ignore_errors=True)
print(json.dumps(dict(ok=s.ok, inputs=s.inputs,
                      images_per_s=s.images_per_s, images_per_s_steady=s.steady_images_per_s,
                      first_row_s=s.first_row_s, driver_cpu_share=(cpu() - c0) / wall)))
"""


def measure(archive: Path, writers: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run([sys.executable, "-c", _RUN, str(archive), writers], capture_output=True, text=True,
                         env=env, check=True, cwd=tempfile.gettempdir())
    r = json.loads(res.stdout.strip().splitlines()[-1])
    if r["ok"] != r["inputs"]:
        raise RuntimeError(f"writers={writers}: only {r['ok']} of {r['inputs']} rows ok")
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=4096)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("-o", "--out", default=str(ROOT / "benchmarks" / "results" / "writers.parquet"))
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cxr-writers-inputs-"))
    source = "cxr" if Path(a.shared, "cxr", "manifest.csv").exists() else "phantoms"
    archive = prepare_inputs(source, a.n, work, Path(a.shared))
    info, rows = machine_info(), []
    try:
        for rep in range(a.reps):
            for writers in ("driver", "workers"):
                r = measure(archive, writers)
                rows.append(dict(writers=writers, rep=rep, n=a.n, source=source, **r, **info))
                print(f"writers={writers}: {r['images_per_s_steady']:.1f} img/s steady, {r['images_per_s']:.1f} overall, "
                      f"first result {r['first_row_s']:.1f} s, driver CPU share {r['driver_cpu_share']:.3f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    df = pl.DataFrame(rows, infer_schema_length=None)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(a.out)
    print(df.group_by("writers").agg(pl.col("images_per_s_steady", "images_per_s", "first_row_s",
                                           "driver_cpu_share").mean()).sort("writers"))


if __name__ == "__main__":
    main()
