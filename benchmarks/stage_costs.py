"""What each stage of the score path costs per image in one thread, without Ray, with the models
replaced by the replay runtime (``cxrscreen bench --ceiling``'s zero-cost models), before and
after in one run on the same images: ``decode_batch`` on 256 px PNG vs pre-decoded PGM bytes
(``cxrscreen ingest --resize 256 [--pixels pgm]``), the segmenter stage, the classifier stage
with the lung crop in one batch vs in chunks (``preprocess.CROP_CHUNK``) and the histogram
equalisation as tensor ops vs OpenCV, polarity with numpy's vs OpenCV's means, and the Arrow
conversion. Images of ../shared/data/cxr (phantoms without it).
Usage: python benchmarks/stage_costs.py [-n 1024] [--reps 3] [-o benchmarks/results/stage_costs.parquet]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import polars as pl
import torch

from cxrscreen import preprocess
from cxrscreen.bench import machine_info, prepare_inputs
from cxrscreen.data.ingest import ingest
from cxrscreen.io import batch as batch_module
from cxrscreen.io.batch import decode_batch
from cxrscreen.pipeline.config import ClassifierOptions, RuntimeOptions, SegmenterOptions
from cxrscreen.pipeline.output import batch_to_table, output_schema
from cxrscreen.pipeline.stages import Classifier, Segmenter

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64


def numpy_polarity(img: np.ndarray) -> float:
    """``io.batch.polarity`` as it was, with numpy's means."""
    h, w = img.shape
    band = img[h // 4: 3 * h // 4].astype(np.float32)
    centre = band[:, int(0.42 * w): int(0.58 * w)].mean()
    lungs = (band[:, int(0.12 * w): int(0.32 * w)].mean() + band[:, int(0.68 * w): int(0.88 * w)].mean()) / 2
    sd = float(img.std())
    return float((centre - lungs) / sd) if sd > 1.0 else 0.0


@contextmanager
def before():
    """The code as it was: one grid_sample for the whole batch, equalisation as tensor ops,
    numpy's polarity (the same outputs: tests/test_trust.py, tests/test_preprocess.py)."""
    saved = preprocess.CROP_CHUNK, preprocess.equalize, batch_module.polarity
    preprocess.CROP_CHUNK, preprocess.equalize, batch_module.polarity = 10**9, preprocess._equalize_tensors, numpy_polarity
    try:
        yield
    finally:
        preprocess.CROP_CHUNK, preprocess.equalize, batch_module.polarity = saved


def shards(folder: Path, work: Path, pixels: str) -> list[tuple[str, bytes]]:
    files = sorted(p for p in folder.rglob("*.png"))
    out = work / f"parquet-{pixels}"
    if not out.exists():
        ingest(pl.DataFrame({"file": [str(f) for f in files], "path": [f.name for f in files],
                             "label": ["unknown"] * len(files)}), out, resize=256, progress=False, pixels=pixels)
    t = pl.concat([pl.read_parquet(f) for f in sorted(out.glob("shard-*.parquet"))])
    return list(zip(t["key"], t["image"]))


def run(rows: list[tuple[str, bytes]], seg: Segmenter, cls: Classifier) -> dict[str, float]:
    """Milliseconds per image of each stage over ``rows`` in batches of BATCH."""
    schema, ms = output_schema(cls.classes), dict(decode=0.0, segment=0.0, classify=0.0, arrow=0.0)
    for i in range(0, len(rows), BATCH):
        keys, datas = zip(*rows[i:i + BATCH])
        t0 = time.perf_counter()
        b = decode_batch({"key": np.array(keys, object), "data": np.array(datas, object)})
        t1 = time.perf_counter()
        b = seg(b)
        t2 = time.perf_counter()
        b = cls(b)
        t3 = time.perf_counter()
        batch_to_table(b, schema)
        t4 = time.perf_counter()
        for k, dt in zip(ms, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            ms[k] += dt * 1000 / len(rows)
    return ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-o", "--out", default=str(ROOT / "benchmarks/results/stage_costs.parquet"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="cxrbench-stages-"))
    folder = prepare_inputs("cxr", args.n, work, ROOT.parent / "shared" / "data")
    inputs = {pixels: shards(folder, work, pixels) for pixels in ("png", "pgm")}
    runtime = RuntimeOptions(runtime="replay", threads=1)
    seg, cls = Segmenter(SegmenterOptions(), runtime), Classifier(ClassifierOptions(), runtime)
    info, records = machine_info(), []
    run(inputs["png"][:BATCH], seg, cls)  # warm-up: the replay runtimes run their models once
    for rep in range(args.reps):  # alternating, so that a slow moment hits every variant
        for code in ("before", "now"):
            for pixels, rows in inputs.items():
                with before() if code == "before" else nullcontext():
                    ms = run(rows, seg, cls)
                records.append(dict(rep=rep, code=code, input=f"parquet_{pixels}", n=len(rows), batch_size=BATCH,
                                    **{f"ms_{k}": v for k, v in ms.items()}, ms_total=sum(ms.values()),
                                    classifier=cls.loaded.weights_name, segmenter=seg.loaded.weights_name, **info))
                print(records[-1]["code"], records[-1]["input"], {k: round(v, 3) for k, v in ms.items()},
                      round(sum(ms.values()), 3), flush=True)
    df = pl.DataFrame(records)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(args.out)
    print(df.group_by("code", "input").agg(pl.col("^ms_.*$").median()).sort("code", "input"))


if __name__ == "__main__":
    main()
