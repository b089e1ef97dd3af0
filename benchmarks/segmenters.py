"""The shipped segmenters side by side, in one run on the same inputs and cores: model-stage
images/s (segmentation + the default classifier, pre-decoded inputs) per segmenter and
precision, the full Ray ``score`` pipeline per segmenter, and how far the fast U-Net's masks
are from the default one's (Dice per image on the same inputs).
Usage: python benchmarks/segmenters.py [--source cxr] [-n 512] [--batch-size 16] [--no-ray]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl

from cxrscreen.bench import bench_models, bench_pipeline, machine_info, prepare_inputs
from cxrscreen.io.sources import list_inputs
from cxrscreen.masks import decode_mask_png
from cxrscreen.pipeline.config import ScoreConfig
from cxrscreen.io.batch import decode_items
from cxrscreen.pipeline.stages import Segmenter
from cxrscreen.masks import dice_scores

SEGMENTERS = ("unet-lungs", "unet-lungs-fast", "")  # "" = classification only


def masks(items, cfg: ScoreConfig, cpus: int) -> np.ndarray:
    """The lung masks ``score`` would store (cleaned), as booleans."""
    seg = Segmenter(cfg.segmenter_options(), cfg.runtime_options(threads=cpus))
    chunks = [items[i:i + cfg.batch_size] for i in range(0, len(items), cfg.batch_size)]
    return np.stack([decode_mask_png(png) for c in chunks
                     for png in seg(decode_items(c, cfg.work_size))["lung_mask_png"]])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--source", default="cxr")
    p.add_argument("-n", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--shared", default="../shared/data")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "segmenters.parquet"))
    a = p.parse_args()
    archive = prepare_inputs(a.source, a.n, Path(tempfile.mkdtemp()), Path(a.shared))
    items = list(list_inputs(archive))
    cpus = os.cpu_count() or 1
    base = ScoreConfig(device="cpu", runtime="torch", batch_size=a.batch_size, num_cpus=cpus)
    if not a.no_ray:
        from cxrscreen.cluster import init_ray

        init_ray(None, cpus)
    info, rows = machine_info(), []
    for seg in SEGMENTERS:
        for precision in ("fp32", "bf16"):
            ips, extra = bench_models(items, replace(base, segmenter=seg, precision=precision), cpus)
            rows.append(dict(mode="b_model_forward", segmenter=seg, precision=precision, images_per_s=ips, **extra))
        if not a.no_ray:
            _, steady = bench_pipeline(archive, replace(base, segmenter=seg, precision="bf16"))
            rows.append(dict(mode="c_pipeline_steady", segmenter=seg, precision="bf16", images_per_s=steady))
    sample = items[:128]
    default, fast = (masks(sample, replace(base, segmenter=s, precision="fp32"), cpus) for s in SEGMENTERS[:2])
    dice = dice_scores(fast, default)
    df = pl.DataFrame(rows, infer_schema_length=None).with_columns(
        source=pl.lit(a.source), n=pl.lit(len(items)), batch_size=pl.lit(a.batch_size),
        fast_vs_default_mask_dice_mean=pl.lit(float(dice.mean())),
        fast_vs_default_mask_dice_min=pl.lit(float(dice.min())), **{k: pl.lit(v) for k, v in info.items()})
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(a.out)
    print(df.select("mode", "segmenter", "precision", "images_per_s", "segment_time_share"))
    print(f"fast vs default masks on {len(dice)} images: Dice mean {dice.mean():.4f}, min {dice.min():.4f}")


if __name__ == "__main__":
    main()
