"""k-means analysis (P0): do unsupervised clusters of pixels or model embeddings follow the labels?"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch


def pixel_features(images: np.ndarray, side: int = 32) -> np.ndarray:
    """Flattened, downsampled pixels (as P0 clusters raw images), each image standardised."""
    x = torch.nn.functional.interpolate(torch.from_numpy(images).float()[:, None], size=(side, side),
                                        mode="area")[:, 0].flatten(1).numpy()
    return (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-6)


def kmeans_crosstab(features: np.ndarray, labels: list[str], k: int | None = None, seed: int = 0) -> dict:
    """k-means (k = number of labels by default) -> cluster per image, label x cluster crosstab,
    cluster counts, purity and adjusted Rand index against the labels."""
    from cxrscreen.extras import require

    KMeans, adjusted_rand_score = require("sklearn.cluster").KMeans, require("sklearn.metrics").adjusted_rand_score

    k = k or len(set(labels))
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(features)
    df = pl.DataFrame({"label": labels, "cluster": clusters})
    table = df.pivot(on="cluster", index="label", values="cluster", aggregate_function="len",
                     sort_columns=True).fill_null(0)
    counts = table.drop("label").to_numpy()
    return {"clusters": clusters, "crosstab": table, "cluster_sizes": np.bincount(clusters, minlength=k),
            "purity": float(counts.max(0).sum() / counts.sum()),
            "adjusted_rand": float(adjusted_rand_score(labels, clusters))}
