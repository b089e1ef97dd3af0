"""What a classifier does not know: its penultimate embedding and a Mahalanobis reference.

``with_embedding`` turns a classifier into one whose output is ``[logits | embedding]`` (the
input of its last linear layer), so every runtime (torch, onnxruntime, TensorRT) yields both
in one forward pass. ``OODReference`` holds class-conditional Gaussians with one shared
covariance fitted on the training split's embeddings (Lee et al. 2018); an image's
``ood_score`` is its Mahalanobis distance to the nearest class mean, divided by the square
root of the embedding size (so scores of different models are on a similar scale). It is
stored beside the checkpoint as ``ood.safetensors`` (tensors only, no pickle); the referral
threshold lives in ``model.json`` (``ood_threshold``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

OOD_FILE = "ood.safetensors"


class WithEmbedding(nn.Module):
    """``body`` (the classifier up to its last linear layer) and ``head`` (that layer):
    forward returns ``[logits | embedding]`` along dimension 1."""

    def __init__(self, body: nn.Module, head: nn.Linear):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x):
        e = self.body(x).flatten(1)
        return torch.cat([self.head(e), e], 1)


def _set_child(root: nn.Module, path: str, new: nn.Module) -> None:
    *parents, last = path.split(".")
    parent = root
    for p in parents:
        parent = parent[int(p)] if p.isdigit() else getattr(parent, p)
    if last.isdigit():
        parent[int(last)] = new
    else:
        setattr(parent, last, new)


def with_embedding(module: nn.Module, in_channels: int, size: int) -> WithEmbedding | None:
    """``module`` split at its last ``nn.Linear`` (a copy; ``module`` is left alone), or None
    where that layer is not the model's final operation (checked on a random input: e.g. an
    ensemble, whose output averages several heads)."""
    linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    name, head = linears[-1]
    body = copy.deepcopy(module).eval()
    _set_child(body, name, nn.Identity())
    wrapped = WithEmbedding(body, copy.deepcopy(head)).eval()
    x = torch.randn(2, in_channels, size, size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            same = torch.allclose(wrapped(x)[:, :head.out_features], module.eval()(x), atol=1e-4, rtol=1e-4)
    except RuntimeError:
        return None
    return wrapped if same else None


@dataclass
class OODReference:
    """Class means (C, D) and the precision matrix (D, D) of the shared covariance."""

    means: np.ndarray
    precision: np.ndarray

    @classmethod
    def fit(cls, embeddings: np.ndarray, targets: np.ndarray, shrinkage: float = 0.05) -> OODReference:
        """Means per class and the pooled within-class covariance, shrunk toward its mean
        variance (``shrinkage``) so that it inverts with a few hundred images per class."""
        e = np.asarray(embeddings, np.float64)
        classes = np.unique(targets)
        means = np.stack([e[targets == c].mean(0) for c in classes])
        centred = e - means[np.searchsorted(classes, targets)]
        cov = centred.T @ centred / max(len(e) - len(classes), 1)
        cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / len(cov) * np.eye(len(cov))
        return cls(means.astype(np.float32), np.linalg.inv(cov).astype(np.float32))

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """Distance to the nearest class mean / sqrt(D), one value per row (higher = less known)."""
        e = np.asarray(embeddings, np.float32)
        d = e[:, None, :] - self.means[None]  # (N, C, D)
        m = ((d @ self.precision) * d).sum(-1)  # BLAS matmul, not a naive einsum loop
        return np.sqrt(np.maximum(m.min(1), 0) / self.means.shape[1]).astype(np.float32)

    def save(self, folder: str | Path) -> Path:
        from safetensors.numpy import save_file

        path = Path(folder) / OOD_FILE
        save_file({"means": self.means, "precision": self.precision}, str(path))
        return path

    @classmethod
    def load(cls, folder: str | Path, embedding_size: int | None = None) -> OODReference | None:
        """The reference saved in ``folder`` (None if there is none); refuses one whose shapes
        do not fit each other or the model's embedding size."""
        from safetensors.numpy import load_file

        path = Path(folder) / OOD_FILE
        if not path.exists():
            return None
        t = load_file(str(path))
        means, precision = t.get("means"), t.get("precision")
        if means is None or precision is None or means.ndim != 2 or precision.shape != (means.shape[1],) * 2:
            raise ValueError(f"{path}: expected tensors 'means' (C, D) and 'precision' (D, D)")
        if embedding_size is not None and means.shape[1] != embedding_size:
            raise ValueError(f"{path}: embedding size {means.shape[1]}, the model's is {embedding_size}")
        if not (np.isfinite(means).all() and np.isfinite(precision).all()):
            raise ValueError(f"{path}: non-finite values")
        return cls(means.astype(np.float32), precision.astype(np.float32))


def knn_score(reference: np.ndarray, embeddings: np.ndarray, k: int = 10) -> np.ndarray:
    """k-th nearest-neighbour distance between L2-normalised embeddings (Sun et al. 2022), the
    alternative ``ood_score`` compared with Mahalanobis in the shortcut audit."""
    ref = reference / np.linalg.norm(reference, axis=1, keepdims=True).clip(1e-6)
    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(1e-6)
    d = np.sqrt(np.clip(2 - 2 * x @ ref.T, 0, None))
    return np.sort(d, axis=1)[:, min(k, ref.shape[0]) - 1].astype(np.float32)
