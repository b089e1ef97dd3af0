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


def embeddings(module: torch.nn.Module, images: np.ndarray, size: int, in_channels: int = 1,
               batch: int = 64) -> np.ndarray:
    """The input of the model's last linear layer (its penultimate features) for uint8 images."""
    from cxrscreen.preprocess import to_model_input

    last = [m for m in module.modules() if isinstance(m, torch.nn.Linear)][-1]
    feats: list[np.ndarray] = []
    hook = last.register_forward_hook(lambda m, i, o: feats.append(i[0].detach().float().cpu().numpy()))
    module.eval()
    device = next(module.parameters()).device
    try:
        with torch.inference_mode():
            for i in range(0, len(images), batch):
                module(to_model_input(torch.from_numpy(images[i:i + batch]).to(device), size, in_channels))
    finally:
        hook.remove()
    return np.concatenate(feats) if feats else np.zeros((0, last.in_features), np.float32)


def kmeans_crosstab(features: np.ndarray, labels: list[str], k: int | None = None, seed: int = 0) -> dict:
    """k-means (k = number of labels by default) -> cluster per image, label x cluster crosstab,
    cluster counts, purity and adjusted Rand index against the labels."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    k = k or len(set(labels))
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(features)
    df = pl.DataFrame({"label": labels, "cluster": clusters})
    table = df.pivot(on="cluster", index="label", values="cluster", aggregate_function="len",
                     sort_columns=True).fill_null(0)
    counts = table.drop("label").to_numpy()
    return {"clusters": clusters, "crosstab": table, "cluster_sizes": np.bincount(clusters, minlength=k),
            "purity": float(counts.max(0).sum() / counts.sum()),
            "adjusted_rand": float(adjusted_rand_score(labels, clusters))}
