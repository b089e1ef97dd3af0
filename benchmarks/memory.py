"""Peak memory of `cxrscreen score` does not grow with the archive size (streaming).

Scores N = 2,000 and N = 20,000 inputs (symlinks to 64 phantom PNGs, so the archive costs
no disk) with a light model pair, sampling the summed RSS of the driver and every Ray
process it started. Usage: python benchmarks/memory.py [--sizes 2000,20000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import polars as pl
import psutil

from cxrscreen.bench import machine_info
from cxrscreen.data.synth import write_archive


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run(archive: Path, out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "cxrscreen.cli", "score", str(archive), "-o", str(out),
           "--classifier", args.classifier, "--allow-untrained", "--segmenter", args.segmenter, "--num-cpus", "2"]
    t0 = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak, samples = 0, []

    def sample():
        nonlocal peak
        while proc.poll() is None:
            r = tree_rss(proc)
            peak = max(peak, r)
            samples.append(r)
            time.sleep(0.5)

    th = threading.Thread(target=sample)
    th.start()
    stdout = proc.communicate()[0]
    th.join()
    rows = pl.read_parquet(out / "*.parquet").height
    return dict(n=rows, peak_rss_mb=peak / 2**20, median_rss_mb=sorted(samples)[len(samples) // 2] / 2**20,
                seconds=time.perf_counter() - t0, summary=stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2000,20000")
    ap.add_argument("--classifier", default="mobilenet_v3_small")
    ap.add_argument("--segmenter", default="")
    ap.add_argument("-o", "--out", default="benchmarks/results/memory.parquet")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cxr-mem-"))
    write_archive(work / "base", 64, size=512)
    base = sorted((work / "base" / "images").rglob("*.png"))
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        archive = work / f"arch{n}"
        archive.mkdir()
        for i in range(n):
            (archive / f"{i:06d}.png").symlink_to(base[i % len(base)])
        r = run(archive, work / f"out{n}", args)
        r.update(classifier=args.classifier, segmenter=args.segmenter or "none", **machine_info())
        rows.append(r)
        print(f"N={n}: {r['n']} rows, peak RSS {r['peak_rss_mb']:.0f} MB, {r['seconds']:.0f} s | {r['summary']}")
    df = pl.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(args.out)


if __name__ == "__main__":
    main()
