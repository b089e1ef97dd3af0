"""What a classifier does not know: its penultimate embedding and a Mahalanobis reference.

``with_embedding`` turns a classifier into one whose output is ``[logits | embedding]`` (the
input of its last linear layer; for an ensemble its mean log-probability and the members'
embeddings side by side), so every runtime (torch, onnxruntime, TensorRT) yields both in one
forward pass. ``OODReference`` holds class-conditional Gaussians with one shared
covariance (Lee et al. 2018) fitted on the training split, on the embedding and on the image's
appearance; an image's ``ood_score`` is the geometric mean of its two Mahalanobis distances to
the nearest class mean, each divided by its median on the validation split. It is stored
beside the checkpoint as ``ood.safetensors`` (tensors only, no pickle); the referral threshold
lives in ``model.json`` (``ood_threshold``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar
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
        self.num_classes, self.embedding_size = head.out_features, head.in_features

    def forward(self, x):
        e = self.body(x).flatten(1)
        return torch.cat([self.head(e), e], 1)


class EnsembleWithEmbedding(nn.Module):
    """An ensemble (``cxrscreen.models.ensemble``) split like ``WithEmbedding``: forward returns
    ``[mean of the members' log-probabilities | every member's embedding, side by side]``."""

    def __init__(self, members: list[WithEmbedding]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.num_classes = members[0].num_classes
        self.embedding_size = sum(m.embedding_size for m in members)

    def forward(self, x):
        outs = [m(x) for m in self.members]
        c = self.num_classes
        logp = torch.stack([o[:, :c].log_softmax(1) for o in outs]).mean(0)
        return torch.cat([logp, *[o[:, c:] for o in outs]], 1)


def _set_child(root: nn.Module, path: str, new: nn.Module) -> None:
    *parents, last = path.split(".")
    parent = root
    for p in parents:
        parent = parent[int(p)] if p.isdigit() else getattr(parent, p)
    if last.isdigit():
        parent[int(last)] = new
    else:
        setattr(parent, last, new)


def last_linear(module: nn.Module) -> tuple[str, nn.Linear] | None:
    """The module's last ``nn.Linear`` (its name and the layer: the input of it is the
    penultimate embedding), or None."""
    linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _split_at_last_linear(module: nn.Module) -> WithEmbedding | None:
    found = last_linear(module)
    if found is None:
        return None
    name, head = found
    body = copy.deepcopy(module).eval()
    _set_child(body, name, nn.Identity())
    return WithEmbedding(body, copy.deepcopy(head)).eval()


def with_embedding(module: nn.Module, in_channels: int, size: int) -> WithEmbedding | EnsembleWithEmbedding | None:
    """``module`` split at its last ``nn.Linear`` (an ensemble: each member at its own; a copy,
    ``module`` is left alone), or None where that layer is not the model's final operation
    (checked on a random input: the split must reproduce the model's output)."""
    members = getattr(module, "members", None)
    if isinstance(members, nn.ModuleList):
        split = [_split_at_last_linear(m) for m in members]
        wrapped = EnsembleWithEmbedding(split).eval() if split and None not in split else None
    else:
        wrapped = _split_at_last_linear(module)
    if wrapped is None:
        return None
    x = torch.randn(2, in_channels, size, size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            same = torch.allclose(wrapped(x)[:, :wrapped.num_classes], module.eval()(x), atol=1e-4, rtol=1e-4)
    except RuntimeError:
        return None
    return wrapped if same else None


APPEARANCE_SIDE = 24  # appearance features: the work image area-averaged to 24 x 24, standardised
APPEARANCE_DIMS = 16  # ... projected on the 16 leading principal components of the training images


def appearance_features(images) -> np.ndarray:
    """uint8 work images (B, H, W), numpy or torch (on any device: computed there) -> (B, 576)
    float32 appearance features: 24 x 24 area averages, each image standardised (mean 0, sd 1)."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    x = torch.nn.functional.interpolate(x.float()[:, None], size=(APPEARANCE_SIDE,) * 2, mode="area").flatten(1)
    return ((x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)).cpu().numpy().astype(np.float32)


def _gaussians(x: np.ndarray, targets: np.ndarray, shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
    """Class means and the precision of the pooled within-class covariance, shrunk toward its
    mean variance (``shrinkage``) so that it inverts with a few hundred images per class."""
    e = np.asarray(x, np.float64)
    classes = np.unique(targets)
    means = np.stack([e[targets == c].mean(0) for c in classes])
    centred = e - means[np.searchsorted(classes, targets)]
    cov = centred.T @ centred / max(len(e) - len(classes), 1)
    cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / len(cov) * np.eye(len(cov))
    return means.astype(np.float32), np.linalg.inv(cov).astype(np.float32)


def _distance(x: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Mahalanobis distance to the nearest mean / sqrt(dimension)."""
    d = np.asarray(x, np.float32)[:, None, :] - means[None]  # (N, C, D)
    m = ((d @ precision) * d).sum(-1)  # BLAS matmul, not a naive einsum loop
    return np.sqrt(np.maximum(m.min(1), 0) / means.shape[1]).astype(np.float32)


@dataclass
class OODReference:
    """Two class-conditional Gaussian references with shared covariances, fitted on the training
    split: on the classifier's penultimate embedding (``means``, ``precision``: what the model
    computes from the image) and on the image's appearance (``app_*``: its 16 leading principal
    components of ``appearance_features``: what the image looks like, whatever the model learnt).
    ``score`` is the geometric mean of the two distances, each divided by its median on the
    validation split (``scale``), so both count alike; chosen over their maximum on the
    leave-one-source-out folds (README, "What it does not know"). The appearance part is
    optional (None: embedding only). ``fusion`` is saved with the tensors; a reference saved
    before it existed combined the parts by their maximum, and keeps doing so, so that the
    thresholds fitted with it (``model.json``, site profiles) stay valid."""

    FUSION: ClassVar[str] = "geometric mean"  # how newly fitted references combine the parts
    FUSIONS: ClassVar[tuple] = ("geometric mean", "max")

    means: np.ndarray
    precision: np.ndarray
    app_center: np.ndarray | None = None
    app_basis: np.ndarray | None = None
    app_means: np.ndarray | None = None
    app_precision: np.ndarray | None = None
    scale: np.ndarray = field(default_factory=lambda: np.ones(2, np.float32))
    fusion: str = FUSION

    @classmethod
    def fit(cls, embeddings: np.ndarray, targets: np.ndarray, appearance: np.ndarray | None = None,
            shrinkage: float = 0.05) -> OODReference:
        """Fit both references on the training split (``appearance``: ``appearance_features``)."""
        means, precision = _gaussians(embeddings, targets, shrinkage)
        if appearance is None:
            return cls(means, precision)
        center = appearance.mean(0)
        _, _, vt = np.linalg.svd(appearance - center, full_matrices=False)
        basis = vt[:APPEARANCE_DIMS].astype(np.float32)
        app_means, app_precision = _gaussians((appearance - center) @ basis.T, targets, shrinkage)
        return cls(means, precision, center.astype(np.float32), basis, app_means, app_precision)

    def parts(self, embeddings: np.ndarray, appearance: np.ndarray | None = None) -> np.ndarray:
        """(N, 2) unscaled distances: embedding, appearance (NaN without an appearance reference)."""
        e = _distance(embeddings, self.means, self.precision)
        a = np.full(len(e), np.nan, np.float32)
        if self.app_basis is not None:
            if appearance is None:
                raise ValueError("this OOD reference needs the images' appearance features")
            a = _distance((appearance - self.app_center) @ self.app_basis.T, self.app_means, self.app_precision)
        return np.stack([e, a], 1)

    def set_scale(self, embeddings: np.ndarray, appearance: np.ndarray | None = None) -> OODReference:
        """Divide each distance by its median on these (validation) images."""
        med = np.nanmedian(self.parts(embeddings, appearance), 0)
        self.scale = np.where(np.isfinite(med) & (med > 0), med, 1.0).astype(np.float32)
        return self

    def score(self, embeddings: np.ndarray, appearance: np.ndarray | None = None) -> np.ndarray:
        """``ood_score`` per row: the geometric mean (or, for a reference saved before it, the
        maximum) of the scaled distances (higher = less like the training data; 1 = as far as
        the median validation image)."""
        scaled = np.maximum(self.parts(embeddings, appearance) / self.scale, 1e-6)
        if self.fusion == "max":
            return np.nanmax(scaled, 1).astype(np.float32)
        return np.exp(np.nanmean(np.log(scaled), 1)).astype(np.float32)

    def with_site(self, embeddings: np.ndarray, targets: np.ndarray, appearance: np.ndarray | None) -> OODReference:
        """A copy whose Gaussians also include a site's class means (same covariances and scale)."""
        def add(means, x):
            return np.concatenate([means, np.stack([x[targets == c].mean(0) for c in np.unique(targets)])
                                   .astype(np.float32)])
        app = None if self.app_basis is None else add(self.app_means, (appearance - self.app_center) @ self.app_basis.T)
        return OODReference(add(self.means, embeddings), self.precision, self.app_center, self.app_basis,
                            app, self.app_precision, self.scale, self.fusion)

    def save(self, folder: str | Path) -> Path:
        from safetensors.numpy import save_file

        path = Path(folder) / OOD_FILE
        tensors = {k: v for k, v in self.__dict__.items() if v is not None and k != "fusion"}
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(path),
                  metadata={"fusion": self.fusion})
        return path

    @classmethod
    def load(cls, folder: str | Path, embedding_size: int | None = None) -> OODReference | None:
        """The reference saved in ``folder`` (None if there is none); refuses one whose shapes
        do not fit each other or the model's embedding size."""
        from safetensors import safe_open

        path = Path(folder) / OOD_FILE
        if not path.exists():
            return None
        with safe_open(str(path), "np") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
            fusion = (f.metadata() or {}).get("fusion", "max")  # saved before the marker: the maximum
        if fusion not in cls.FUSIONS:
            raise ValueError(f"{path}: unknown fusion {fusion!r} (expected one of {', '.join(cls.FUSIONS)})")
        means, precision = t.get("means"), t.get("precision")
        if means is None or precision is None or means.ndim != 2 or precision.shape != (means.shape[1],) * 2:
            raise ValueError(f"{path}: expected tensors 'means' (C, D) and 'precision' (D, D)")
        if embedding_size is not None and means.shape[1] != embedding_size:
            raise ValueError(f"{path}: embedding size {means.shape[1]}, the model's is {embedding_size}")
        app = [t.get(k) for k in ("app_center", "app_basis", "app_means", "app_precision")]
        if any(a is not None for a in app):
            c, b, m, p = app
            if any(a is None for a in app) or b.shape[1] != c.shape[0] or m.shape[1] != b.shape[0] \
                    or p.shape != (b.shape[0],) * 2:
                raise ValueError(f"{path}: inconsistent appearance tensors")
        scale = t.get("scale", np.ones(2, np.float32))
        if not all(np.isfinite(v).all() for v in t.values()) or scale.shape != (2,) or (scale <= 0).any():
            raise ValueError(f"{path}: non-finite values or a bad 'scale'")
        return cls(means, precision, *app, scale, fusion)


def knn_score(reference: np.ndarray, embeddings: np.ndarray, k: int = 10) -> np.ndarray:
    """k-th nearest-neighbour distance between L2-normalised embeddings (Sun et al. 2022), the
    alternative ``ood_score`` compared with Mahalanobis in the shortcut audit."""
    ref = reference / np.linalg.norm(reference, axis=1, keepdims=True).clip(1e-6)
    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(1e-6)
    d = np.sqrt(np.clip(2 - 2 * x @ ref.T, 0, None))
    return np.sort(d, axis=1)[:, min(k, ref.shape[0]) - 1].astype(np.float32)
