"""Metrics in plain numpy, below training and evaluation, which both use them: classification
(the papers' set, plus calibration and referral thresholds) and lung masks."""

from __future__ import annotations

import numpy as np


def confusion_matrix(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """k x k counts, rows = true class, columns = predicted class."""
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (np.asarray(y), np.asarray(pred)), 1)
    return cm


def roc_auc_ovr(y: np.ndarray, probs: np.ndarray) -> list[float]:
    """One-vs-rest ROC-AUC per class (Mann-Whitney U with tie correction; NaN if one-sided)."""
    from scipy.stats import rankdata

    out = []
    for c in range(probs.shape[1]):
        pos = np.asarray(y) == c
        n1, n0 = pos.sum(), (~pos).sum()
        if n1 == 0 or n0 == 0:
            out.append(float("nan"))
            continue
        r = rankdata(probs[:, c])
        out.append(float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)))
    return out


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-class confidence over equal-width bins."""
    conf, pred = probs.max(1), probs.argmax(1)
    correct = pred == np.asarray(y)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def classification_metrics(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, per-class precision/recall(=sensitivity)/specificity/F1/AUC, macro and
    weighted averages, confusion matrix and ECE."""
    y = np.asarray(y)
    k = len(classes)
    pred = probs.argmax(1)
    cm = confusion_matrix(y, pred, k)
    tp = np.diag(cm).astype(float)
    support = cm.sum(1).astype(float)
    predicted = cm.sum(0).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        tn = cm.sum() - support - predicted + tp
        specificity = np.where(cm.sum() - support > 0, tn / (cm.sum() - support), 0.0)
    auc = roc_auc_ovr(y, probs)
    w = support / max(support.sum(), 1)
    per_class = {c: {"precision": float(precision[i]), "recall": float(recall[i]),
                     "sensitivity": float(recall[i]), "specificity": float(specificity[i]),
                     "f1": float(f1[i]), "auc": auc[i], "support": int(support[i])}
                 for i, c in enumerate(classes)}
    return {
        "n": int(len(y)), "accuracy": float(tp.sum() / max(len(y), 1)),
        "macro_precision": float(precision.mean()), "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()), "weighted_precision": float((precision * w).sum()),
        "weighted_recall": float((recall * w).sum()), "weighted_f1": float((f1 * w).sum()),
        "macro_auc": float(np.nanmean(auc)) if not np.all(np.isnan(auc)) else float("nan"),
        "ece": expected_calibration_error(probs, y), "per_class": per_class,
        "confusion_matrix": cm.tolist(), "classes": list(classes),
    }


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature minimising the negative log-likelihood (bounded 1-D search on log T)."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y)

    def nll(log_t):
        p = softmax(logits, float(np.exp(log_t)))
        return -np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean()

    return float(np.exp(minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded").x))


def refer_threshold(probs: np.ndarray, y: np.ndarray, positive: int, target_sensitivity: float = 0.99,
                    classes: list[str] | None = None) -> float:
    """Smallest confidence threshold t such that, when every image with confidence < t is
    referred to a reader, at least ``target_sensitivity`` of the ``positive`` class is caught
    (predicted positive or referred). Confidence: ``referral.screening_confidence`` with
    ``classes``, else the top probability. Returns 0.0 when the model alone already reaches it."""
    from cxrscreen.referral import screening_confidence

    y = np.asarray(y)
    pos = y == positive
    if not pos.any():
        return 0.0
    conf = screening_confidence(probs, classes) if classes else probs.max(1)
    pred = probs.argmax(1)
    for t in np.unique(np.concatenate([[0.0], conf[pos] + 1e-6])):
        caught = (pred[pos] == positive) | (conf[pos] < t)
        if caught.mean() >= target_sensitivity:
            return float(t)
    return 1.0 + 1e-6  # refer everything


def binary_auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (NaN if a side is empty)."""
    y = np.r_[np.zeros(len(negatives), int), np.ones(len(positives), int)]
    s = np.r_[np.asarray(negatives, float), np.asarray(positives, float)]
    return roc_auc_ovr(y, np.stack([-s, s], 1))[1]


def accuracy_at_coverage(y: np.ndarray, pred: np.ndarray, referred: np.ndarray) -> dict:
    """Accuracy of the rows not referred, and their share (coverage)."""
    kept = ~np.asarray(referred, bool)
    return {"coverage": float(kept.mean()) if len(kept) else float("nan"),
            "accuracy": float((np.asarray(pred)[kept] == np.asarray(y)[kept]).mean()) if kept.any() else float("nan"),
            "n": int(len(kept))}


THREE_CLASSES = ("covid", "normal", "viral_pneumonia")  # the papers' 3-class read-out of a 4-class model


def accuracy_at_coverage_3class(y: np.ndarray, probs: np.ndarray, referred: np.ndarray, classes: list[str]) -> dict | None:
    """``accuracy_at_coverage`` of the 3-class read-out: images of covid / normal / viral pneumonia
    only, each predicted as the largest of those three probabilities (None without those classes
    or without another)."""
    if not set(THREE_CLASSES) <= set(classes) or len(classes) <= 3:
        return None
    idx = [classes.index(c) for c in THREE_CLASSES]
    keep = np.isin(y, idx)
    pred = np.array(idx)[np.asarray(probs)[:, idx].argmax(1)]
    return accuracy_at_coverage(np.asarray(y)[keep], pred[keep], np.asarray(referred, bool)[keep])


def mask_metrics(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Dice, IoU and pixel accuracy of boolean masks (B, H, W): ``raw`` and ``cleaned`` (two
    largest regions kept, filled: what ``score`` stores)."""
    from cxrscreen.masks import dice_scores, lung_regions

    out = {}
    for variant, p in (("raw", pred), ("cleaned", np.stack([lung_regions(m).mask for m in pred]))):
        inter, union = (p & truth).sum((1, 2)), (p | truth).sum((1, 2))
        out[variant] = {"n": int(len(p)), "dice": float(dice_scores(p, truth).mean()),
                        "iou": float(((inter + 1e-6) / (union + 1e-6)).mean()),
                        "pixel_accuracy": float((p == truth).mean())}
    return out
