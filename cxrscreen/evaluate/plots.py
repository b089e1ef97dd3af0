"""The report's figures (matplotlib, headless), each returned as PNG bytes."""

from __future__ import annotations

import io

import numpy as np


def _plt():
    from cxrscreen.extras import require

    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def class_distribution(counts: dict[str, dict[str, int]]) -> bytes:
    """Grouped bars: images per class (x) for each split (bars)."""
    plt = _plt()
    splits = list(counts)
    classes = sorted({c for v in counts.values() for c in v})
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(len(splits), 1)
    for i, s in enumerate(splits):
        ax.bar(np.arange(len(classes)) + i * width, [counts[s].get(c, 0) for c in classes], width, label=s)
    ax.set_xticks(np.arange(len(classes)) + width * (len(splits) - 1) / 2, classes, rotation=15)
    ax.set_ylabel("images")
    ax.legend()
    return _png(fig)


def training_curves(history: dict[str, list]) -> bytes:
    """Loss (train, val) and validation score per epoch."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    for key in ("train_loss", "val_loss"):
        if key in history:
            a.plot(history["epoch"], history[key], marker=".", label=key)
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    for key in ("val_accuracy", "val_macro_f1", "val_dice"):
        if key in history:
            b.plot(history["epoch"], history[key], marker=".", label=key)
    b.set_xlabel("epoch")
    b.set_ylabel("validation score")
    b.legend()
    return _png(fig)


def text_colour(value: float, top: float) -> str:
    """White on the dark half of a sequential colour map, black on the light half."""
    return "white" if top > 0 and value > top / 2 else "black"


def confusion(cm: np.ndarray, classes: list[str]) -> bytes:
    plt = _plt()
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", color=text_colour(cm[i, j], cm.max()))
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return _png(fig)


def roc_curves(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> bytes:
    """One-vs-rest ROC curve per class, with its AUC."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for i, c in enumerate(classes):
        pos = y == i
        if pos.any() and (~pos).any():
            fpr, tpr, _ = roc_curve(pos, probs[:, i])
            ax.plot(fpr, tpr, label=f"{c} (AUC {roc_auc_score(pos, probs[:, i]):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("sensitivity")
    ax.legend(fontsize=7)
    return _png(fig)


def reliability_bins(y: np.ndarray, probs: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bin edges, accuracy (NaN for an empty bin) and image count per bin of top-class confidence."""
    conf, correct = probs.max(1), probs.argmax(1) == y
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges) - 1, 0, bins - 1)
    counts = np.bincount(idx, minlength=bins)
    acc = np.array([correct[idx == b].mean() if counts[b] else np.nan for b in range(bins)])
    return edges, acc, counts


def reliability(y: np.ndarray, probs: np.ndarray, bins: int = 10) -> bytes:
    """Accuracy vs confidence of the top class, per confidence bin (gap = miscalibration); the
    number of images of each bin is written above its bar (a bin of 3 images says little)."""
    plt = _plt()
    edges, acc, counts = reliability_bins(y, probs, bins)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.bar(edges[:-1], acc, width=1 / bins, align="edge", edgecolor="k", alpha=0.7, label="accuracy")
    for b in np.flatnonzero(counts):
        ax.text(edges[b] + 0.5 / bins, min(acc[b] + 0.02, 1.02), f"n={counts[b]}", ha="center", va="bottom", fontsize=6)
    ax.set_ylim(0, 1.1)
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend()
    return _png(fig)


def crosstab(table, title: str) -> bytes:
    """Heatmap of a label x cluster crosstab (a polars frame with a ``label`` column)."""
    plt = _plt()
    counts = table.drop("label").to_numpy()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.imshow(counts, cmap="Greens")
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(j, i, int(counts[i, j]), ha="center", va="center",
                    color=text_colour(counts[i, j], counts.max()))
    ax.set_xticks(range(counts.shape[1]), [f"c{c}" for c in table.columns[1:]])
    ax.set_yticks(range(counts.shape[0]), table["label"].to_list())
    ax.set_title(title, fontsize=9)
    return _png(fig)


def count_plot(sizes: np.ndarray, title: str) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 2.5))
    ax.bar([f"c{i}" for i in range(len(sizes))], sizes)
    ax.set_ylabel("images")
    ax.set_title(title, fontsize=9)
    return _png(fig)


def image_grid(images: list[np.ndarray], titles: list[str], cols: int = 4, marked: list[bool] | None = None) -> bytes:
    """Grayscale or RGB uint8 images in a grid with a title each (sample predictions, overlays);
    ``marked`` images (misclassified samples) get a red frame and a red title."""
    plt = _plt()
    rows = max(1, -(-len(images) // cols))
    wide = images[0].shape[1] / images[0].shape[0] if images else 1
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.4 * wide, rows * 2.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    marked = marked or [False] * len(images)
    for ax, img, title, mark in zip(axes.flat, images, titles, marked):
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
        ax.set_title(title, fontsize=7, color="red" if mark else "black")
        if mark:
            h, w = img.shape[:2]
            ax.add_patch(plt.Rectangle((0, 0), w - 1, h - 1, fill=False, edgecolor="red", linewidth=3))
    return _png(fig)
