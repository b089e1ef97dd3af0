"""Not a speed benchmark: other ``ood_score`` definitions measured with the shipped referral on
stored leave-one-source-out outputs (``cxrscreen loso`` writes ``without-SOURCE/audit-outputs.parquet``
per fold), without running or training a model. Each variant replaces the score in
``source_shift.audit_outputs`` (same temperature, low-confidence and OOD thresholds from val).
Variants: the shipped score (class-conditional Mahalanobis on the embedding and on 16 appearance
components, each scaled by its val median, geometric mean); per (class, source) Gaussians;
relative Mahalanobis (Ren et al. 2021: minus the distance to one Gaussian of all training
images) on the embedding or on both parts, combined as a sum of robust z-scores; 8 / 32
appearance components; shrinkage 0.3; unequal weights of the parts; either part alone.
Usage: python benchmarks/ood_variants.py runs/shortcut/style-crop [-o cxrscreen/weights/evaluation/ood-variants.parquet]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl

from cxrscreen.evaluate.source_shift import FOLD_OUTPUTS, audit_outputs, fold_score, read_fold_outputs
from cxrscreen.models.ood import APPEARANCE_DIMS, _distance, _gaussians


def _sq_distances(x, means, precision):
    """(N, C) squared Mahalanobis distances to every mean / dimension (``_distance`` keeps only the nearest, rooted)."""
    d = np.asarray(x, np.float32)[:, None, :] - means[None]
    return ((d @ precision) * d).sum(-1) / means.shape[1]  # (N, C) squared distances / dimension


def _part(train_x, train_y, shrinkage, relative):
    """A scorer of one part: distance to the nearest class (or group) mean; relative: squared
    distance minus that to one Gaussian of all training rows."""
    means, precision = _gaussians(train_x, train_y, shrinkage)
    if not relative:
        return lambda x: _distance(x, means, precision)
    m0, p0 = _gaussians(train_x, np.zeros(len(train_x), int), shrinkage)
    return lambda x: _sq_distances(x, means, precision).min(1) - _sq_distances(x, m0, p0)[:, 0]


def variant(embedding=True, appearance=True, dims=APPEARANCE_DIMS, shrinkage=0.05, groups="class",
            relative=(), weight=0.5, fusion="geometric"):
    """An ``audit_outputs`` ``ood_score`` factory."""
    def fit(train, val):
        y = train["y"]
        if groups == "class+source":
            y = np.unique(np.char.add(y.astype(str), train["source"].astype(str)), return_inverse=True)[1]
        feats = []
        if embedding:
            f = _part(train["embedding"], y, shrinkage, "embedding" in relative)
            feats.append(lambda a, f=f: f(a["embedding"]))
        if appearance:
            centre = train["appearance"].mean(0)
            basis = np.linalg.svd(train["appearance"] - centre, full_matrices=False)[2][:dims]
            g = _part((train["appearance"] - centre) @ basis.T, y, shrinkage, "appearance" in relative)
            feats.append(lambda a, g=g: g((a["appearance"] - centre) @ basis.T))
        weights = [weight, 1 - weight] if len(feats) == 2 else [1.0]
        on_val = [f(val) for f in feats]
        if fusion == "geometric":
            scale = [np.median(v) for v in on_val]
            return lambda a: np.exp(sum(w * np.log(np.maximum(f(a) / s, 1e-6))
                                        for f, s, w in zip(feats, scale, weights)) / sum(weights))
        stats = [(np.median(v), np.subtract(*np.percentile(v, [75, 25]))) for v in on_val]
        return lambda a: sum(w * (f(a) - m) / iqr for f, (m, iqr), w in zip(feats, stats, weights))
    return fit


VARIANTS = {
    "shipped": variant(),
    "per class and source": variant(groups="class+source"),
    "relative Mahalanobis, embedding": variant(relative=("embedding",), fusion="z"),
    "relative Mahalanobis, both parts": variant(relative=("embedding", "appearance"), fusion="z"),
    "robust z-score sum": variant(fusion="z"),
    "8 appearance components": variant(dims=8),
    "32 appearance components": variant(dims=32),
    "shrinkage 0.3": variant(shrinkage=0.3),
    "embedding weight 0.3": variant(weight=0.3),
    "embedding weight 0.7": variant(weight=0.7),
    "embedding alone": variant(appearance=False),
    "appearance alone": variant(embedding=False),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("loso_dir")
    ap.add_argument("-o", "--out", default="cxrscreen/weights/evaluation/ood-variants.parquet")
    args = ap.parse_args()
    rows = []
    for path in sorted(Path(args.loso_dir).glob(f"without-*/{FOLD_OUTPUTS}")):
        table, classes, arrays = read_fold_outputs(path)
        learned = sorted(set(table.filter(pl.col("part") == "train")["target"]))
        for name, fit in VARIANTS.items():
            row = audit_outputs(table, classes, arrays, learned, ood_score=fit)[0]
            rows.append({"variant": name, "held_out": path.parent.name.removeprefix("without-"), **row,
                         "fold_score": fold_score(row)})
    df = pl.DataFrame(rows, infer_schema_length=None)
    df.write_parquet(args.out)
    summary = df.group_by("variant", maintain_order=True).agg(
        pl.col("fold_score").min().alias("worst_fold"), pl.col("ood_auroc_combined").min().alias("worst_auroc"),
        pl.col("held_out_noncovid_covid_unreferred").max().alias("worst_noncovid_covid_unreferred"),
        pl.col("in_source_test_referred").mean().alias("in_source_referred"))
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200):
        print(summary)


if __name__ == "__main__":
    main()
