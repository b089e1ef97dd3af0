"""The triage worklist: priority order, every input once, and the HTML rendered by a real
headless browser (Chromium; skipped where it is not installed)."""

import shutil
import subprocess

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cxrscreen.cli import main
from cxrscreen.io import list_inputs
from cxrscreen.pipeline import ScoreConfig, score_items_local
from cxrscreen.pipeline.output import batch_to_table, output_schema
from cxrscreen.results import PAGE, TIERS, write_worklist

CLASSES = ["covid", "normal", "viral_pneumonia", "bacterial_pneumonia"]


@pytest.fixture(scope="module")
def scored(mixed_archive, tmp_path_factory):
    """An OUT folder as `score` writes it: the mixed archive (good phantoms and broken files)."""
    archive, bad = mixed_archive
    out = tmp_path_factory.mktemp("out")
    cfg = ScoreConfig(classifier="mobilenet_v3_small", allow_untrained=True, batch_size=16, mask_size=64)
    for i, b in enumerate(score_items_local(list_inputs(archive), cfg)):
        pq.write_table(batch_to_table(b, output_schema(CLASSES)), out / f"part-test-{i:05d}.parquet")
    return out, archive, bad


def test_worklist_ranks_every_input_once_by_priority(scored):
    out, archive, bad = scored
    res = CliRunner().invoke(main, ["worklist", str(out)])
    assert res.exit_code == 0, res.output
    df = pl.read_csv(out / "worklist.csv")
    assert sorted(df["key"]) == sorted(it.key for it in list_inputs(archive))
    assert df["rank"].to_list() == list(range(1, len(df) + 1))
    tier = df["priority"].replace_strict({t: i for i, t in enumerate(TIERS)}).to_numpy()
    assert (np.diff(tier) >= 0).all()  # covid, then referred, pneumonia, normal
    for t in TIERS:
        p = df.filter(pl.col("priority") == t)["prob_covid"].drop_nulls().to_numpy()
        assert (np.diff(p) <= 1e-7).all()  # most probable COVID-19 first within a tier
    errors = df.filter(pl.col("status") == "error")
    assert len(errors) == len(bad) and (errors["priority"] == "referred").all()
    assert (errors["refer_reason"] == "unreadable").all()
    covid = df.filter(pl.col("label") == "covid")
    assert (covid["priority"] == "covid").all()


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="Chromium not installed (Debian: apt-get install chromium)")
def test_worklist_html_renders_in_a_headless_browser(scored, tmp_path):
    out, archive, _ = scored
    _, html_path = write_worklist(out)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,1600"]
    dom = subprocess.run(flags + ["--dump-dom", html_path.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    n = len(list(list_inputs(archive)))
    body = dom.split('<tbody id="rows">')[1].split("</tbody>")[0]  # rows rendered by its script
    assert body.count("<tr ") == min(PAGE, n) and f"rows 1-{min(PAGE, n)} of {n}" in dom
    assert body.count("<img ") > 0 and "unreadable" in dom
    shot = tmp_path / "worklist.png"
    subprocess.run(flags + [f"--screenshot={shot}", html_path.as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    rgb = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    outline = (rgb[..., 0] - rgb[..., 1] > 60) & (rgb[..., 0] - rgb[..., 2] > 60)  # the red lung outlines
    grey = (np.abs(rgb[..., 0] - rgb[..., 1]) < 6) & (rgb[..., 0] > 40) & (rgb[..., 0] < 215)  # thumbnails
    assert outline.sum() > 200 and grey.sum() > 20_000


def test_export_masks_at_the_original_size(scored, tmp_path):
    from PIL import Image

    out, archive, _ = scored
    res = CliRunner().invoke(main, ["export-masks", str(out), "--to", str(tmp_path / "masks")])
    assert res.exit_code == 0, res.output
    df = pl.read_parquet(out / "part-*.parquet").filter(pl.col("status") == "ok")
    files = sorted((tmp_path / "masks").rglob("*.png"))
    assert len(files) == len(df) and f"wrote {len(df)} masks" in res.output
    assert not list((tmp_path / "masks").rglob("*.png.png")) and not list((tmp_path / "masks").rglob("*.dcm*"))
    for row in df.iter_rows(named=True):
        mask = np.asarray(Image.open((tmp_path / "masks" / row["key"]).with_suffix(".png")))
        assert mask.shape == (row["height"], row["width"]) and set(np.unique(mask)) <= {0, 255}
        assert abs((mask > 0).mean() - row["lung_fraction"]) < 0.03
    # a non-square film keeps its aspect: the mask is stretched back to width x height
    img = np.asarray(Image.open(next(archive.rglob("*.png"))).convert("L"))[:, 16:112]
    Image.fromarray(img).save(tmp_path / "wide.png")
    wide = tmp_path / "wide-out"
    wide.mkdir()
    cfg = ScoreConfig(classifier="mobilenet_v3_small", allow_untrained=True, mask_size=64)
    batch = next(iter(score_items_local(list_inputs(tmp_path / "wide.png"), cfg)))
    pq.write_table(batch_to_table(batch, output_schema(CLASSES)), wide / "part-x-00000.parquet")
    from cxrscreen.results import export_masks

    assert export_masks(wide, tmp_path / "wide-masks") == 1
    (mask_file,) = (tmp_path / "wide-masks").rglob("*.png")
    assert Image.open(mask_file).size == (96, 128)
