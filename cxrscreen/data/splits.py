"""Patient-level, label-stratified, seeded splits (no patient in two splits)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import polars as pl

SPLITS = ("train", "val", "test")


def _with_units(df: pl.DataFrame, group_col: str) -> pl.DataFrame:
    """Add ``_unit``: the patient id, or a per-row id where the patient is unknown."""
    row_id = pl.lit("__row") + pl.int_range(pl.len()).cast(pl.Utf8)
    if group_col not in df.columns:
        return df.with_columns(row_id.alias("_unit"))
    g = pl.col(group_col).cast(pl.Utf8)
    return df.with_columns(pl.when(g.is_null() | (g == "")).then(row_id).otherwise(g).alias("_unit"))


def patient_split(df: pl.DataFrame, fractions: tuple[float, ...] = (0.7, 0.15, 0.15), seed: int = 0,
                  label_col: str = "label", group_col: str = "patient_id",
                  cap_per_class: int | None = None, names: tuple[str, ...] = SPLITS) -> pl.DataFrame:
    """Return ``df`` with a ``split`` column.

    All images of one ``group_col`` value (a patient) land in one split; rows with an empty
    group are their own unit. Units are stratified by their majority label and assigned,
    largest first, to the split with the largest relative remaining need. ``cap_per_class``
    first keeps a seeded random subset of whole units with at most that many images per
    class (P0 caps at 170). Deterministic for a given ``seed``.
    """
    if len(fractions) != len(names) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError("fractions must sum to 1 and match names")
    df = _with_units(df, group_col)
    rng = np.random.default_rng(seed)
    unit_rows: dict[str, list[int]] = {}
    unit_labels: dict[str, Counter] = {}
    for i, (u, lab) in enumerate(zip(df["_unit"].to_list(), df[label_col].to_list())):
        unit_rows.setdefault(u, []).append(i)
        unit_labels.setdefault(u, Counter())[lab] += 1
    units = sorted(unit_rows)
    if cap_per_class is not None:  # keep whole patients while every class stays within the cap
        kept, count = [], Counter()
        for k in rng.permutation(len(units)):
            c = unit_labels[units[k]]
            if all(count[lab] + n <= cap_per_class for lab, n in c.items()):
                kept.append(units[k])
                count.update(c)
        units = sorted(kept)
    strata: dict[str, list[str]] = {}
    for u in units:
        lab = sorted(unit_labels[u].items(), key=lambda kv: (-kv[1], str(kv[0])))[0][0]
        strata.setdefault(lab, []).append(u)
    assign = np.empty(len(df), dtype=object)
    keep = np.zeros(len(df), dtype=bool)
    for lab in sorted(strata, key=str):
        units = [strata[lab][k] for k in rng.permutation(len(strata[lab]))]
        total = sum(len(unit_rows[u]) for u in units)
        target = np.array(fractions) * total
        got = np.zeros(len(names))
        for u in sorted(units, key=lambda u: -len(unit_rows[u])):  # stable: ties keep shuffled order
            need = (target - got) / np.maximum(target, 1e-9)
            need[target == 0] = -np.inf
            k = int(np.argmax(need))
            got[k] += len(unit_rows[u])
            for i in unit_rows[u]:
                assign[i] = names[k]
                keep[i] = True
    out = df.with_columns(pl.Series("split", assign.tolist(), dtype=pl.Utf8)).filter(pl.Series(keep))
    return out.drop("_unit")


def leaking_groups(df: pl.DataFrame, group_col: str = "patient_id") -> list[str]:
    """Patient ids that occur in more than one split (should be empty)."""
    if group_col not in df.columns:
        return []
    g = (df.filter(pl.col(group_col).is_not_null() & (pl.col(group_col).cast(pl.Utf8) != ""))
         .group_by(group_col).agg(pl.col("split").n_unique().alias("n")).filter(pl.col("n") > 1))
    return sorted(str(x) for x in g[group_col].to_list())
