"""What a classifier does not know: its penultimate embedding and a Mahalanobis reference.

``with_embedding`` turns a classifier into one whose output is ``[logits | embedding]`` (the
input of its last linear layer), so every runtime (torch, onnxruntime, TensorRT) yields both
in one forward pass. ``OODReference`` holds class-conditional Gaussians with one shared
covariance (Lee et al. 2018) fitted on the training split, on the embedding, on the image's
layout and on its acquisition style; an image's ``ood_score`` is the largest of its scaled
Mahalanobis distances to the nearest class mean. It is stored beside the checkpoint as
``ood.safetensors`` (tensors only, no pickle); the referral threshold lives in ``model.json``
(``ood_threshold``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
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


APPEARANCE_SIDE = 24  # appearance features: the work image area-averaged to 24 x 24, standardised
APPEARANCE_DIMS = 16  # ... projected on the 16 leading principal components of the training images
PIXEL_DIMS = APPEARANCE_SIDE ** 2
TEXTURE_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
TEXTURE_SCALES = (1, 2, 4, 8)


def texture_features(x: torch.Tensor) -> torch.Tensor:
    """Acquisition-style statistics of work images (B, 1, H, W) in 0-255 -> (B, 17): intensity
    quantiles (windowing, gamma), log sd, shares of black and white pixels (clipping, padding),
    share of the 256 grey levels used (contrast stretching, bit depth), log band-pass energy at
    4 scales relative to the sd (sharpness, resampling, noise, compression), a noise estimate
    (median absolute neighbour difference) and the frame-minus-centre mean (borders). What a new
    scanner, hospital or re-encoding changes and the disease does not."""
    v = x / 255.0
    flat = v.flatten(1)
    sd = flat.std(1).clamp_min(1e-4)
    q = torch.quantile(flat, torch.tensor(TEXTURE_QUANTILES), dim=1).T
    levels = torch.zeros(len(x), 256).scatter_add_(1, x.flatten(1).round().clamp(0, 255).long(),
                                                    torch.ones_like(flat))
    feats = [q, sd.log()[:, None], (flat <= 0.5 / 255).float().mean(1, keepdim=True),
             (flat >= 254.5 / 255).float().mean(1, keepdim=True), (levels > 0).float().mean(1, keepdim=True)]
    for s in TEXTURE_SCALES:
        level = torch.nn.functional.avg_pool2d(v, s) if s > 1 else v
        smooth = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(level, (1, 1, 1, 1), mode="replicate"), 3, 1)
        feats.append(((level - smooth).abs().mean((1, 2, 3)) / sd).clamp_min(1e-6).log()[:, None])
    diff = (v[..., :, 1:] - v[..., :, :-1]).abs().flatten(1)
    feats.append((diff.median(1).values / sd).clamp_min(1e-6).log()[:, None])
    h, w = v.shape[-2:]
    b = max(1, min(h, w) // 32)
    inner = v[..., b:h - b, b:w - b]
    frame_mean = (v.sum((1, 2, 3)) - inner.sum((1, 2, 3))) / (h * w - inner[0].numel())
    feats.append(((frame_mean - inner.mean((1, 2, 3))) / sd)[:, None])
    return torch.cat(feats, 1)


def appearance_features(images) -> np.ndarray:
    """uint8 work images (B, H, W), numpy or torch -> (B, 576 + 17) float32 appearance features:
    24 x 24 area averages, each image standardised (mean 0, sd 1), then ``texture_features``."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    x = x.float().cpu()[:, None]
    pixels = torch.nn.functional.interpolate(x, size=(APPEARANCE_SIDE,) * 2, mode="area").flatten(1)
    pixels = (pixels - pixels.mean(1, keepdim=True)) / (pixels.std(1, keepdim=True) + 1e-6)
    return torch.cat([pixels, texture_features(x)], 1).numpy().astype(np.float32)


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
    """Class-conditional Gaussian references with shared covariances, fitted on the training
    split, in three spaces: the classifier's penultimate embedding (``means``, ``precision``:
    what the model computes from the image), the image's layout (``app_*``: 16 leading principal
    components of the 24 x 24 thumbnail of ``appearance_features``) and its acquisition style
    (``tex_*``: the standardised ``texture_features``). ``score`` is the largest of the distances,
    each divided by its median on the validation split (``scale``), so all count alike. The
    appearance and texture parts are optional (None: not used)."""

    means: np.ndarray
    precision: np.ndarray
    app_center: np.ndarray | None = None
    app_basis: np.ndarray | None = None
    app_means: np.ndarray | None = None
    app_precision: np.ndarray | None = None
    scale: np.ndarray = field(default_factory=lambda: np.ones(3, np.float32))
    tex_center: np.ndarray | None = None
    tex_sd: np.ndarray | None = None
    tex_means: np.ndarray | None = None
    tex_precision: np.ndarray | None = None

    @classmethod
    def fit(cls, embeddings: np.ndarray, targets: np.ndarray, appearance: np.ndarray | None = None,
            shrinkage: float = 0.05) -> OODReference:
        """Fit the references on the training split (``appearance``: ``appearance_features``)."""
        means, precision = _gaussians(embeddings, targets, shrinkage)
        if appearance is None:
            return cls(means, precision)
        pixels, texture = appearance[:, :PIXEL_DIMS], appearance[:, PIXEL_DIMS:]
        center = pixels.mean(0)
        _, _, vt = np.linalg.svd(pixels - center, full_matrices=False)
        basis = vt[:APPEARANCE_DIMS].astype(np.float32)
        app_means, app_precision = _gaussians((pixels - center) @ basis.T, targets, shrinkage)
        ref = cls(means, precision, center.astype(np.float32), basis, app_means, app_precision)
        if texture.shape[1]:
            ref.tex_center, ref.tex_sd = texture.mean(0).astype(np.float32), (texture.std(0) + 1e-6).astype(np.float32)
            ref.tex_means, ref.tex_precision = _gaussians((texture - ref.tex_center) / ref.tex_sd, targets, shrinkage)
        return ref

    def parts(self, embeddings: np.ndarray, appearance: np.ndarray | None = None) -> np.ndarray:
        """(N, 3) unscaled distances: embedding, appearance, texture (NaN where a part is not fitted)."""
        e = _distance(embeddings, self.means, self.precision)
        a, t = np.full(len(e), np.nan, np.float32), np.full(len(e), np.nan, np.float32)
        if self.app_basis is not None:
            if appearance is None:
                raise ValueError("this OOD reference needs the images' appearance features")
            pixels = appearance[:, :len(self.app_center)]
            a = _distance((pixels - self.app_center) @ self.app_basis.T, self.app_means, self.app_precision)
            if self.tex_means is not None:
                texture = appearance[:, len(self.app_center):]
                if texture.shape[1] != len(self.tex_center):
                    raise ValueError(f"this OOD reference needs {len(self.tex_center)} texture features, "
                                     f"not {texture.shape[1]}")
                t = _distance((texture - self.tex_center) / self.tex_sd, self.tex_means, self.tex_precision)
        return np.stack([e, a, t], 1)

    def set_scale(self, embeddings: np.ndarray, appearance: np.ndarray | None = None) -> OODReference:
        """Divide each distance by its median on these (validation) images."""
        med = np.nanmedian(self.parts(embeddings, appearance), 0)
        self.scale = np.where(np.isfinite(med) & (med > 0), med, 1.0).astype(np.float32)
        return self

    def score(self, embeddings: np.ndarray, appearance: np.ndarray | None = None) -> np.ndarray:
        """``ood_score`` per row: the largest scaled distance (higher = less like the training data)."""
        return np.nanmax(self.parts(embeddings, appearance) / self.scale, 1).astype(np.float32)

    def with_site(self, embeddings: np.ndarray, targets: np.ndarray, appearance: np.ndarray | None) -> OODReference:
        """A copy whose Gaussians also include a site's class means (same covariances and scale)."""
        def add(means, x):
            return np.concatenate([means, np.stack([x[targets == c].mean(0) for c in np.unique(targets)])
                                   .astype(np.float32)])
        site = copy.copy(self)
        site.means = add(self.means, embeddings)
        if self.app_basis is not None:
            n = len(self.app_center)
            site.app_means = add(self.app_means, (appearance[:, :n] - self.app_center) @ self.app_basis.T)
            if self.tex_means is not None:
                site.tex_means = add(self.tex_means, (appearance[:, n:] - self.tex_center) / self.tex_sd)
        return site

    def save(self, folder: str | Path) -> Path:
        from safetensors.numpy import save_file

        path = Path(folder) / OOD_FILE
        tensors = {k: v for k, v in self.__dict__.items() if v is not None}
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(path))
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
        unknown = set(t) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown tensors {sorted(unknown)}")
        app = [t.get(k) for k in ("app_center", "app_basis", "app_means", "app_precision")]
        if any(a is not None for a in app):
            c, b, m, p = app
            if any(a is None for a in app) or b.shape[1] != c.shape[0] or m.shape[1] != b.shape[0] \
                    or p.shape != (b.shape[0],) * 2:
                raise ValueError(f"{path}: inconsistent appearance tensors")
        tex = [t.get(k) for k in ("tex_center", "tex_sd", "tex_means", "tex_precision")]
        if any(a is not None for a in tex):
            c, sd, m, p = tex
            if app[0] is None or any(a is None for a in tex) or sd.shape != c.shape or m.shape[1:] != c.shape \
                    or p.shape != (c.shape[0],) * 2 or (sd <= 0).any():
                raise ValueError(f"{path}: inconsistent texture tensors")
        scale = t.get("scale", np.ones(3, np.float32))
        if not all(np.isfinite(v).all() for v in t.values()) or scale.shape not in ((2,), (3,)) or (scale <= 0).any():
            raise ValueError(f"{path}: non-finite values or a bad 'scale'")
        scale = np.concatenate([scale, np.ones(3 - len(scale), np.float32)])  # references saved before texture
        return cls(means, precision, *app, scale, *tex)


def knn_score(reference: np.ndarray, embeddings: np.ndarray, k: int = 10) -> np.ndarray:
    """k-th nearest-neighbour distance between L2-normalised embeddings (Sun et al. 2022), the
    alternative ``ood_score`` compared with Mahalanobis in the shortcut audit."""
    ref = reference / np.linalg.norm(reference, axis=1, keepdims=True).clip(1e-6)
    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(1e-6)
    d = np.sqrt(np.clip(2 - 2 * x @ ref.T, 0, None))
    return np.sort(d, axis=1)[:, min(k, ref.shape[0]) - 1].astype(np.float32)
