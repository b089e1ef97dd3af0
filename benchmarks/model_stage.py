"""One fused model stage vs two actor pools, and the start-up of `cxrscreen score`, in one run.

(1) Steady state: `score_archive` on the same archive (../shared/data/cxr PNGs, else phantoms)
with the segmenter and classifier fused in one actor pool (`fused: true`) and in two pools,
alternating, `--reps` times each, on one embedded Ray; also the driver's CPU seconds per
wall second (its share of the machine: Arrow conversion, part files, progress).
(2) Start-up: `cxrscreen score --json` in a fresh process on 32 images, each setting (fused or
not, the driver scoring the first batch itself or not: `first_batch_on_driver`) `--reps` times:
`first_row_s` (seconds from the start of scoring to the first result) and the process's wall
time (imports and Ray start included).
With ``--start-up-only``: cold starts of the default settings alone, alternating: a folder with
Ray's idle workers for the driver (``RAY_prestart_worker_first_driver``) off, as ``init_ray``
now sets, and on; the same 32 images ingested as Parquet (256 px), with the driver scoring its
first batch (now) and without (as Parquet archives were scored before).
Usage: python benchmarks/model_stage.py [-n 1024] [--reps 2] [--start-up-only] [-o benchmarks/results/model_stage.parquet]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

from cxrscreen.bench import ceiling_inputs, machine_info, prepare_inputs
from cxrscreen.cluster import init_ray
from cxrscreen.pipeline.config import ScoreConfig
from cxrscreen.pipeline.score import score_archive

ROOT = Path(__file__).resolve().parents[1]


def _driver_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def steady(archive: Path, fused: bool) -> dict:
    out = Path(tempfile.mkdtemp(prefix="cxr-stage-"))
    cpu0, t0 = _driver_cpu(), time.perf_counter()
    try:
        s = score_archive(archive, out, dataclasses.replace(ScoreConfig(), fused=fused), progress=False)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    wall = time.perf_counter() - t0
    if s.ok != s.inputs:  # a timing of error rows measures nothing
        raise RuntimeError(f"fused={fused}: only {s.ok} of {s.inputs} rows ok")
    return dict(images_per_s=s.images_per_s, images_per_s_steady=s.steady_images_per_s, first_row_s=s.first_row_s,
                driver_cpu_share=(_driver_cpu() - cpu0) / wall, ok=s.ok)


def cold_start(archive: Path, fused: bool, on_driver: bool, prestart: bool = False) -> dict:
    out = Path(tempfile.mkdtemp(prefix="cxr-start-"))
    t0 = time.perf_counter()
    try:
        res = subprocess.run([str(Path(sys.executable).with_name("cxrscreen")), "score", str(archive), "-o", str(out),
                              "--json", "--no-worklist", "--set", f"fused={str(fused).lower()}",
                              "--set", f"first_batch_on_driver={str(on_driver).lower()}"],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "RAY_prestart_worker_first_driver": str(int(prestart))})
    finally:
        shutil.rmtree(out, ignore_errors=True)
    s = json.loads(res.stdout.strip().splitlines()[-1])
    if s["ok"] != s["inputs"]:
        raise RuntimeError(f"fused={fused}: only {s['ok']} of {s['inputs']} rows ok")
    return dict(first_row_s=s["first_row_s"], process_wall_s=time.perf_counter() - t0, ok=s["ok"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=1024)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("-o", "--out", default=str(ROOT / "benchmarks" / "results" / "model_stage.parquet"))
    p.add_argument("--start-up-only", action="store_true",
                   help="only cold starts: default settings, Ray's idle workers for the driver off (now) vs on (before)")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cxr-stage-inputs-"))
    source = "cxr" if Path(a.shared, "cxr", "manifest.csv").exists() else "phantoms"
    archive = prepare_inputs(source, a.n, work, Path(a.shared))
    small = prepare_inputs(source, 32, work / "small", Path(a.shared))
    info, rows = machine_info(), []
    parquet = ceiling_inputs(source, 32, work / "parquet", Path(a.shared))["parquet"] if a.start_up_only else None
    for rep in range(a.reps if a.start_up_only else 0):  # alternating, so that drift hits both alike
        for archive_kind, on_driver, prestart in (("folder", True, False), ("folder", True, True),
                                                  ("parquet", True, False), ("parquet", False, False)):
            r = cold_start(parquet if archive_kind == "parquet" else small, False, on_driver, prestart)
            rows.append(dict(mode="start_up", archive=archive_kind, fused=False, first_batch_on_driver=on_driver,
                             prestart_workers=prestart, rep=rep, n=32, source=source, **r, **info))
            print(f"start-up {archive_kind} first_batch_on_driver={on_driver} prestart_workers={prestart}: first result "
                  f"after {r['first_row_s']:.2f} s, process {r['process_wall_s']:.2f} s", flush=True)
    for rep in range(0 if a.start_up_only else a.reps):  # cold starts first, with no Ray of this process running
        for fused in (True, False):
            for on_driver in (True, False):
                r = cold_start(small, fused, on_driver)
                rows.append(dict(mode="start_up", fused=fused, first_batch_on_driver=on_driver, rep=rep, n=32,
                                 source=source, **r, **info))
                print(f"start-up fused={fused} first_batch_on_driver={on_driver}: first result after "
                      f"{r['first_row_s']:.2f} s, process {r['process_wall_s']:.2f} s", flush=True)
    if not a.start_up_only:
        init_ray(None, os.cpu_count())
    for rep in range(0 if a.start_up_only else a.reps):
        for fused in (True, False):
            r = steady(archive, fused)
            rows.append(dict(mode="pipeline", fused=fused, rep=rep, n=a.n, source=source, **r, **info))
            print(f"pipeline fused={fused}: {r['images_per_s_steady']:.1f} img/s steady, {r['images_per_s']:.1f} overall, "
                  f"driver CPU share {r['driver_cpu_share']:.2f}", flush=True)
    df = pl.DataFrame(rows, infer_schema_length=None)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(a.out)
    keys = ["mode", "fused", "first_batch_on_driver"] + (["archive", "prestart_workers"] if a.start_up_only else [])
    print(df.group_by(keys).agg(pl.col(c).mean() for c in ("images_per_s_steady", "first_row_s", "driver_cpu_share",
                                                            "process_wall_s") if c in df.columns).sort(keys))


if __name__ == "__main__":
    main()
