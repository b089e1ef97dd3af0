"""Leave-one-source-out: train without one source, test on all of its images.

The manifest's ``source`` column names where each image came from. A model that learned the
source (scanner, hospital, age group, text markers) instead of the disease does well on a
patient-level test split and badly on a source it has never seen; this measures that gap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl

from cxrscreen.referral import OOD_REFER_RATE, TARGET_SENSITIVITY, screening_confidence
from cxrscreen.train.config import TrainConfig

FOLD_OUTPUTS = "audit-outputs.parquet"  # per fold folder: write_fold_outputs


def fold_audit(model_dir: str | Path, fold_df: pl.DataFrame, held_out: pl.DataFrame, learned: list[str],
               positive: str = "covid", target_sensitivities: tuple[float, ...] = (TARGET_SENSITIVITY,),
               ood_refer_rates: tuple[float, ...] = (OOD_REFER_RATE,),
               outputs_path: str | Path | None = None, digest: str = "") -> list[dict]:
    """What a fold model does on the source it never saw, with the referral ``score`` would apply
    (``audit_outputs``): one row per COVID sensitivity target and OOD referral rate, from one pass of the model over the fold's
    train / val / test splits and the held-out images. With ``outputs_path`` those outputs are
    also written there (``write_fold_outputs``, with ``digest``: ``fold_digest``), so that other
    referral policies can be measured on them without running the model again."""
    from cxrscreen.predict import ModelRunner, classify_files

    runner = ModelRunner(str(model_dir), "classify")
    if not runner.embedding_size:
        raise ValueError(f"{runner.info.name}: no penultimate embedding (its last linear layer is not its last "
                         "operation): the audit needs one")
    frames, arrays = [], {"logits": [], "embedding": [], "appearance": []}
    for name, part in [(n, fold_df.filter(pl.col("split") == n)) for n in ("train", "val", "test")] + \
            [("held_out", held_out)]:
        out, ok = classify_files(runner, part["file"].to_list())
        part = part.filter(pl.Series(ok))
        frames.append(pl.DataFrame({"part": [name] * len(part), "target": part["target"], "source": part["source"]},
                                   schema={"part": pl.String, "target": pl.String, "source": pl.String}))
        for key, value in (("logits", out.logits), ("embedding", out.embeddings), ("appearance", out.appearance)):
            arrays[key].append(np.asarray(value, np.float32))
    table, arrays = pl.concat(frames), {k: np.concatenate(v) for k, v in arrays.items()}
    classes = list(runner.info.classes)
    if outputs_path is not None:
        write_fold_outputs(table, classes, arrays, outputs_path, digest)
    return audit_outputs(table, classes, arrays, learned, positive, target_sensitivities, ood_refer_rates)


def audit_outputs(table: pl.DataFrame, classes: list[str], arrays: dict[str, np.ndarray], learned: list[str],
                  positive: str = "covid", target_sensitivities: tuple[float, ...] = (TARGET_SENSITIVITY,),
                  ood_refer_rates: tuple[float, ...] = (OOD_REFER_RATE,), ood_score=None) -> list[dict]:
    """``fold_audit``'s rows from a fold model's outputs (``table``: ``part``, ``target``; ``arrays``:
    ``logits``, ``embedding``, ``appearance``, row for row), calibrated as ``evaluate`` calibrates
    (temperature and COVID referral threshold on the fold's val, for each COVID sensitivity target,
    OOD reference on its train split, OOD threshold at the ``1 - rate`` quantile of val): one row
    per (target, rate).
    Reports: held-out accuracy on the classes the fold learned; the share of held-out non-COVID
    images labelled COVID **without** referral and of held-out COVID images labelled COVID or
    referred; the OOD score's AUROC for in-source test vs held-out images (``ood_score`` and its
    embedding and appearance parts, their maximum (the fusion used before the geometric mean),
    k-NN on the embedding and, as the baseline,
    1 - max softmax probability); and the in-source test split's referral rate and accuracy at
    coverage (also of the 3-class read-out). ``ood_score``, to measure another OOD score with the
    same referral: a function ``(train, val) -> scorer``, each a dict of the arrays plus ``y``
    (class index, -1 for classes the fold never learned) and ``source``, ``scorer(arrays) -> (N,)
    scores``; default the shipped ``OODReference`` (fitted on train, scaled on val). It replaces
    the score referral uses and ``ood_auroc_combined``; the other AUROC columns stay the shipped
    score's parts."""
    from cxrscreen.metrics import (accuracy_at_coverage, accuracy_at_coverage_3class, binary_auroc, fit_temperature,
                                   refer_threshold, softmax)
    from cxrscreen.models.ood import OODReference, knn_score

    index = {c: i for i, c in enumerate(classes)}
    parts = {}
    for name in ("train", "val", "test", "held_out"):
        rows = (table["part"] == name).to_numpy()
        part = table.filter(pl.Series(rows))
        y = np.array([index[t] if t in learned else -1 for t in part["target"]], dtype=np.int64)  # -1: not learned
        parts[name] = (part, {**{k: v[rows] for k, v in arrays.items()}, "y": y, "source": part["source"].to_numpy()})

    def y_of(part):
        return parts[part][1]["y"]

    tr, va = parts["train"], parts["val"]
    ref = OODReference.fit(tr[1]["embedding"], y_of("train"), tr[1]["appearance"])
    ref.set_scale(va[1]["embedding"], va[1]["appearance"])
    scorer = (lambda a: ref.score(a["embedding"], a["appearance"])) if ood_score is None else ood_score(tr[1], va[1])
    temp = fit_temperature(va[1]["logits"], y_of("val"))
    pos = index.get(positive, 0)
    val_ood = scorer(va[1])
    val_probs = softmax(va[1]["logits"], temp)
    refer_below = {t: refer_threshold(val_probs, y_of("val"), pos, t, classes) for t in target_sensitivities}
    scores, common = {}, {"ood_fusion": ref.fusion if ood_score is None else "custom"}
    for name in ("test", "held_out"):
        out = parts[name][1]
        probs = softmax(out["logits"], temp)
        dist = ref.parts(out["embedding"], out["appearance"])
        scores[name] = {"combined": scorer(out), "embedding": dist[:, 0],
                        "appearance": dist[:, 1], "max_parts": np.nanmax(dist / ref.scale, 1),
                        "knn": knn_score(tr[1]["embedding"], out["embedding"]), "max_softmax": 1 - probs.max(1),
                        "probs": probs, "confidence": screening_confidence(probs, classes)}
    for method in ("combined", "embedding", "appearance", "max_parts", "knn", "max_softmax"):
        common[f"ood_auroc_{method}"] = binary_auroc(scores["test"][method], scores["held_out"][method])
    rows = []
    for sensitivity, rate in [(t, r) for t in target_sensitivities for r in ood_refer_rates]:
        thr = refer_below[sensitivity]
        ood_thr = float(np.quantile(val_ood, 1 - rate))
        row: dict = {"target_sensitivity": sensitivity, "refer_threshold": thr, "ood_refer_rate": rate,
                     "ood_threshold": ood_thr, **common}
        for name in ("test", "held_out"):
            part, probs = parts[name][0], scores[name]["probs"]
            referred = (scores[name]["confidence"] < thr) | (scores[name]["combined"] > ood_thr)
            y, pred = y_of(name), probs.argmax(1)
            seen = y >= 0
            tag = "in_source_test" if name == "test" else "held_out"
            row[f"{tag}_n"] = int(seen.sum())
            row[f"{tag}_accuracy"] = float((pred[seen] == y[seen]).mean()) if seen.any() else None
            row[f"{tag}_referred"] = float(referred.mean()) if len(referred) else None
            cov = accuracy_at_coverage(y[seen], pred[seen], referred[seen])
            row[f"{tag}_coverage"], row[f"{tag}_accuracy_at_coverage"] = cov["coverage"], cov["accuracy"]
            three = accuracy_at_coverage_3class(y, probs, referred, classes)
            row[f"{tag}_accuracy_3class_at_coverage"] = three["accuracy"] if three and three["n"] else None
            is_pos = np.array([t == positive for t in part["target"]])
            called = pred == pos
            row[f"{tag}_noncovid_n"] = int((~is_pos).sum())
            row[f"{tag}_noncovid_covid_unreferred"] = (float((called & ~referred)[~is_pos].mean())
                                                       if (~is_pos).any() else None)
            row[f"{tag}_noncovid_covid"] = float(called[~is_pos].mean()) if (~is_pos).any() else None
            row[f"{tag}_covid_n"] = int(is_pos.sum())
            row[f"{tag}_covid_caught"] = float((called | referred)[is_pos].mean()) if is_pos.any() else None
            if tag == "held_out":
                row.update({f"recall_{c}": float((pred[y == i] == i).mean()) for i, c in enumerate(classes)
                            if (y == i).any()})
        rows.append(row)
    return rows


def write_fold_outputs(table: pl.DataFrame, classes: list[str], arrays: dict[str, np.ndarray],
                       path: str | Path, digest: str = "") -> Path:
    """``audit_outputs``' input as one Parquet row per audited image: ``part`` (train / val / test /
    held_out), ``target``, ``source`` and the arrays as fixed-size float columns (``appearance``
    is pixel data: each image's 24 x 24 thumbnail, standardised); the classes (JSON) and
    ``digest`` (``fold_digest``) in the file's metadata. No file names or other identifiers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {c: table[c].to_arrow() for c in ("part", "target", "source")}
    for key, value in arrays.items():
        columns[key] = pa.FixedSizeListArray.from_arrays(pa.array(value.reshape(-1), pa.float32()), value.shape[1])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.table(columns).replace_schema_metadata({"classes": json.dumps(classes), "digest": digest}), tmp)
    tmp.replace(path)
    return path


def read_fold_outputs(path: str | Path) -> tuple[pl.DataFrame, list[str], dict[str, np.ndarray]]:
    """``write_fold_outputs``' file: (``part`` / ``target`` / ``source``, the classes, the arrays)."""
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    classes = json.loads(t.schema.metadata[b"classes"])
    arrays = {k: t[k].combine_chunks().flatten().to_numpy().reshape(len(t), -1)
              for k in ("logits", "embedding", "appearance")}
    return pl.from_arrow(t.select(["part", "target", "source"])), classes, arrays


def stored_digest(path: str | Path) -> str | None:
    """The ``digest`` a ``write_fold_outputs`` file was written with (None: unreadable)."""
    import pyarrow.parquet as pq

    try:
        return (pq.read_schema(path).metadata or {}).get(b"digest", b"").decode() or None
    except (OSError, ValueError):
        return None


def fold_digest(fold_df: pl.DataFrame, held_out: pl.DataFrame, model_dir: str | Path) -> str:
    """SHA-256 of what a fold's audit outputs depend on: every image with its split and label
    (the fold's train / val / test and the held-out source) and the fold model's weights."""
    h = hashlib.sha256()
    for part in (fold_df.select("split", "file", "target"), held_out.select("file", "target")):
        h.update(part.write_csv().encode())
    h.update((Path(model_dir) / "model.safetensors").read_bytes())
    return h.hexdigest()


def leave_one_source_out(cfg: TrainConfig, out_dir: str | Path, sources: list[str] | None = None,
                         progress=print, reuse: bool = False,
                         ood_refer_rates: tuple[float, ...] = (OOD_REFER_RATE,),
                         members: list[str | Path] | None = None,
                         target_sensitivities: tuple[float, ...] = (TARGET_SENSITIVITY,)) -> pl.DataFrame:
    """For each source: train ``cfg`` without it (patient-level train/val of the others), then
    audit the fold model on every image of the held-out source (``fold_audit``; classes the
    fold never saw are left out of accuracy and counted; with ``reuse``, a fold already trained
    in ``out_dir`` is audited again without training, from its stored outputs (``FOLD_OUTPUTS``)
    when they were made from the same images, splits and weights (``fold_digest``), so other
    thresholds take seconds; with ``members``, earlier loso folders,
    the fold model is the ensemble of their fold models for that source, ``cfg`` giving the
    splits). Written to ``out_dir/loso.parquet``; ``worst_fold_score`` in the log is the number
    recipes are selected by."""
    from cxrscreen.models.checkpoint import read_info
    from cxrscreen.models.ensemble import combine_checkpoints
    from cxrscreen.train.data import labeled_splits
    from cxrscreen.train.trainer import train

    out = Path(out_dir)
    if members and out.resolve() in {Path(m).resolve() for m in members}:
        raise ValueError(f"{out}: write the ensemble's folds elsewhere than its members' loso folders")
    everything, _ = labeled_splits(dataclasses.replace(cfg, sources=None, exclude_sources=None))
    sources = sources or sorted(everything["source"].drop_nulls().unique().to_list())
    rows = []
    for source in sources:
        fold_cfg = dataclasses.replace(cfg, exclude_sources=[source], out=str(out / f"without-{source}"))
        fold_df, _ = labeled_splits(fold_cfg)
        fold_classes = sorted(set(fold_df.filter(pl.col("split") == "train")["target"]))  # classes it learns
        progress(f"leave out {source}: train on {len(fold_df)} images of {sorted(fold_df['source'].unique())}")
        done = Path(fold_cfg.out) / "model.json"
        if members:
            folds = [Path(m) / f"without-{source}" for m in members]
            _check_same_splits(fold_cfg, folds)
            model_dir = combine_checkpoints(folds, fold_cfg.out)
        else:
            model_dir = Path(fold_cfg.out) if reuse and done.exists() else train(fold_cfg, progress=progress)
        held = everything.filter(pl.col("source") == source)
        is_ensemble = bool(members) or read_info(model_dir).name == "ensemble"
        base = {"held_out": source, "model": "ensemble" if is_ensemble else cfg.model, "lung_crop": cfg.lung_crop or "",
                "intensity": cfg.intensity, "balance": cfg.balance,
                "train_images": len(fold_df.filter(pl.col("split") == "train")),
                "held_out_unseen_class_images": int((~held["target"].is_in(fold_classes)).sum())}
        stored, digest = Path(fold_cfg.out) / FOLD_OUTPUTS, fold_digest(fold_df, held, model_dir)
        if reuse and stored.exists() and stored_digest(stored) == digest:
            table, classes, arrays = read_fold_outputs(stored)
            audits = audit_outputs(table, classes, arrays, fold_classes, target_sensitivities=tuple(target_sensitivities),
                                   ood_refer_rates=tuple(ood_refer_rates))
        elif reuse and is_ensemble:
            raise ValueError(f"{model_dir}: an ensemble's fold whose stored outputs are missing or were made with other "
                             "data or weights: audit it with --ensemble-of (which checks its members' splits)")
        else:
            audits = fold_audit(model_dir, fold_df, held, fold_classes, target_sensitivities=tuple(target_sensitivities),
                                ood_refer_rates=tuple(ood_refer_rates), outputs_path=stored, digest=digest)
        for audit in audits:
            row = {**base, **audit}
            row["fold_score"] = fold_score(row)
            rows.append(row)
            progress(f"  {source} (COVID sensitivity {row['target_sensitivity']}, OOD rate {row['ood_refer_rate']}): held-out accuracy {row['held_out_accuracy']}, "
                     f"non-COVID called COVID unreferred {row['held_out_noncovid_covid_unreferred']}, COVID caught "
                     f"{row['held_out_covid_caught']}, OOD AUROC {row['ood_auroc_combined']:.3f}")
    df = pl.DataFrame(rows, infer_schema_length=None)
    out.mkdir(parents=True, exist_ok=True)
    df.write_parquet(out / "loso.parquet")
    for (sensitivity, rate), part in df.group_by(["target_sensitivity", "ood_refer_rate"], maintain_order=True):
        progress(f"COVID sensitivity {sensitivity}, OOD rate {rate}: worst fold score {part['fold_score'].min()}, "
                 f"in-source test referred {part['in_source_test_referred'].mean()} (mean over folds)")
    return df


SPLIT_KEYS = ("data", "task", "class_map", "split_seed", "cap_per_class", "max_images_per_split", "sources",
              "exclude_sources", "lung_crop", "intensity")


def _check_same_splits(cfg: TrainConfig, fold_dirs: list[Path]) -> None:
    """An ensemble's fold is audited on ``cfg``'s splits: each member must have been trained on
    the same data, split and input (else its val or test images may be another's train images)."""
    from cxrscreen.models.checkpoint import read_train_config

    want = dataclasses.asdict(cfg)
    for d in fold_dirs:
        got = read_train_config(d)
        differs = [k for k in SPLIT_KEYS if got.get(k) != want.get(k)]
        if differs:
            raise ValueError(f"{d} was trained with other {', '.join(differs)} than this config: its fold "
                             "cannot be audited on these splits")


def fold_score(row: dict) -> float:
    """One number per fold, higher is better: the mean of (1 - held-out non-COVID images called
    COVID unreferred) and (held-out COVID images caught), over those the source has."""
    parts = [1 - row["held_out_noncovid_covid_unreferred"]] if row.get("held_out_noncovid_covid_unreferred") is not None else []
    if row.get("held_out_covid_caught") is not None:
        parts.append(row["held_out_covid_caught"])
    return float(np.mean(parts)) if parts else float("nan")
