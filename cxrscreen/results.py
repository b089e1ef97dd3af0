"""What to do with a scored output folder: read it (``read_output``), the triage worklist, and
lung masks for viewers (``export_masks``).

The worklist: ``worklist.csv`` (every row) and a self-contained ``worklist.html`` (thumbnails
with the lung-mask outline, probabilities, reasons, source path; pages of 50 rows, works
offline), written into the output folder after every ``score`` run and by ``cxrscreen worklist OUT``.

Priority (rank 1 first), documented in README.md:

1. ``covid``: labelled COVID-19 (referred or not), most probable first;
2. ``referred``: referred for any reason with another label, unreadable studies included;
3. ``pneumonia``: labelled viral or bacterial pneumonia, not referred;
4. ``normal``: labelled normal, not referred.

Within a tier rows are ordered by ``prob_covid`` (highest first), then by key.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import polars as pl

TIERS = ("covid", "referred", "pneumonia", "normal")
THUMB = 96  # thumbnail side in pixels
PAGE = 50  # rows per HTML page


def read_output(out_dir: str | Path) -> pl.DataFrame:
    """Every row of a ``score`` output folder (its complete part files)."""
    parts = sorted(Path(out_dir).glob("part-*.parquet"))
    if not parts:
        raise ValueError(f"{out_dir}: no scored rows (part-*.parquet); run cxrscreen score first")
    return pl.concat([pl.read_parquet(p) for p in parts], how="diagonal_relaxed")


def prioritise(df: pl.DataFrame) -> pl.DataFrame:
    """The rows with ``rank`` (1 = look first) and ``priority`` (the tier), sorted."""
    covid = pl.col("label") == "covid"
    refer = pl.col("refer").fill_null(True)
    tier = (pl.when(covid).then(pl.lit("covid"))
            .when(refer).then(pl.lit("referred"))
            .when(pl.col("label").str.ends_with("_pneumonia")).then(pl.lit("pneumonia"))
            .otherwise(pl.lit("normal")))
    order = pl.col("priority").replace_strict({t: i for i, t in enumerate(TIERS)}, return_dtype=pl.Int32)
    pc = pl.col("prob_covid") if "prob_covid" in df.columns else pl.lit(None, pl.Float32)
    out = (df.with_columns(tier.alias("priority"), pc.alias("_pc"))
           .sort([order, pl.col("_pc"), pl.col("key")], descending=[False, True, False], nulls_last=True)
           .drop("_pc"))
    return out.with_row_index("rank", offset=1)


def csv_frame(ranked: pl.DataFrame) -> pl.DataFrame:
    """The worklist's CSV columns (reasons joined with ';')."""
    probs = [c for c in ranked.columns if c.startswith("prob_")]
    cols = ["rank", "priority", "key", "source_path", "status", "error_type", "label", *probs, "refer",
            "refer_reason", "ood_score", "lung_fraction"]
    return ranked.select([c for c in cols if c in ranked.columns]).with_columns(
        pl.col("refer_reason").list.join(";"))


def thumbnails(rows: list[dict], batch: int = 64) -> list[str | None]:
    """A JPEG data URI per row: its image at ``THUMB`` px with the lung-mask outline in red,
    read again from its source path (None when the file is gone, unreadable or an error row)."""
    from PIL import Image

    from cxrscreen.io.batch import decode_items
    from cxrscreen.io.sources import InputItem
    from cxrscreen.masks import decode_mask_png, mask_outline

    out: list[str | None] = [None] * len(rows)
    todo = [i for i, r in enumerate(rows) if r.get("source_path") and r.get("status") == "ok"]
    for start in range(0, len(todo), batch):
        chunk = todo[start:start + batch]
        decoded = decode_items([InputItem(rows[i]["source_path"], rows[i]["source_path"]) for i in chunk], THUMB)
        for i, status, image in zip(chunk, decoded["status"], decoded["image"]):
            if status != "ok":
                continue
            rgb = np.repeat(image[..., None], 3, 2)
            if rows[i].get("lung_mask_png"):
                mask = np.asarray(Image.fromarray(decode_mask_png(rows[i]["lung_mask_png"]).astype(np.uint8) * 255)
                                  .resize((THUMB, THUMB), Image.Resampling.NEAREST)) > 127
                rgb[mask_outline(mask)] = (230, 40, 40)
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, "JPEG", quality=75)
            out[i] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    return out


def write_worklist(out_dir: str | Path, max_html_rows: int = 10_000) -> tuple[Path, Path]:
    """``worklist.csv`` (every row) and ``worklist.html`` (the first ``max_html_rows`` by
    priority, with thumbnails) in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    ranked = prioritise(read_output(out))
    csv_path, html_path = out / "worklist.csv", out / "worklist.html"
    csv_frame(ranked).write_csv(csv_path)
    probs = [c for c in ranked.columns if c.startswith("prob_")]
    shown = ranked.head(max_html_rows).to_dicts()
    rows = []
    for r, thumb in zip(shown, thumbnails(shown)):
        rows.append({"rank": r["rank"], "priority": r["priority"], "key": r["key"], "path": r.get("source_path"),
                     "label": r.get("label") or "", "error": r.get("error_type") or "",
                     "probs": {c[5:]: None if r[c] is None else round(float(r[c]), 3) for c in probs},
                     "reasons": list(r.get("refer_reason") or []), "ood": None if r.get("ood_score") is None
                     else round(float(r["ood_score"]), 2), "thumb": thumb})
    counts = ranked.group_by("priority").len()
    summary = ", ".join(f"{t} {dict(counts.iter_rows()).get(t, 0)}" for t in TIERS)
    html_path.write_text(_PAGE.replace("__TITLE__", html.escape(f"cxrscreen worklist: {out.name}"))
                         .replace("__SUMMARY__", html.escape(f"{len(ranked)} studies: {summary}"
                                                             + (f" (first {max_html_rows} shown)"
                                                                if len(ranked) > max_html_rows else "")))
                         .replace("__PAGE__", str(PAGE))
                         .replace("__ROWS__", json.dumps(rows).replace("</", "<\\/")))
    return csv_path, html_path


def export_masks(out_dir: str | Path, to: str | Path) -> int:
    """Each scored row's lung mask as an 8-bit PNG (0 / 255) at its original image's width and
    height, at ``to/<key without its extension>.png`` (folders of the key kept; ``..`` and leading
    ``/`` dropped, ``#`` of Parquet row keys made ``_``; where two keys would share a name, e.g.
    ``a.png`` and ``a.dcm``, the later keeps its extension: ``a.dcm.png``). Returns the number written."""
    from PIL import Image

    from cxrscreen.masks import decode_mask_png

    df = read_output(out_dir).filter((pl.col("status") == "ok") & pl.col("lung_mask_png").is_not_null())
    root = Path(to)
    n, used = 0, set()
    for key, png, w, h in df.select("key", "lung_mask_png", "width", "height").iter_rows():
        parts = [p for p in Path(key.replace("#", "_")).parts if p not in ("..", "/", "")]
        dest = root.joinpath(*parts).with_suffix(".png")
        if dest in used:
            dest = root.joinpath(*parts[:-1], parts[-1] + ".png")
        used.add(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        mask = Image.fromarray(decode_mask_png(png).astype(np.float32))
        size = (int(w), int(h)) if w and h and w > 0 and h > 0 else mask.size
        big = np.asarray(mask.resize(size, Image.Resampling.BILINEAR)) >= 0.5
        Image.fromarray((big * 255).astype(np.uint8)).save(dest)
        n += 1
    return n


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font-family:system-ui,sans-serif;margin:1em;color:#222}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ddd;padding:4px 6px;text-align:left;
vertical-align:middle;font-size:13px}th{background:#f3f3f3;position:sticky;top:0}
img{width:96px;height:96px;display:block;background:#000}.covid{background:#fde2e2}.referred{background:#fff3cd}
.code{display:inline-block;background:#eee;border-radius:3px;padding:0 4px;margin:1px;font-size:12px}
.path{font-family:monospace;font-size:11px;word-break:break-all;max-width:28em}nav{margin:.6em 0}
button,select{font-size:14px;margin-right:.5em}
</style></head><body>
<h1>__TITLE__</h1><p>__SUMMARY__. Priority: COVID-19 first, then referred studies (any reason, unreadable
included), other pneumonia, normal; within each, highest COVID-19 probability first. Not a medical device:
every study still needs a reader.</p>
<nav><select id="show"><option value="">all</option><option value="covid">covid</option>
<option value="referred">referred</option><option value="pneumonia">pneumonia</option>
<option value="normal">normal</option></select><button id="prev">previous</button><button id="next">next</button>
<span id="where"></span></nav>
<table><thead><tr><th>rank</th><th>image</th><th>priority</th><th>label</th><th>probabilities</th>
<th>referral reasons</th><th>ood</th><th>source</th></tr></thead><tbody id="rows"></tbody></table>
<script id="data" type="application/json">__ROWS__</script>
<script>
const all = JSON.parse(document.getElementById('data').textContent), per = __PAGE__;
let page = 0, rows = all;
const esc = s => String(s ?? '').replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
function render() {
  const start = page * per, body = document.getElementById('rows');
  body.innerHTML = rows.slice(start, start + per).map(r => `<tr class="${r.priority}" data-key="${esc(r.key)}">
    <td>${r.rank}</td><td>${r.thumb ? `<img loading="lazy" alt="" src="${r.thumb}">` : '(no image)'}</td>
    <td>${r.priority}</td><td>${esc(r.label || r.error)}</td>
    <td>${Object.entries(r.probs).map(([c, p]) => `${esc(c)} ${p === null ? '-' : p.toFixed(3)}`).join('<br>')}</td>
    <td>${r.reasons.map(c => `<span class="code">${esc(c)}</span>`).join(' ')}</td>
    <td>${r.ood === null ? '' : r.ood}</td><td class="path">${esc(r.path || r.key)}</td></tr>`).join('');
  document.getElementById('where').textContent =
    rows.length ? `rows ${start + 1}-${Math.min(start + per, rows.length)} of ${rows.length}` : 'no rows';
}
document.getElementById('prev').onclick = () => { if (page > 0) { page--; render(); } };
document.getElementById('next').onclick = () => { if ((page + 1) * per < rows.length) { page++; render(); } };
document.getElementById('show').onchange = e => {
  rows = e.target.value ? all.filter(r => r.priority === e.target.value) : all; page = 0; render(); };
render();
</script></body></html>
"""
