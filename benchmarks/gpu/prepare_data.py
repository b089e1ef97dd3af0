"""Real inputs for the GPU run: ``N`` test-split images of ../shared/data/cxr (every source and
class, round robin), as PNG copies and as JPEG re-encodings (quality 90), renamed by number (no
patient identifiers), into a git-ignored folder that ``benchmarks/gpu/run.sh``'s device call
carries (the device machine cannot see ../shared).

Usage: python benchmarks/gpu/prepare_data.py [--shared ../shared/data] [--n 192] [--out .gpudata]
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
from itertools import zip_longest
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--n", type=int, default=192)
    p.add_argument("--out", default=str(ROOT / ".gpudata"))
    a = p.parse_args()
    cxr, out = Path(a.shared) / "cxr", Path(a.out)
    with open(cxr / "manifest.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    groups: dict[tuple, list] = {}
    for r in sorted(rows, key=lambda r: r["path"]):
        groups.setdefault((r["source"], r["label"]), []).append(r)
    picked = [r for rs in zip_longest(*groups.values()) for r in rs if r is not None][:a.n]
    shutil.rmtree(out, ignore_errors=True)
    (out / "png").mkdir(parents=True)
    (out / "jpeg").mkdir()
    for i, r in enumerate(picked):
        src = cxr / r["path"]
        shutil.copyfile(src, out / "png" / f"{i:05d}{src.suffix.lower()}")
        buf = io.BytesIO()
        Image.open(src).convert("L").save(buf, "JPEG", quality=90)
        (out / "jpeg" / f"{i:05d}.jpg").write_bytes(buf.getvalue())
    print(f"{len(picked)} images from {len(groups)} source/class groups -> {out}")


if __name__ == "__main__":
    main()
