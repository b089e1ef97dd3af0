"""One self-contained HTML report (and its figures as PNG files) comparing trained models.

Sections: data (class distribution per split), the comparison table (also written as
Parquet and Markdown), and per model: training curves, confusion matrix, ROC curves,
reliability diagram, sample predictions, Grad-CAM overlays with the CAM energy inside the
lungs, k-means of pixels and of the model's embeddings; lung segmentation (expert-mask
metrics and image / expert mask / predicted mask triplets); leave-one-source-out tables,
lung crop vs whole image side by side.
"""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from cxrscreen.evaluate import plots
from cxrscreen.evaluate.card import markdown_table

class _Page:
    """Collects sections of HTML and writes every figure to ``plots/`` as well."""

    def __init__(self, out: Path):
        self.out, self.parts = out, []
        (out / "plots").mkdir(parents=True, exist_ok=True)

    def h(self, level: int, text: str) -> None:
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def p(self, text: str, css: str = "") -> None:
        self.parts.append(f"<p{f' class={css!r}' if css else ''}>{html.escape(text)}</p>")

    def figure(self, name: str, png: bytes, caption: str) -> None:
        (self.out / "plots" / f"{name}.png").write_bytes(png)
        b64 = base64.b64encode(png).decode()
        self.parts.append(f'<figure><img src="data:image/png;base64,{b64}" alt="{html.escape(caption)}">'
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def table(self, df: pl.DataFrame) -> None:
        """A table that scrolls sideways inside its own box when wider than the page."""
        head = "".join(f"<th>{html.escape(c.replace('_', ' '))}</th>" for c in df.columns)
        body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in df.iter_rows())
        self.parts.append(f'<div class="wide"><table><tr>{head}</tr>{body}</table></div>')

    def write(self, title: str) -> Path:
        style = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
                 "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px}"
                 "th{max-width:9em;white-space:normal;vertical-align:bottom}td{white-space:nowrap}"
                 ".wide{max-width:100%;overflow-x:auto;margin-bottom:1em}"
                 ".warning{border:2px solid #b00;padding:6px;font-weight:bold}"
                 "figure{display:inline-block;margin:6px;vertical-align:top}img{max-width:100%}"
                 "figcaption{font-size:11px;color:#555}")
        page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{''.join(self.parts)}</body></html>")
        path = self.out / "report.html"
        path.write_text(page)
        return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if np.isnan(v) else f"{v:.4g}"
    return html.escape("" if v is None else str(v))


def inference_images_per_s(module: torch.nn.Module, size: int, in_channels: int, intensity: str = "raw",
                           batch: int = 32, repeats: int = 5) -> float:
    """Images/s of one batch of work images through ``predict.module_logits`` (model input +
    forward, torch fp32, this machine's CPU threads): the best of ``repeats`` timed batches after
    one warm-up (one timing alone varied 1.8x for the same model)."""
    from cxrscreen.predict import module_logits

    images = np.random.default_rng(0).integers(0, 256, (batch, 256, 256), dtype=np.uint8)
    module_logits(module, images, size, in_channels, intensity, batch=batch)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        module_logits(module, images, size, in_channels, intensity, batch=batch)
        best = min(best, time.perf_counter() - t0)
    return batch / best


def _model_section(page: _Page, model_dir: Path, res: dict, segmenter: str | None, samples: int,
                   kmeans_images: int, seed: int) -> tuple[dict, dict]:
    """Figures of one model; returns its comparison-table row and its settings row (weights
    hash and referral settings, for the page's header)."""
    from cxrscreen.evaluate.kmeans import kmeans_crosstab, pixel_features
    from cxrscreen.explain import explain_items, overlays
    from cxrscreen.io.sources import InputItem
    from cxrscreen.models import load_model
    from cxrscreen.pipeline.config import ClassifierOptions, RuntimeOptions, SegmenterOptions
    from cxrscreen.pipeline.stages import Classifier, Segmenter
    from cxrscreen.predict import classify_images
    from cxrscreen.train.data import load_images

    loaded = load_model(str(model_dir), "classify")
    info, tag = loaded.info, model_dir.name
    m, pred = res["metrics"], res.pop("predictions")
    rows, y, probs, classes = pred["rows"], pred["y"], pred["probs"], m["classes"]
    page.h(2, f"Model {tag} ({info.name}{', lung crop' if info.lung_crop else ''})")
    page.p(f"{res['split']} split of {res['data']}: n={m['n']}, accuracy {m['accuracy']:.4f}, macro-F1 "
           f"{m['macro_f1']:.4f}, macro AUROC {m['macro_auc']:.4f}, ECE {m['ece']:.4f} (temperature "
           f"{res['temperature']:.2f} fitted on val).")
    if (model_dir / "history.parquet").exists():
        page.figure(f"{tag}-training", plots.training_curves(pl.read_parquet(model_dir / "history.parquet").to_dict(
            as_series=False)), f"{tag}: training curves")
    page.figure(f"{tag}-confusion", plots.confusion(np.array(m["confusion_matrix"]), classes), f"{tag}: confusion matrix")
    page.figure(f"{tag}-roc", plots.roc_curves(y, probs, classes), f"{tag}: ROC curves, one vs rest")
    page.figure(f"{tag}-reliability", plots.reliability(y, probs), f"{tag}: reliability diagram (after temperature scaling)")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(rows), min(samples, len(rows)), replace=False))
    files = [rows["file"][int(i)] for i in pick]
    segmenter = segmenter or info.lung_crop  # a crop-trained model needs its lung boxes
    cpu = RuntimeOptions(device="cpu", runtime="torch")
    cls = Classifier(ClassifierOptions(str(model_dir), cam="gradcam", cam_size=256), cpu)
    seg = Segmenter(SegmenterOptions(segmenter), cpu) if segmenter else None
    batch, images = explain_items([InputItem(key=Path(f).name, path=f) for f in files], cls, seg)
    wrong = [bool(probs[i].argmax() != y[i]) for i in pick]
    titles = [f"true {classes[y[i]]}\npred {classes[probs[i].argmax()]} {probs[i].max():.2f}"
              + (" WRONG" if w else "") for i, w in zip(pick, wrong)]
    page.figure(f"{tag}-samples", plots.image_grid(list(images), titles, marked=wrong),
                f"{tag}: sample test predictions ({sum(wrong)} of {len(wrong)} misclassified, framed in red)")
    energy = batch["cam_lung_energy"][batch["status"] == "ok"]
    trips = overlays(batch, images, cls.lung_crop)
    page.figure(f"{tag}-gradcam", plots.image_grid(
        [t for _, t in trips], [f"{titles[j].splitlines()[0]}, CAM in lungs {batch['cam_lung_energy'][j]:.2f}"
                                for j, _ in trips], cols=2),
        f"{tag}: image / lung mask / Grad-CAM of the predicted class")
    km_pick = np.sort(rng.choice(len(rows), min(kmeans_images, len(rows)), replace=False))
    km_rows = rows[km_pick.tolist()]
    km_images, km_ok = load_images(km_rows["file"].to_list())
    labels = [c for c, k in zip(km_rows["target"].to_list(), km_ok) if k]
    kmeans = {}
    km_out = classify_images(cls.runner, km_images[km_ok])  # penultimate embeddings (cxrscreen.models.ood)
    spaces = [("pixels", pixel_features(km_images[km_ok]))]
    if km_out.embeddings is not None:  # None: a model whose last linear layer is not its output
        spaces.append(("embeddings", km_out.embeddings))
    for name, feats in spaces:
        km = kmeans_crosstab(feats, labels, seed=seed)
        kmeans[name] = km
        page.figure(f"{tag}-kmeans-{name}", plots.crosstab(km["crosstab"], f"k-means of {name}: purity "
                    f"{km['purity']:.2f}, ARI {km['adjusted_rand']:.2f}"), f"{tag}: k-means of {name} vs labels")
        page.figure(f"{tag}-kmeans-{name}-counts", plots.count_plot(km["cluster_sizes"], f"cluster sizes ({name})"),
                    f"{tag}: images per cluster ({name})")
    per_class = m["per_class"].get("covid", {})
    three = res.get("derived", {}).get("3class", {}) if len(classes) > 3 else m
    settings = {"model": tag, "architecture": res["model"], "weights_sha256": loaded.weights_sha256,
                "temperature": res["temperature"], "refer_threshold": res["refer_threshold"],
                "covid_sensitivity_target": res["refer_target"]["sensitivity"],
                "ood_threshold": res["ood_threshold"], "ood_refer_rate": res["ood_refer_rate"],
                "referred": res["referred_fraction"]}
    return {"model": tag, "architecture": info.name, "lung_crop": info.lung_crop or "", "split": res["split"],
            "n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "macro_auc": m["macro_auc"],
            "ece": m["ece"], "accuracy_3class": three.get("accuracy") if len(classes) >= 3 else None,
            "covid_sensitivity": per_class.get("recall"), "covid_ppv": per_class.get("precision"),
            "params": int(sum(p.numel() for p in loaded.module.parameters())),
            "train_seconds": info.metrics.get("train_seconds"),
            "inference_images_per_s": inference_images_per_s(loaded.module, info.input_size, info.in_channels,
                                                             info.intensity),
            "cam_lung_energy": float(np.nanmean(energy)) if segmenter and len(energy) else None,
            "kmeans_pixels_ari": kmeans["pixels"]["adjusted_rand"],
            "kmeans_embeddings_ari": kmeans["embeddings"]["adjusted_rand"] if "embeddings" in kmeans else None}, settings


def _segmentation_section(page: _Page, segmenter: str, seg_data: str | None, samples: int) -> dict:
    """Metrics of the segmenter (from its model.json) and image / expert / predicted triplets;
    returns its settings row (name, architecture, weights hash) for the page's header."""
    from cxrscreen.data.manifest import read_seg_manifest
    from cxrscreen.cam import triplet
    from cxrscreen.masks import decode_mask_png
    from cxrscreen.models import load_model
    from cxrscreen.io.batch import image_batch
    from cxrscreen.pipeline.config import RuntimeOptions, SegmenterOptions
    from cxrscreen.pipeline.stages import Segmenter
    from cxrscreen.train.data import load_images

    loaded = load_model(segmenter, "segment")
    settings = {"model": segmenter, "architecture": loaded.info.name, "weights_sha256": loaded.weights_sha256}
    page.h(2, f"Lung segmentation ({loaded.info.name}, {loaded.info.input_size} px)")
    metrics = {k: v for k, v in loaded.info.metrics.items() if isinstance(v, dict) and "dice" in v}
    if metrics:
        page.table(pl.DataFrame([{"evaluation set": k, **{m: v.get(m) for m in ("n", "dice", "iou", "pixel_accuracy")}}
                                 for k, v in metrics.items()]))
        page.p("expert_masks: Dice against the expert masks (ground truth); pseudo_masks_val: against "
               "machine-made pseudo masks of the validation split (agreement, not accuracy).")
    if not seg_data or not Path(seg_data).exists():
        return settings
    df = read_seg_manifest(seg_data)
    if "subset" in df.columns:
        df = df.filter(pl.col("subset") == "expert")
    df = df.head(samples)
    images, ok = load_images(df["file"].to_list())
    truth, ok_m = load_images(df["mask_file"].to_list())
    good = ok & ok_m
    images, truth, files = images[good], truth[good], [f for f, g in zip(df["file"], good) if g]
    batch = Segmenter(SegmenterOptions(segmenter), RuntimeOptions(device="cpu", runtime="torch"))(image_batch(images))
    panels, titles = [], []
    for i, f in enumerate(files):
        pred = decode_mask_png(batch["lung_mask_png"][i])
        panels.append(np.concatenate([triplet(images[i], truth[i] > 127), triplet(images[i], pred)[:, 256:]], axis=1))
        titles.append(f"{Path(f).name}: image | expert mask | predicted mask")
    if panels:
        page.figure("segmentation-triplets", plots.image_grid(panels, titles, cols=2),
                    "lung segmentation on expert-annotated images")
    return settings


def build_report(model_dirs: list[str | Path], out_dir: str | Path, data: str | None = None, split: str = "test",
                 segmenter: str | None = "unet-lungs", seg_data: str | None = None,
                 loso: list[str | Path] | None = None, samples: int = 8, kmeans_images: int = 600,
                 seed: int = 0, progress=lambda message: None) -> Path:
    """Evaluate every model on ``split`` (leakage checks included) and write ``report.html``,
    ``plots/*.png``, ``comparison.parquet`` and ``comparison.md`` to ``out_dir``.
    ``loso``: ``loso.parquet`` files written by ``leave_one_source_out`` (crop and whole image).
    The page opens with what it was made from: cxrscreen version, date, each model's weights
    hash and referral settings. ``progress(message)`` is called before each long step."""
    from datetime import datetime, timezone

    from cxrscreen import __version__

    from cxrscreen.evaluate.run import evaluate_model
    from cxrscreen.train.config import checkpoint_config
    from cxrscreen.train.data import labeled_splits

    out = Path(out_dir)
    page = _Page(out)
    first = Path(model_dirs[0])
    cfg = checkpoint_config(first)
    if data:
        cfg.data = data
    df, _ = labeled_splits(cfg)
    page.h(2, "Data")
    page.p(f"{cfg.data}: {len(df)} images, patient-level splits; sources: "
           + ", ".join(f"{s} ({n})" for s, n in df.group_by("source").len().sort("source").iter_rows()))
    counts = {s: dict(g.group_by("target").len().iter_rows()) for (s,), g in df.group_by("split", maintain_order=True)}
    page.figure("class-distribution", plots.class_distribution(counts), "images per class and split")
    sections, rows, settings = [], [], []
    for k, model_dir in enumerate(map(Path, model_dirs), 1):
        progress(f"[{k}/{len(model_dirs)}] {model_dir.name}: evaluating on the {split} split")
        res = evaluate_model(model_dir, data, split, update_card=False, predictions=True)
        progress(f"[{k}/{len(model_dirs)}] {model_dir.name}: figures, Grad-CAM and k-means")
        sub = _Page(out)
        row, model_settings = _model_section(sub, model_dir, res, segmenter, samples, kmeans_images, seed)
        rows.append(row)
        settings.append(model_settings)
        sections.append(sub.parts)
    table = pl.DataFrame(rows, infer_schema_length=None)
    table.write_parquet(out / "comparison.parquet")
    (out / "comparison.md").write_text("\n".join(markdown_table(table)) + "\n")
    page.h(2, "Comparison")
    page.p(f"Every model on the {split} split; inference images/s = torch fp32 model forward on this machine's "
           "CPU, batch 32; cam_lung_energy = mean fraction of Grad-CAM energy inside the segmented lungs on "
           "the sample images (low: the model looks outside the lungs).")
    page.table(table)
    if table["lung_crop"].n_unique() > 1:
        page.h(3, "Lung crop vs whole image")
        page.table(table.select("model", "architecture", "lung_crop", "accuracy", "macro_f1", "macro_auc",
                                "cam_lung_energy").sort("architecture", "lung_crop"))
    for parts in sections:
        page.parts += parts
    if segmenter:
        progress(f"segmentation: {segmenter}")
        settings.append(_segmentation_section(page, segmenter, seg_data, samples))
    if loso:
        page.h(2, "Leave one source out")
        page.p("Each row: a model trained without one source, tested on all of that source's images (classes "
               "the fold never saw are left out) next to the same model's in-source test split.")
        page.table(pl.concat([pl.read_parquet(p) for p in loso], how="diagonal_relaxed"))
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    about = _Page(out)
    about.p("Research models trained on public data with strong source bias: not a medical device, not a "
            "diagnosis.", css="warning")
    about.p(f"Made by cxrscreen {__version__} on {made} from {cfg.data} ({split} split). Referral: a row is "
            "referred when its screening confidence is below refer_threshold (chosen on val for the stated "
            "COVID sensitivity) or its ood_score is above ood_threshold (referring the stated share of val); "
            "referred = share of this split referred.")
    about.table(pl.DataFrame(settings, infer_schema_length=None))
    page.parts = about.parts + page.parts
    progress(f"writing {out / 'report.html'}")
    return page.write("cxrscreen model report")
