"""MODEL_CARD.md rendered from the evaluated checkpoints' model.json (no hand-copied numbers)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from cxrscreen.models.checkpoint import read_info, read_train_config


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _class_table(m: dict) -> list[str]:
    rows = ["| class | precision | recall (sensitivity) | specificity | F1 | AUC | n |", "|---|---|---|---|---|---|---|"]
    for c, v in m["per_class"].items():
        rows.append(f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['specificity']:.3f} | "
                    f"{v['f1']:.3f} | {v['auc']:.3f} | {v['support']} |")
    rows.append(f"| **macro avg** | {m['macro_precision']:.3f} | {m['macro_recall']:.3f} | | {m['macro_f1']:.3f} | "
                f"{m['macro_auc']:.3f} | {m['n']} |")
    rows.append(f"| **weighted avg** | {m['weighted_precision']:.3f} | {m['weighted_recall']:.3f} | | "
                f"{m['weighted_f1']:.3f} | | |")
    return rows


def _confusion(m: dict) -> list[str]:
    cls = m["classes"]
    rows = ["| true \\ predicted | " + " | ".join(cls) + " |", "|---" * (len(cls) + 1) + "|"]
    rows += [f"| {c} | " + " | ".join(str(v) for v in r) + " |" for c, r in zip(cls, m["confusion_matrix"])]
    return rows


def _ensemble_lines(card: dict) -> list[str]:
    members = card["metrics"].get("members")
    if not members:
        return []
    k = card["kwargs"]
    each = "; ".join(f"seed {m['seed']}, best epoch {m['best_epoch']} of {m['epochs_run']}, val accuracy "
                     f"{_pct(m['val']['accuracy'])}" for m in members)
    return [f"- **Ensemble**: {k['n']} {k['member']} members combined by `cxrscreen ensemble` (mean "
            f"log-probability, calibrated on val as one model; `ood_score` on the members' embeddings side by "
            f"side). {each}."]


def _adaptation_lines(metrics: dict) -> list[str]:
    a = metrics.get("adaptation")
    if not a:
        return []
    return [f"- **Adapted to the {a['images']} expert masks** (`cxrscreen adapt-segmenter`: {a['steps']} Adam steps, "
            f"lr {a['lr']}, batch {a['batch_size']}, augmentation {a['augment']}). Its own expert Dice would be a "
            "training score, so the expert rows below are the **leave-one-out** estimate (each image scored by a "
            f"copy adapted on the other {a['images'] - 1}) and the pseudo-trained model's held-out score. The "
            "pseudo-mask rows show what adapting costs on the pediatric pseudo masks, whose boundary convention "
            "(drawn by another U-Net) differs from the experts'."]


def _segmenter_section(sdir: Path) -> list[str]:
    """A U-Net's card section: data, training, adaptation, Dice on expert and pseudo masks."""
    s, scfg = dataclasses.asdict(read_info(sdir)), read_train_config(sdir)
    sm = s["metrics"]
    lines = [f"## Segmenter `{sdir.name}` (U-Net, encoder {scfg['model_kwargs'].get('encoder_name')}, "
             f"{s['input_size']} px)", "",
             "- **Data**: trained on ../shared/data/seg/pseudo (thresholded U-Net masks on Kermany images of "
             "the cxr train split; validation = those of the cxr val split) - pseudo masks, not ground truth. "
             f"Evaluated on the {sm.get('adaptation', {}).get('images') or sm.get('expert_masks_raw', {}).get('n', '')} "
             "COVID-QU-Ex **expert** masks (ground truth).",
             f"- **Training**: {sm.get('epochs_run')} epochs, {sm.get('train_seconds', 0) / 60:.1f} min on CPU, "
             f"{scfg.get('precision', 'fp32')}, weight moving average {scfg.get('ema_decay') or 'off'}, "
             f"augmentation {scfg['augment']}; `cxrscreen/weights/{sdir.name}/model.safetensors` "
             f"({(sdir / 'model.safetensors').stat().st_size / 2**20:.1f} MB).", *_adaptation_lines(sm), "",
             "| evaluation set | masks | n | Dice | IoU | pixel accuracy |", "|---|---|---|---|---|---|"]
    for key, label in (("expert_masks_loo", "expert, leave-one-out after adaptation"),
                       ("base_expert_masks", "expert, pseudo-trained model before adaptation"),
                       ("expert_masks", "expert (ground truth)"), ("pseudo_masks_val", "pseudo (val split)"),
                       ("base_pseudo_masks_val", "pseudo (val split), before adaptation")):
        for variant in ("raw", "cleaned"):
            v = sm.get(f"{key}_{variant}")
            if v:
                lines.append(f"| {label} | {variant} | {v['n']} | {v['dice']:.4f} | {v['iou']:.4f} | "
                             f"{v['pixel_accuracy']:.4f} |")
    lines += ["", "`cleaned` = the two largest regions kept, filled (what `score` stores).", ""]
    return lines


def read_study(paths) -> "pl.DataFrame":
    """``loso.parquet`` files of the shortcut study as one frame; ``recipe`` = a file's folder name
    unless the rows carry one (so the committed combined file reads back unchanged)."""
    import polars as pl

    frames = [pl.read_parquet(p) for p in paths]
    frames = [f if "recipe" in f.columns else f.with_columns(pl.lit(Path(p).parent.name).alias("recipe"))
              for f, p in zip(frames, paths)]
    df = pl.concat(frames, how="diagonal_relaxed")
    return df.select("recipe", *[c for c in df.columns if c != "recipe"])


def _trust_section(card: dict, study: list | None) -> list[str]:
    """The card's lead: what the classifier does on sources it never saw and what referral
    catches (the shortcut study's leave-one-source-out folds), then its own referral on test."""
    import polars as pl

    ev = card.get("evaluation", {})
    lines = ["## Trust first: sources it never saw", "",
             "In ../shared/data source, age and class are confounded (COVID: adult web collections; viral and "
             "bacterial pneumonia: pediatric Kermany; normal: half each), so in-source test accuracy can be reached "
             "by recognising the source. These numbers come first because they are the ones that carry over.", ""]
    if study:
        df = read_study(study)
        cols = {"recipe": "recipe", "ood_fusion": "OOD score", "target_sensitivity": "COVID sensitivity target",
                "ood_refer_rate": "OOD rate", "held_out": "held-out source", "held_out_accuracy": "accuracy (learned classes)",
                "held_out_noncovid_covid": "non-COVID called COVID",
                "held_out_noncovid_covid_unreferred": "... and not referred",
                "held_out_covid_caught": "COVID called or referred", "held_out_referred": "referred",
                "ood_auroc_combined": "OOD AUROC (ood_score)", "ood_auroc_embedding": "... embedding part",
                "ood_auroc_appearance": "... appearance part",
                "ood_auroc_max_parts": "... max of the parts", "ood_auroc_knn": "OOD AUROC (k-NN)",
                "ood_auroc_max_softmax": "OOD AUROC (1 - max p)", "in_source_test_referred": "in-source test referred",
                "in_source_test_accuracy_at_coverage": "in-source accuracy of the rest",
                "in_source_test_accuracy_3class_at_coverage": "... 3-class read-out", "fold_score": "fold score"}
        table = df.select([pl.col(c).alias(t) for c, t in cols.items() if c in df.columns])
        keys = [k for k in ("recipe", "ood_fusion", "target_sensitivity", "ood_refer_rate") if k in df.columns]
        if "in_source_test_accuracy_3class_at_coverage" not in df.columns:  # audited before the column existed
            df = df.with_columns(pl.lit(None, pl.Float64).alias("in_source_test_accuracy_3class_at_coverage"))
        worst = df.group_by(keys, maintain_order=True).agg(
            pl.col("fold_score").min().alias("worst"), pl.col("in_source_test_referred").mean().alias("ref"),
            pl.col("in_source_test_accuracy_at_coverage").mean().alias("acc"),
            pl.col("in_source_test_accuracy_3class_at_coverage").mean().alias("acc3"))
        lines += ["### Leave-one-source-out folds of every candidate recipe (`cxrscreen loso`)", "",
                  "Each fold is trained without one source and calibrated as `evaluate` calibrates (temperature and "
                  "COVID referral threshold on the fold's val, OOD reference on its train split, OOD threshold "
                  "referring the *OOD rate* share of its val), then scored on every image of the held-out source with the referral "
                  "`score` applies. *fold score* = mean of (1 - non-COVID called COVID and not referred) and (COVID "
                  "called or referred), over what the source has; recipes are ranked by their **worst** fold.", "",
                  *markdown_table(table), "", "| " + " | ".join(cols[k] for k in keys) + " | worst fold score | mean in-source "
                  "referred | mean in-source accuracy of the rest | ... 3-class read-out |", "|---" * (len(keys) + 4) + "|",
                  *["| " + " | ".join(str(v) for v in r[:-4]) + f" | {r[-4]:.3f} | {_pct(r[-3])} | {_pct(r[-2])} | "
                    f"{_pct(r[-1])} |" for r in worst.iter_rows()], ""]
    probe, cov = ev.get("source_probe"), ev.get("at_coverage")
    if cov:
        lines.append(f"- **Referral on the test split** (in-source): {_pct(ev.get('referred_fraction'))} referred "
                     f"({', '.join(f'{k} {_pct(v)}' for k, v in ev.get('referred_by_reason', {}).items())}); accuracy "
                     f"of the rest {_pct(cov['accuracy'])} at coverage {_pct(cov['coverage'])}"
                     + (f"; 3-class read-out of the rest {_pct(ev['at_coverage_3class']['accuracy'])} at coverage "
                        f"{_pct(ev['at_coverage_3class']['coverage'])}" if ev.get("at_coverage_3class") else "") + ".")
    if ev.get("ood_threshold") is not None:
        lines.append(f"- **OOD threshold** {ev['ood_threshold']:.3f} (`ood_score`: the geometric mean of the "
                     "Mahalanobis distances of the embedding and of the image's appearance to the nearest training "
                     f"class, each divided by its validation median), set to refer {_pct(ev.get('ood_refer_rate'))} of the "
                     "validation split.")
    if probe and probe.get("balanced_accuracy") is not None:
        lines.append(f"- **Source probe**: a linear model on the embedding tells the test image's source with balanced "
                     f"accuracy {_pct(probe['balanced_accuracy'])} (chance {_pct(probe['chance'])}; sources "
                     f"{', '.join(probe['sources'])}): the embedding still carries the source.")
    return lines + [""]


def render_model_card(classifier_dir: str | Path, segmenter_dirs: list[str | Path] = (),
                      comparison: str | Path | None = None, loso: list[str | Path] | None = None,
                      study: list[str | Path] | None = None) -> str:
    """MODEL_CARD.md text, led by the trust section (``study``: the shortcut study's
    ``loso.parquet`` files, see ``read_study``); ``segmenter_dirs``: a section per U-Net;
    ``comparison``: a report's ``comparison.parquet`` (other models, lung crop vs whole image,
    CAM lung energy); ``loso``: older ``loso.parquet`` files (source shift)."""
    cdir = Path(classifier_dir)
    card, cfg = dataclasses.asdict(read_info(cdir)), read_train_config(cdir)
    ev, test = card.get("evaluation", {}), card["metrics"].get("test")
    if test is None:
        raise ValueError(f"{cdir}: not evaluated yet (run `cxrscreen evaluate {cdir}`)")
    m = card["metrics"]
    if m.get("best_epoch") is None and (cdir / "train_state.json").exists():
        m["best_epoch"] = json.loads((cdir / "train_state.json").read_text())["epoch"]
    lines = [
        "# Model card: cxrscreen default models", "",
        "Not a medical device, not a diagnosis: research models trained on CPU on public data with strong "
        "source bias.", "",
        *_trust_section(card, study),
        f"## Classifier `{cdir.name}` ({card['name']}, {len(card['classes'])} classes: {', '.join(card['classes'])})", "",
        f"- **Data**: `{Path(cfg['data']).parent.name}/{Path(cfg['data']).name}` of ../shared/data (see its README: "
        "provenance, licences, source bias). Patient-level train/val/test split from the manifest; "
        "no patient in two splits (checked before training and evaluation); near-duplicate train/test "
        f"image pairs (thumbnail cosine >= 0.99): {ev.get('near_duplicates_train_test', 'not checked')}.",
        *_ensemble_lines(card),
        f"- **Training**{' (each member)' if m.get('members') else ''}: "
        + (" / ".join(str(x["epochs_run"]) for x in m["members"]) + " epochs run (the members in turn)"
           if m.get("members") else f"{cfg['epochs']} epochs max") + f", batch "
        f"{cfg['batch_size']}, {cfg['optimizer']} lr {cfg['lr']}, weight decay {cfg['weight_decay']}, scheduler "
        f"{cfg.get('scheduler', 'none')}, {cfg.get('precision', 'fp32')}, weight moving average "
        f"{cfg.get('ema_decay') or 'off'}, class-balanced loss"
        + (f" + {cfg['compactness']} x within-class compactness of the embedding" if cfg.get("compactness") else "")
        + f", augmentation {cfg['augment']}; input "
        f"{card['input_size']} px, 1 channel; best epoch by val macro-F1"
        + ("." if m.get("members") else f": {m.get('best_epoch')} of {m.get('epochs_run')} run.")
        + f" Train time {m.get('train_seconds', 0) / 60:.1f} min{' in all' if m.get('members') else ''} on "
        f"{m.get('workers', 1)} Ray Train worker(s), CPU only (2 cores), no GPU.",
        f"- **Weights**: `cxrscreen/weights/{cdir.name}/model.safetensors`, "
        f"{(cdir / 'model.safetensors').stat().st_size / 2**20:.1f} MB, trained from scratch (no ImageNet).",
        "",
        f"### Test split (n = {test['n']}): accuracy {_pct(test['accuracy'])}, macro-F1 {test['macro_f1']:.3f}, "
        f"macro AUROC {test['macro_auc']:.3f}", "",
        *_class_table(test), "", *_confusion(test), "",
        "### Calibration and referral", "",
        f"- Temperature scaling fitted on val: T = {ev.get('temperature', card.get('temperature', 1)):.3f}; "
        f"test ECE {ev.get('uncalibrated_ece', float('nan')):.4f} before, {test['ece']:.4f} after.",
        f"- Refer threshold (chosen on val for {ev.get('refer_target', {}).get('class')} sensitivity >= "
        f"{ev.get('refer_target', {}).get('sensitivity')}): top probability < {ev.get('refer_threshold', 0):.3f}. "
        f"On test: {_pct(ev.get('referred_fraction'))} of images referred; sensitivity counting referrals "
        f"{_pct(ev.get('sensitivity_with_referral'))}.", "",
    ]
    for name, title in (("3class", "3-class (covid / normal / viral pneumonia; bacterial images left out, "
                                   "probabilities renormalised)"), ("binary", "binary (covid vs rest)")):
        d = ev.get("derived", {}).get(name)
        if d:
            cv = d["per_class"]["covid"]
            lines += [f"### {title}: test accuracy {_pct(d['accuracy'])} (n = {d['n']})", "",
                      f"COVID sensitivity {_pct(cv['recall'])}, PPV {_pct(cv['precision'])}, "
                      f"specificity {_pct(cv['specificity'])}, AUROC {cv['auc']:.3f}.", "",
                      *_class_table(d), ""]
    if ev.get("per_source"):
        lines += ["### Per source (test split)", "", "| source | n | accuracy |", "|---|---|---|"]
        lines += [f"| {s} | {v['n']} | {_pct(v['accuracy'])} |" for s, v in ev["per_source"].items()]
        lines += [""]
    lines += [
        "### Known biases and limits", "",
        "- Viral and bacterial pneumonia are all pediatric Kermany images from one hospital; COVID is (almost) all "
        "adult web/hospital collections; normal is half pediatric Kermany, half adult RSNA. A model can separate "
        "classes by source and age cues; the per-source table above and an external holdout are needed to judge "
        "it. These numbers are **not** an estimate of clinical performance.",
        "- COVID and adult-normal images have no patient ids: a few same-patient pairs across splits may remain "
        "(the data README says so); near-identical images were removed by the curators.",
        f"- Trained on the data set's 224 px 8-bit PNGs, resized to the model's {card['input_size']} px input; "
        "other sizes/windowing are resampled by cxrscreen before scoring.", "",
    ]
    for sdir in map(Path, segmenter_dirs):
        lines += _segmenter_section(sdir)
    if comparison:
        lines += _comparison_section(comparison)
    if loso:
        lines += _loso_section(loso)
    return "\n".join(lines)


def markdown_table(df) -> list[str]:
    """Lines of a Markdown table of a polars frame (floats to 4 significant digits)."""
    def fmt(v):
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    return ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns),
            *["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.iter_rows()]]


def _comparison_section(path) -> list[str]:
    import polars as pl

    df = pl.read_parquet(path)
    cols = [c for c in ("model", "architecture", "lung_crop", "n", "accuracy", "macro_f1", "macro_auc",
                        "accuracy_3class", "covid_sensitivity", "covid_ppv", "params", "train_seconds",
                        "inference_images_per_s", "cam_lung_energy") if c in df.columns]
    return ["## Models compared (`cxrscreen report`, test split of each model's task)", "",
            *markdown_table(df.select(cols)), "",
            "`accuracy_3class`: covid / normal / viral (a 4-class model's probabilities renormalised over those "
            "three); `cam_lung_energy`: mean share of Grad-CAM energy inside the segmented lungs on the report's "
            "sample images; `inference_images_per_s`: work image -> model input -> torch fp32 forward (`predict.module_logits`), batch 32, best of 5, this 2-core "
            "CPU - a rough guide: rows are timed minutes apart, and rows of one architecture and input size show "
            "the spread.", ""]


def _loso_section(paths) -> list[str]:
    import polars as pl

    df = pl.concat([pl.read_parquet(p) for p in paths], how="diagonal_relaxed")
    return ["## Source shift: leave one source out (`cxrscreen loso`)", "",
            "Each row: trained without one source (shorter schedule, see configs/train/loso.yaml), tested on all "
            "images of that source whose class the fold saw, next to the same fold's in-source test split.", "",
            *markdown_table(df), ""]
