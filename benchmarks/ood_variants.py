"""Not a speed benchmark: other ``ood_score`` definitions measured with the shipped referral on
stored leave-one-source-out outputs (``cxrscreen loso`` writes ``without-SOURCE/audit-outputs.parquet``
per fold), without running or training a model. Each variant replaces the score in
``source_shift.audit_outputs`` (same temperature, low-confidence and OOD thresholds from val).
Variants: the shipped score (class-conditional Mahalanobis on the embedding and on 16 appearance
components, each scaled by its val median, geometric mean); per (class, source) Gaussians;
relative Mahalanobis (Ren et al. 2021: minus the distance to one Gaussian of all training
images) on the embedding or on both parts, combined as a sum of robust z-scores; 8 / 32
appearance components; shrinkage 0.3; unequal weights of the parts; either part alone; k-means
sub-clusters of each class (2 / 4 / 8 Gaussians per class). With ``--images`` (decodes the fold's
images again and runs its model; minutes): a third part from acquisition-style features of the
work image (intensity quantiles, dark / bright shares, high-pass energy at three scales, noise,
power in five frequency bands) and Lee et al. 2018's feature ensemble (class Gaussians on the
mean of every pooling stage's output, each a part; the last stage's is the embedding itself).
Usage: python benchmarks/ood_variants.py runs/shortcut/style-crop-ensemble [--images] [-o cxrscreen/weights/evaluation/ood-variants.parquet]
"""

from __future__ import annotations

import argparse
import dataclasses
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


def _groups(y, x, per_class):
    """Class labels split into ``per_class`` k-means clusters of ``x`` (standardised) each."""
    from sklearn.cluster import KMeans

    z, g = (x - x.mean(0)) / (x.std(0) + 1e-6), y * per_class
    for c in np.unique(y):
        rows = y == c
        g[rows] += KMeans(min(per_class, rows.sum()), n_init=4, random_state=0).fit_predict(z[rows])
    return g


def variant(embedding=True, appearance=True, dims=APPEARANCE_DIMS, shrinkage=0.05, groups="class",
            relative=(), weight=0.5, fusion="geometric", extra=()):
    """An ``audit_outputs`` ``ood_score`` factory; ``groups``: class, class+source or
    class+kmeansK; ``extra``: more arrays, each a part (standardised, class Gaussians)."""
    def fit(train, val):
        y = train["y"]
        if groups == "class+source":
            y = np.unique(np.char.add(y.astype(str), train["source"].astype(str)), return_inverse=True)[1]
        grouped = (lambda x: _groups(y, x, int(groups.removeprefix("class+kmeans")))) if "kmeans" in groups \
            else (lambda x: y)
        feats = []
        if embedding:
            f = _part(train["embedding"], grouped(train["embedding"]), shrinkage, "embedding" in relative)
            feats.append(lambda a, f=f: f(a["embedding"]))
        if appearance:
            centre = train["appearance"].mean(0)
            basis = np.linalg.svd(train["appearance"] - centre, full_matrices=False)[2][:dims]
            projected = (train["appearance"] - centre) @ basis.T
            g = _part(projected, grouped(projected), shrinkage, "appearance" in relative)
            feats.append(lambda a, g=g: g((a["appearance"] - centre) @ basis.T))
        for key in extra:
            mu, sd = train[key].mean(0), train[key].std(0) + 1e-6
            h = _part((train[key] - mu) / sd, y, shrinkage, False)
            feats.append(lambda a, h=h, key=key, mu=mu, sd=sd: h((a[key] - mu) / sd))
        weights = [weight, 1 - weight] if len(feats) == 2 and not extra else [1.0] * len(feats)
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
    "2 Gaussians per class": variant(groups="class+kmeans2"),
    "4 Gaussians per class": variant(groups="class+kmeans4"),
    "8 Gaussians per class": variant(groups="class+kmeans8"),
}
STAGES = 5  # cxrnet's pooling stages (the feature-ensemble variants)
IMAGE_VARIANTS = {
    "+ acquisition style (3 parts)": variant(extra=("style",)),
    "embedding + acquisition style": variant(appearance=False, extra=("style",)),
    "acquisition style alone": variant(embedding=False, appearance=False, extra=("style",)),
    "+ every pooling stage (feature ensemble)": variant(extra=tuple(f"stage{k}" for k in range(STAGES))),
    "+ pooling stages 3-4": variant(extra=("stage2", "stage3")),
    "pooling stages alone": variant(embedding=False, appearance=False, extra=tuple(f"stage{k}" for k in range(STAGES))),
}


def acquisition_style(images: np.ndarray) -> np.ndarray:
    """(N, 20) features of how uint8 work images were acquired and processed, not what they show:
    9 intensity quantiles, shares of near-black and near-white pixels, log high-pass energy at
    3 scales and of the Laplacian's median (noise), each relative to the image's spread, and the
    log power in 5 radial frequency bands of the standardised image."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images).float()[:, None] / 255
    flat = x.flatten(1)
    sd = flat.std(1).clamp_min(1e-3)[:, None]
    feats = [torch.quantile(flat, torch.tensor([.01, .05, .1, .25, .5, .75, .9, .95, .99]), dim=1).T,
             (flat <= 5 / 255).float().mean(1, keepdim=True), (flat >= 250 / 255).float().mean(1, keepdim=True)]
    for k in (3, 7, 15):
        blur = F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False)
        feats.append(torch.log((x - blur).abs().flatten(1).mean(1, keepdim=True) / sd + 1e-4))
    lap = 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    feats.append(torch.log(lap.abs().flatten(1).median(1).values[:, None] / sd + 1e-4))
    power = torch.fft.rfft2((x[:, 0] - flat.mean(1)[:, None, None]) / sd[:, :, None]).abs() ** 2
    radius = torch.sqrt(torch.fft.fftfreq(x.shape[2])[:, None] ** 2 + torch.fft.rfftfreq(x.shape[3])[None] ** 2)
    edges = (0.01, 0.03, 0.06, 0.12, 0.25, 0.5)
    feats += [torch.log(power[:, (radius >= a) & (radius < b)].mean(1, keepdim=True) + 1e-8)
              for a, b in zip(edges[:-1], edges[1:])]
    return torch.cat(feats, 1).numpy().astype(np.float32)


def stage_features(fold_dir: Path, images: np.ndarray) -> list[np.ndarray]:
    """Per pooling stage of the fold's model (every member of an ensemble, side by side): the
    channel means of its output, for the model input ``score`` makes (lung crop included). The
    last stage's means are the embedding itself (cxrnet pools them globally)."""
    import torch

    from cxrscreen.predict import ModelRunner

    runner = ModelRunner(str(fold_dir), "classify", device="cpu")
    boxes = runner.lung_boxes(images) if runner.info.lung_crop else None
    module = runner.loaded.module.eval()
    members = list(getattr(module, "members", [module]))

    def pooled(member, x):
        """The channel means after each of ``member``'s pooling stages."""
        out = []
        for layer in member:
            x = layer(x)
            if isinstance(layer, torch.nn.MaxPool2d):
                out.append(x.mean((2, 3)).numpy())
        if len(out) != STAGES:
            raise ValueError(f"{fold_dir}: stage features need a cxrnet ({STAGES} pooling stages)")
        return out

    stages = [[] for _ in range(STAGES)]
    with torch.no_grad():
        for i in range(0, len(images), 256):
            x = runner.model_input(images[i:i + 256], None if boxes is None else boxes[i:i + 256]).float()
            per_member = [pooled(member, x) for member in members]
            for k in range(STAGES):
                stages[k].append(np.concatenate([p[k] for p in per_member], 1))
    return [np.concatenate(s) for s in stages]


def image_arrays(fold_dir: Path, table: pl.DataFrame) -> dict[str, np.ndarray]:
    """``acquisition_style`` and ``stage_features`` of a fold's images, row for row with its stored
    outputs (the fold's train / val / test splits, then every image of the held-out source)."""
    from cxrscreen.evaluate.source_shift import fold_digest, stored_digest
    from cxrscreen.predict import decode_files
    from cxrscreen.train.config import checkpoint_config
    from cxrscreen.train.data import labeled_splits

    cfg = checkpoint_config(fold_dir)
    fold_df, _ = labeled_splits(cfg)
    everything, _ = labeled_splits(dataclasses.replace(cfg, sources=None, exclude_sources=None))
    held = everything.filter(pl.col("source") == fold_dir.name.removeprefix("without-"))
    rows = pl.concat([fold_df.filter(pl.col("split") == n) for n in ("train", "val", "test")] + [held], how="diagonal")
    images, ok = decode_files(rows["file"].to_list())
    same = fold_digest(fold_df, held, fold_dir) == stored_digest(fold_dir / FOLD_OUTPUTS)  # images, splits, weights
    if not (same and ok.all() and rows["target"].to_list() == table["target"].to_list()):
        raise ValueError(f"{fold_dir}: its images no longer match the stored outputs row for row")
    return {"style": acquisition_style(images),
            **{f"stage{k}": f for k, f in enumerate(stage_features(fold_dir, images))}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("loso_dir")
    ap.add_argument("--images", action="store_true", help="also the variants that need the images and the model")
    ap.add_argument("-o", "--out", default="cxrscreen/weights/evaluation/ood-variants.parquet")
    args = ap.parse_args()
    rows = []
    for path in sorted(Path(args.loso_dir).glob(f"without-*/{FOLD_OUTPUTS}")):
        table, classes, arrays = read_fold_outputs(path)
        learned = sorted(set(table.filter(pl.col("part") == "train")["target"]))
        if args.images:
            arrays.update(image_arrays(path.parent, table))
        for name, fit in {**VARIANTS, **(IMAGE_VARIANTS if args.images else {})}.items():
            row = audit_outputs(table, classes, arrays, learned, ood_score=fit)[0]
            rows.append({"variant": name, "folds": Path(args.loso_dir).name,
                         "held_out": path.parent.name.removeprefix("without-"), **row,
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
