import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from cxrscreen.io import list_inputs
from cxrscreen.io.decode import decode_image
from cxrscreen.pipeline import (ClassifierOptions, RuntimeOptions, ScoreConfig, SegmenterOptions, score_archive,
                                score_items_local)
from cxrscreen.pipeline.output import batch_to_table, output_schema
from cxrscreen.pipeline.score import ClusterTooSmall, plan_resources

FAST = dict(classifier="mobilenet_v3_small", allow_untrained=True, batch_size=8, rows_per_file=10)
CLASSES = ["covid", "normal", "viral_pneumonia", "bacterial_pneumonia"]


def _check_rows(df: pl.DataFrame, archive: Path, bad: dict[str, str]) -> None:
    keys = [it.key for it in list_inputs(archive)]
    assert sorted(df["key"].to_list()) == sorted(keys)  # every input exactly once
    errors = df.filter(pl.col("status") == "error")
    assert dict(errors.select("key", "error_type").iter_rows()) == bad
    assert errors["error_message"].null_count() == 0
    ok = df.filter(pl.col("status") == "ok")
    probs = ok.select([f"prob_{c}" for c in CLASSES]).to_numpy()
    assert np.allclose(probs.sum(1), 1.0, atol=1e-4)
    assert ok["label"].is_in(CLASSES).all() and ok["lung_mask_png"].null_count() == 0
    assert errors["label"].null_count() == len(errors)


def test_local_stages_without_ray(mixed_archive):
    archive, bad = mixed_archive
    cfg = ScoreConfig(**FAST, mask_size=64)
    schema = output_schema(CLASSES)
    df = pl.concat([pl.from_arrow(batch_to_table(b, schema)) for b in score_items_local(list_inputs(archive), cfg)])
    _check_rows(df, archive, bad)
    mask = decode_image(df.filter(pl.col("status") == "ok")["lung_mask_png"][0])
    assert mask.pixels.shape == (64, 64) and set(np.unique(mask.pixels)) <= {0.0, 1.0}


def test_each_stage_adds_exactly_its_declared_columns(mixed_archive):
    from cxrscreen.io.batch import TRANSIENT_COLUMNS, decode_items, stage_columns
    from cxrscreen.pipeline.stages import Classifier, Segmenter

    def names(*stages):
        return {n for n, _ in stage_columns(stages, CLASSES)}

    archive, _ = mixed_archive
    items = list(list_inputs(archive))[:12]
    batch = decode_items(items)
    assert set(batch) == names("decode") | {"image"}
    assert set(decode_items(items, include_phi=True)) == names("decode", "phi") | {"image"}
    assert set(decode_items(items, defer_jpeg=True)) == names("decode") | set(TRANSIENT_COLUMNS)
    cpu = RuntimeOptions(device="cpu", runtime="torch")
    batch = Segmenter(SegmenterOptions("unet-lungs-fast"), cpu)(batch)
    assert set(batch) == names("decode", "segment") | {"image"}
    out = Classifier(ClassifierOptions("mobilenet_v3_small", allow_untrained=True, cam="gradcam"), cpu)(batch)
    assert set(out) == names("decode", "segment", "classify", "cam")  # the work images are not written
    assert list(output_schema(CLASSES).names) == [n for n, _ in stage_columns(("decode", "classify", "segment", "cam"),
                                                                               CLASSES)]


def test_fused_stage_gives_the_rows_of_the_two_stages_in_a_row(mixed_archive):
    from cxrscreen.io.batch import decode_items
    from cxrscreen.pipeline.stages import Classifier, SegmentClassify, Segmenter

    archive, _ = mixed_archive
    items = list(list_inputs(archive))  # PNG, JPEG, DICOM and broken files
    cfg, cpu = ScoreConfig(), RuntimeOptions(device="cpu", runtime="torch", threads=2)
    two = Classifier(cfg.classifier_options(), cpu)(Segmenter(cfg.segmenter_options(), cpu)(decode_items(items)))
    fused = SegmentClassify(cfg.segmenter_options(), cfg.classifier_options(), cpu)
    assert fused.segmenter.workers == 1  # on CPUs masks are cleaned in one thread whatever torch has
    one = fused(decode_items(items))
    assert set(one) == set(two) and "image" not in one
    assert (one["status"] == "ok").sum() == 25 and "inference_failed" not in set(one["error_type"])
    for name in sorted(set(one) - {"t_decode_ms", "t_segment_ms", "t_classify_ms"}):
        a, b = one[name], two[name]
        if isinstance(a, np.ndarray) and a.dtype.kind == "f":
            np.testing.assert_allclose(a, b, atol=1e-6, err_msg=name)
        else:
            assert [list(x) if isinstance(x, (list, np.ndarray)) else x for x in a] == \
                   [list(x) if isinstance(x, (list, np.ndarray)) else x for x in b], name


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("fused,writers", [(True, "workers"), (False, "auto")],
                         ids=["one_model_pool-workers_write", "two_model_pools-driver_writes"])
def test_ray_score_on_2_cpus_accounts_for_every_input(mixed_archive, ray_2cpu, tmp_path, fused, writers):
    archive, bad = mixed_archive
    summary = score_archive(archive, tmp_path, ScoreConfig(**FAST, fused=fused, writers=writers), progress=False)
    assert summary.inputs == 35 and summary.ok == 25 and sum(summary.errors.values()) == 10
    assert summary.missing == [] and summary.skipped == 0
    df = pl.read_parquet(tmp_path / "*.parquet")
    _check_rows(df, archive, bad)
    # the driver numbers its files; write tasks name theirs by their rows' keys (a retry replaces its own)
    names = sorted(p.name.rsplit("-", 1)[1] for p in tmp_path.glob("part-*.parquet"))
    assert (len(names[0]) == len("0123456789abcdef.parquet")) == (writers == "workers"), names
    table = pq.read_table(tmp_path)  # readable with pyarrow too
    assert table.num_rows == 35 and "lung_bbox" in table.schema.names
    assert [p.name for p in tmp_path.glob(".*")] == [".cxrscreen.lock"]  # no temporary files left, only the lock
    ok = df.filter(pl.col("status") == "ok")
    assert (ok["classifier"] == "mobilenet_v3_small (untrained)").all() and (ok["classifier_sha256"] == "untrained").all()
    dicom = ok.filter(pl.col("format") == "dicom")
    assert len(dicom) == 8 and (dicom["dicom_view_position"] == "PA").all()
    assert not any("patient" in c for c in df.columns)
    assert "PHANTOM^TEST" not in str(df.to_dicts()) and "syn0" not in str(dicom.select("dicom_study_uid"))

    again = score_archive(archive, tmp_path, ScoreConfig(**FAST), progress=False)  # resume: nothing new
    assert again.skipped == 35 and again.scored == 0
    assert pl.read_parquet(tmp_path / "*.parquet").height == 35


@pytest.mark.timeout(300)
def test_lists_and_folder_trees_stream_through_read_tasks_and_resume(mixed_archive, ray_2cpu, tmp_path, monkeypatch):
    """A list archive is listed by Ray's read tasks in byte ranges, a folder tree by folders, not
    on the driver; every input still gets exactly one row, a second run skips them, and a
    changed list is accounted for."""
    import cxrscreen.pipeline.score as score_module

    from cxrscreen.data.synth import encode_png, make_phantom
    from cxrscreen.io.sources import safe_text

    archive, bad = mixed_archive
    paths = [os.fsencode(it.path) for it in list_inputs(archive)] + [b"not/there.png"]  # one name is not UTF-8
    lines = [safe_text(os.fsdecode(p)) for p in paths]  # the keys
    listing = tmp_path / "inputs.txt"
    listing.write_bytes(b"# archive\n" + b"\n".join(paths) + b"\n")
    monkeypatch.setattr(score_module, "pending_items", None)  # the driver must not list it
    out = tmp_path / "out"
    first = score_archive(listing, out, ScoreConfig(**FAST), progress=False)
    assert first.inputs == len(lines) == 36 and first.missing == [] and first.skipped == 0
    df = pl.read_parquet(out / "*.parquet")
    assert sorted(df["key"]) == sorted(lines) and any("caf\\xe9.png" in k for k in df["key"])
    errors = dict(df.filter(pl.col("status") == "error").select("key", "error_type").iter_rows())
    assert errors == {**{safe_text(str(archive / k)): v for k, v in bad.items()}, "not/there.png": errors["not/there.png"]}
    again = score_archive(listing, out, ScoreConfig(**FAST), progress=False)
    assert again.inputs == 36 and again.skipped == 36 and again.scored == 0 and again.missing == []
    listing.write_bytes(b"\n".join(paths[1:] + paths[:1]) + b"\n")  # same inputs, new order
    assert score_archive(listing, out, ScoreConfig(**FAST), progress=False).skipped == 36
    listing.write_bytes(b"\n".join(paths[1:]) + b"\n")  # one line gone: its row is stale, reported, kept
    fewer = score_archive(listing, out, ScoreConfig(**FAST), progress=False)
    assert fewer.inputs == 35 and fewer.stale == 1 and fewer.rows == 36
    twice = tmp_path / "twice.txt"  # lines listed again: in the driver's batch, of it later, of the read tasks'
    twice.write_bytes(b"\n".join(paths[:1] + paths + paths[:2] + paths[20:23] + paths[30:31]) + b"\n")
    dup = score_archive(twice, tmp_path / "twice-out", ScoreConfig(**FAST), progress=False)
    assert (dup.inputs, dup.repeated, dup.scored, dup.rows, dup.skipped, dup.missing) == (36, 7, 36, 36, 0, [])
    assert pl.read_parquet(tmp_path / "twice-out" / "*.parquet")["key"].n_unique() == 36
    dup = score_archive(twice, tmp_path / "twice-out", ScoreConfig(**FAST), progress=False)
    assert (dup.inputs, dup.repeated, dup.scored, dup.rows, dup.skipped) == (36, 7, 0, 36, 36)
    tree = score_archive(archive, tmp_path / "tree", ScoreConfig(**FAST, first_batch_on_driver=False), progress=False)
    assert tree.inputs == 35 and tree.ok == 25 and tree.missing == [] and tree.skipped == 0
    assert tree.first_rows <= 8  # results come a batch at a time, not once the folder's 35 are done
    live = tmp_path / "live"  # a folder that receives a file while the run goes on
    live.mkdir()
    for i, it in enumerate(list(list_inputs(archive))[:12]):
        (live / f"{i:02d}{Path(it.path).suffix}").write_bytes(Path(it.path).read_bytes())
    accounted = score_module._missing_and_stale
    late = encode_png(make_phantom("normal", 64, 3).image)
    monkeypatch.setattr(score_module, "_missing_and_stale",
                        lambda *a: (live / "late.png").write_bytes(late) and accounted(*a))
    first = score_archive(live, tmp_path / "live-out", ScoreConfig(**FAST), progress=False)
    assert first.missing == [] and first.arrived == 1 and first.inputs == 13 and first.scored == 12
    monkeypatch.setattr(score_module, "_missing_and_stale", accounted)
    again = score_archive(live, tmp_path / "live-out", ScoreConfig(**FAST), progress=False)
    assert again.scored == 1 and again.skipped == 12 and again.arrived == 0 and again.rows == 13
    assert sorted(pl.read_parquet(tmp_path / "tree" / "*.parquet")["key"]) == sorted(it.key for it in list_inputs(archive))


def _with_and_without_the_drivers_batch(archive, out: Path, cfg: dict, monkeypatch) -> tuple[list, object]:
    """Score ``archive`` with the driver scoring the first batch and without; both runs' rows
    must agree (probabilities within 1e-4). Returns the keys the driver scored (the list grows
    on later runs of the same test) and the first run's summary."""
    import cxrscreen.pipeline.score as score_module

    seen = []
    on_driver = score_module._score_on_driver
    monkeypatch.setattr(score_module, "_score_on_driver", lambda items, *a: seen.extend(it.key for it in items)
                        or on_driver(items, *a))
    both = score_archive(archive, out / "both", ScoreConfig(**cfg), progress=False)
    n = len(seen)
    actors = score_archive(archive, out / "actors", ScoreConfig(**cfg, first_batch_on_driver=False), progress=False)
    assert len(seen) == n and actors.missing == [] and actors.inputs == both.inputs
    a, b = (pl.read_parquet(out / d / "*.parquet").sort("key") for d in ("both", "actors"))
    assert a["key"].to_list() == b["key"].to_list() and a["key"].n_unique() == both.inputs
    for c in ("status", "error_type", "label", "refer", "sha256"):
        assert a[c].to_list() == b[c].to_list(), c
    probs = [c for c in a.columns if c.startswith("prob_")]
    pa_, pb = a.select(probs).to_numpy(), b.select(probs).to_numpy()
    assert np.array_equal(np.isnan(pa_), np.isnan(pb)) and np.nanmax(np.abs(pa_ - pb)) <= 1e-4  # error rows: NaN
    return seen, both


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_driver_scores_the_first_batch_as_the_actors_would(mixed_archive, ray_2cpu, whole_image_classifier,
                                                               tmp_path, monkeypatch):
    """Issue 18.6: while Ray starts the model actors, the driver scores the archive's first batch
    with the same stages (its rows equal the actors' rows for the same inputs); Ray gets the rest,
    every input once; an archive of at most one batch never reaches Ray's model stages."""
    import cxrscreen.pipeline.score as score_module

    archive, _ = mixed_archive
    keys = [it.key for it in list_inputs(archive)]
    cfg = dict(classifier=whole_image_classifier, batch_size=8, rows_per_file=10)
    seen, both = _with_and_without_the_drivers_batch(archive, tmp_path, cfg, monkeypatch)
    assert seen == keys[:8] and both.inputs == 35 and both.missing == [] and both.first_rows == 8
    small = tmp_path / "small"
    small.mkdir()
    for i, it in enumerate(list(list_inputs(archive))[:8]):  # exactly one batch
        (small / f"{i:02d}{Path(it.path).suffix}").write_bytes(Path(it.path).read_bytes())
    monkeypatch.setattr(score_module, "_model_stages", None)  # Ray's model stages must not be built
    few = score_archive(small, tmp_path / "few", ScoreConfig(**cfg), progress=False)
    assert few.inputs == 8 and few.scored == 8 and few.missing == [] and few.rows == 8


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_drivers_batch_stays_small_when_batches_are_big(mixed_archive, ray_2cpu, whole_image_classifier,
                                                            tmp_path, monkeypatch):
    """With batches bigger than ``FIRST_BATCH`` the driver scores only that many inputs (the
    first result stays early); Ray scores the rest, every input once."""
    import cxrscreen.pipeline.score as score_module

    archive, _ = mixed_archive
    keys = [it.key for it in list_inputs(archive)]
    monkeypatch.setattr(score_module, "FIRST_BATCH", 4)
    cfg = dict(classifier=whole_image_classifier, batch_size=8, rows_per_file=10)
    seen, both = _with_and_without_the_drivers_batch(archive, tmp_path, cfg, monkeypatch)
    assert seen == keys[:4] and both.inputs == 35 and both.missing == [] and both.first_rows == 4


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_driver_scores_the_first_parquet_batch_too(mixed_archive, ray_2cpu, whole_image_classifier, tmp_path,
                                                       monkeypatch):
    """A Parquet archive's first rows (file order) are scored by the driver, the read tasks skip
    them, the rows equal the actors' own; ``--limit`` within one batch never reaches Ray's stages."""
    import cxrscreen.pipeline.score as score_module

    archive, _ = mixed_archive
    src = archive.parent / "phantoms.parquet"
    keys = [str(k) for k in pl.read_parquet(src)["key"]]
    cfg = dict(classifier=whole_image_classifier, batch_size=8, rows_per_file=10)
    seen, both = _with_and_without_the_drivers_batch(src, tmp_path, cfg, monkeypatch)
    assert seen == keys[:8] and both.inputs == len(keys) > 8 and both.missing == [] and both.first_rows == 8
    again = score_archive(src, tmp_path / "both", ScoreConfig(**cfg), progress=False)  # resumed: nothing new
    assert again.scored == 0 and again.rows == len(keys) and len(seen) == 16
    by_ray = score_archive(src, tmp_path / "ray", ScoreConfig(**cfg, limit=8, first_batch_on_driver=False),
                           progress=False)  # no driver's batch: a limit within one batch is Ray's to score
    assert by_ray.scored == 8 and by_ray.missing == [] and len(seen) == 16
    monkeypatch.setattr(score_module, "_model_stages", None)  # Ray's model stages must not be built
    few = score_archive(src, tmp_path / "few", ScoreConfig(**cfg, limit=8), progress=False)
    assert few.inputs == 8 and few.scored == 8 and few.missing == [] and few.rows == 8


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_parquet_archive_and_phi_on_request(mixed_archive, ray_2cpu, tmp_path):
    archive, _ = mixed_archive
    src = archive.parent / "phantoms.parquet"
    summary = score_archive(src, tmp_path / "a", ScoreConfig(**FAST, segmenter=""), progress=False)
    assert summary.ok == 24 and summary.missing == []
    df = pl.read_parquet(tmp_path / "a" / "*.parquet")
    assert sorted(df["key"]) == sorted(pl.read_parquet(src)["key"]) and df["lung_mask_png"].null_count() == 24
    folder = score_archive(archive, tmp_path / "b", ScoreConfig(**FAST, include_phi=True), progress=False)
    assert folder.missing == []
    dicom = pl.read_parquet(tmp_path / "b" / "*.parquet").filter(pl.col("format") == "dicom")
    assert (dicom["patient_name"] == "PHANTOM^TEST").all() and dicom["patient_id"].str.starts_with("syn").all()
    from cxrscreen.pipeline.output import OutputMismatch

    for out, phi in (("b", False), ("a", True)):  # a folder holds identifiers in every row or in none
        with pytest.raises(OutputMismatch, match="include-phi"):
            score_archive(archive, tmp_path / out, ScoreConfig(**FAST, include_phi=phi), progress=False)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_with_a_changed_dicom_and_a_new_folder_of_pngs(tmp_path, ray_2cpu):
    """Issue 17.1: the second run's batches are all skipped, all PNG or one DICOM: they must
    carry the same typed columns, or Ray fails to unify the blocks' schemas."""
    import pydicom

    from cxrscreen.data.synth import encode_dicom, encode_png, make_phantom

    arch = tmp_path / "arch"
    arch.mkdir()
    for i in range(40):
        (arch / f"{i:02d}.png").write_bytes(encode_png(make_phantom("normal", 64, i).image))
    (arch / "study.dcm").write_bytes(encode_dicom(make_phantom("covid", 64, 77).image, "m2_16bit_window"))
    out = tmp_path / "out"
    assert score_archive(arch, out, ScoreConfig(**FAST), progress=False).ok == 41
    ds = pydicom.dcmread(arch / "study.dcm")
    ds.SeriesDescription = "edited"
    ds.save_as(arch / "study.dcm")
    (arch / "more").mkdir()
    for i in range(72):
        (arch / "more" / f"{i:02d}.png").write_bytes(encode_png(make_phantom("covid", 64, 100 + i).image))
    for _ in range(2):  # and again: nothing left to do
        s = score_archive(arch, out, ScoreConfig(**FAST), progress=False)
        df = pl.read_parquet(out / "*.parquet")
        assert df.height == 113 and df["key"].n_unique() == 113 and (df["status"] == "ok").all()
    assert df.filter(pl.col("key") == "study.dcm")["dicom_modality"][0] is not None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_new_and_changed_files_are_scored_on_resume(tmp_path, ray_2cpu):
    from cxrscreen.data.synth import encode_png, make_phantom

    arch = tmp_path / "arch"
    arch.mkdir()
    for i in range(6):
        (arch / f"{i}.png").write_bytes(encode_png(make_phantom("normal", 64, i).image))
    out = tmp_path / "out"
    assert score_archive(arch, out, ScoreConfig(**FAST), progress=False).ok == 6
    (arch / "new.png").write_bytes(encode_png(make_phantom("covid", 64, 99).image))
    changed = encode_png(make_phantom("covid", 64, 100).image)
    (arch / "0.png").write_bytes(changed)
    s = score_archive(arch, out, ScoreConfig(**FAST), progress=False)
    assert (s.skipped, s.scored) == (5, 2)
    df = pl.read_parquet(out / "*.parquet")
    assert sorted(df["key"]) == sorted([f"{i}.png" for i in range(6)] + ["new.png"])  # old row of 0.png gone
    assert df.filter(pl.col("key") == "0.png")["sha256"][0] == hashlib.sha256(changed).hexdigest()
    (arch / "5.png").unlink()  # a deleted input: its row is kept and counted, or pruned on request
    s = score_archive(arch, out, ScoreConfig(**FAST), progress=False)
    assert (s.inputs, s.rows, s.stale) == (6, 7, 1) and "1 of them for inputs no longer in the archive" in str(s)
    s = score_archive(arch, out, ScoreConfig(**FAST, prune=True), progress=False)
    assert (s.rows, s.stale, s.pruned) == (6, 0, 1)
    assert sorted(pl.read_parquet(out / "*.parquet")["key"]) == sorted([f"{i}.png" for i in range(5)] + ["new.png"])


def test_resource_plan_leaves_cpus_for_decoding():
    two_pools = ScoreConfig(fused=False)
    plan = plan_resources(two_pools, cpus=2, gpus=0)
    assert plan.device == "cpu" and plan.actor_cpus * 2 <= 1.0 and plan.threads == 2
    big = plan_resources(ScoreConfig(fused=False, cls_actors=2, seg_actors=2), cpus=32, gpus=0)
    assert big.actor_cpus == 1.0 and big.threads == 8
    one = plan_resources(two_pools, cpus=1, gpus=0)  # one CPU: decode tasks still fit beside the actors
    assert 2 * one.actor_cpus + one.decode_cpus <= 1 and one.decode_cpus > 0
    assert plan.decode_cpus == 1.0
    with pytest.raises(ClusterTooSmall, match="nothing is left for decoding"):
        plan_resources(ScoreConfig(fused=False, actor_cpus=1.0), cpus=2, gpus=0)
    gpu = plan_resources(two_pools, cpus=16, gpus=1)
    assert gpu.device == "cuda" and gpu.actor_gpus == 0.5
    assert not plan_resources(ScoreConfig(), cpus=2, gpus=0).fused  # CPUs: two pools by default (faster there)
    fused = plan_resources(ScoreConfig(fused=True), cpus=2, gpus=0)  # one pool: half the machine for it, half decoding
    assert fused.fused and fused.actor_cpus == 1.0 and fused.decode_cpus == 1.0 and fused.threads == 2
    fused_one = plan_resources(ScoreConfig(fused=True), cpus=1, gpus=0)
    assert fused_one.actor_cpus + fused_one.decode_cpus <= 1 and fused_one.decode_cpus > 0
    on_gpu = plan_resources(ScoreConfig(), cpus=16, gpus=1)  # GPUs: one fused pool by default
    assert on_gpu.fused and on_gpu.actor_gpus == 1.0 and on_gpu.actor_cpus == 4 and on_gpu.threads == 4
    small_gpu = plan_resources(ScoreConfig(), cpus=4, gpus=1)  # a small node keeps most CPUs for decoding
    assert small_gpu.actor_cpus == 1 and small_gpu.threads == 2 and small_gpu.decode_cpus == 1.0
    assert not plan_resources(ScoreConfig(segmenter=""), cpus=16, gpus=1).fused  # nothing to fuse


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_killed_run_resumes_to_exactly_one_row_per_input(tmp_path):
    from cxrscreen.data.synth import write_archive

    write_archive(tmp_path / "arch", 200, seed=9, size=128)
    archive, out = tmp_path / "arch" / "images", tmp_path / "out"
    cmd = [sys.executable, "-m", "cxrscreen.cli", "score", str(archive), "-o", str(out), "--classifier",
           "mobilenet_v3_small", "--allow-untrained", "--batch-size", "4", "--rows-per-file", "8", "--num-cpus", "2"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("part-*.parquet"))) < 1:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its whole local Ray, mid-run
    proc.wait()
    first = pl.read_parquet(out / "part-*.parquet").height
    assert 0 < first < 200, "kill the run while it is in the middle"
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    df = pl.read_parquet(out / "part-*.parquet")
    assert df.height == 200 and df["key"].n_unique() == 200
    assert f"{first} already done, {200 - first} ok" in res.stdout
    # quiet by default: Ray's own lines (token auth, C++ core worker, Ray Data's log) are not printed
    for noise in ("core_worker", "Token authentication", "streaming_executor", "Progress bars disabled", "logging.cc"):
        assert noise not in res.stderr, res.stderr[-2000:]


def test_lung_crop_classifies_the_box(whole_image_classifier):
    import torch

    from cxrscreen.pipeline import Classifier
    from cxrscreen.preprocess import crop_boxes

    img = np.zeros((1, 64, 64), np.uint8)
    img[:, :, 32:] = 255  # dark left half, bright right half
    crop = crop_boxes(torch.from_numpy(img), np.array([[0.5, 0.0, 1.0, 1.0]], np.float32), 64, margin=0.0)
    assert crop.shape == (1, 64, 64) and int(crop[..., 1:].min()) == 255  # the right half only (the first
    assert int(crop[..., 0].min()) > 127  # column interpolates with the border pixel next to the box)
    whole = crop_boxes(torch.from_numpy(img), np.full((1, 4), np.nan, np.float32), 64)
    assert np.array_equal(whole.numpy(), img)  # no box: whole image

    cpu = RuntimeOptions(device="cpu", precision="fp32")
    cls = Classifier(ClassifierOptions(whole_image_classifier, lung_crop=True), cpu)
    plain = Classifier(ClassifierOptions(whole_image_classifier), cpu)

    def batch(image, box):
        return {"key": np.array(["a"], object), "status": np.array(["ok"], object),
                "error_type": np.array([None], object), "error_message": np.array([None], object),
                "image": image, "lung_bbox": np.array([box], np.float32)}

    box = np.array([[0.5, 0.0, 1.0, 1.0]], np.float32)
    cropped = cls(batch(img, box[0]))
    by_hand = plain(batch(crop_boxes(torch.from_numpy(img), box, 64).numpy(), [np.nan] * 4))
    full = plain(batch(img, box[0]))
    for c in CLASSES:
        assert abs(cropped[f"prob_{c}"][0] - by_hand[f"prob_{c}"][0]) < 1e-5
    assert max(abs(cropped[f"prob_{c}"][0] - full[f"prob_{c}"][0]) for c in CLASSES) > 1e-4


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scores_on_an_existing_cluster_via_ray_address(tmp_path):
    from cxrscreen.data.synth import write_archive

    write_archive(tmp_path / "arch", 8, seed=1, size=64)
    import socket

    port = 6400 + os.getpid() % 500
    env = dict(os.environ, RAY_ADDRESS=f"127.0.0.1:{port}")
    ray_cli = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", "--num-cpus", "2", "--port", str(port),
                             "--include-dashboard", "false"], start_new_session=True, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        res = subprocess.run([sys.executable, "-m", "cxrscreen.cli", "score", str(tmp_path / "arch" / "images"),
                              "-o", str(tmp_path / "out"), "--classifier", "mobilenet_v3_small", "--allow-untrained"],
                             capture_output=True, text=True, env=env, timeout=240)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "8 ok" in res.stdout
        assert pl.read_parquet(tmp_path / "out" / "*.parquet").height == 8
    finally:  # stop only this cluster (not `ray stop`, which would kill every local Ray)
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_image_as_archive_is_scored_and_a_wrong_archive_fails_before_ray(tmp_path, ray_2cpu):
    from click.testing import CliRunner

    from cxrscreen.cli import main
    from cxrscreen.data.synth import encode_png, make_phantom

    img = tmp_path / "one film.png"
    img.write_bytes(encode_png(make_phantom("normal", 64, 1).image))
    s = score_archive(img, tmp_path / "out", ScoreConfig(**FAST), progress=False)
    assert (s.inputs, s.ok) == (1, 1)
    assert pl.read_parquet(tmp_path / "out" / "*.parquet")["key"].to_list() == ["one film.png"]
    import json

    args = ["score", str(img), "--classifier", "mobilenet_v3_small", "--allow-untrained", "-o"]
    res = CliRunner().invoke(main, [*args, str(tmp_path / "j"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])  # one JSON object for scripts
    assert (out["inputs"], out["ok"], out["rows"], out["missing"], out["out"]) == (1, 1, 1, 0, str(tmp_path / "j"))
    res = CliRunner().invoke(main, [*args, str(tmp_path / "q"), "--quiet"])
    assert res.exit_code == 0 and res.output.strip() == ""
    for i in range(5):  # --dry-run says what would happen; --limit scores the first N
        (tmp_path / "five").mkdir(exist_ok=True)
        (tmp_path / "five" / f"{i}.png").write_bytes(encode_png(make_phantom("normal", 64, 10 + i).image))
    five = ["score", str(tmp_path / "five"), "--classifier", "mobilenet_v3_small", "--allow-untrained", "-o",
            str(tmp_path / "five_out")]
    res = CliRunner().invoke(main, [*five, "--limit", "2", "--json"])
    assert res.exit_code == 0 and json.loads(res.output.strip().splitlines()[-1])["rows"] == 2
    res = CliRunner().invoke(main, [*five, "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == {"archive": str(tmp_path / "five"), "kind": "folder", "inputs": 5,
                                      "by_format": {"png": 5}, "with_rows_in_out": 2, "new": 3, "rows_in_out": 2}
    assert pl.read_parquet(tmp_path / "five_out" / "*.parquet").height == 2  # the dry run scored nothing
    from cxrscreen.data.ingest import ingest  # --limit on a Parquet archive of several shards: the first N
    files = sorted((tmp_path / "five").glob("*.png"))
    ingest(pl.DataFrame({"file": [str(f) for f in files], "path": [f.name for f in files], "label": ["normal"] * 5}),
           tmp_path / "shards", shard_size=2, progress=False)
    res = CliRunner().invoke(main, ["score", str(tmp_path / "shards"), "--classifier", "mobilenet_v3_small",
                                    "--allow-untrained", "-o", str(tmp_path / "pq_out"), "--limit", "3", "--json"])
    assert res.exit_code == 0, res.output
    assert sorted(pl.read_parquet(tmp_path / "pq_out" / "*.parquet")["key"]) == ["0.png", "1.png", "2.png"]
    (tmp_path / "notes.doc").write_text("not an archive")
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, ["score", str(tmp_path / "notes.doc"), "-o", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "not a folder, an image" in res.output and len(res.output.splitlines()) <= 4
    assert time.perf_counter() - t0 < 10  # before models and Ray, not after


MARKERS = {"PatientName": "MRKNAME^ALICE", "PatientID": "MRKID4711", "PatientBirthDate": "19451108",
           "OtherPatientIDs": "MRKOTHERID", "InstitutionName": "MRKINSTITUTE", "ReferringPhysicianName": "MRKDOCTOR",
           "AccessionNumber": "MRKACC99", "PatientAddress": "MRKSTREET 1", "StationName": "MRKSTATION",
           "OperatorsName": "MRKOPERATOR"}


def _phi_dicoms(folder: Path) -> int:
    """DICOMs full of marker identifiers, broken as real archives break them: a UID whose length
    swallows the patient module, a patient name with an impossible length, truncations inside the
    patient module and in the pixels, a marker in a numeric field. Returns how many were written."""
    import io

    import pydicom

    from cxrscreen.data.synth import encode_dicom, make_phantom

    ds = pydicom.dcmread(io.BytesIO(encode_dicom(make_phantom("normal", 64, 5).image, "m2_16bit_window")))
    for k, v in MARKERS.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    good = buf.getvalue()
    name_at = good.index(b"MRKNAME")
    variants = {"intact.dcm": good}
    uid_at = good.index(b"\x08\x00\x18\x00UI")  # SOPInstanceUID: length covers the patient module
    variants["uid_swallows.dcm"] = good[:uid_at + 6] + (name_at - uid_at + 40).to_bytes(2, "little") + good[uid_at + 8:]
    pn_at = good.index(b"\x10\x00\x10\x00PN")
    variants["name_length.dcm"] = good[:pn_at + 6] + (60000).to_bytes(2, "little") + good[pn_at + 8:]
    variants["cut_in_patient.dcm"] = good[:name_at + 5]
    variants["cut_in_pixels.dcm"] = good[:len(good) - 3000]
    assert good.count(b"0.5\\0.5 ") == 1  # PixelSpacing, as written: the same length with a marker
    variants["marker_in_number.dcm"] = good.replace(b"0.5\\0.5 ", b"MRKNUM\\1")
    for name, data in variants.items():
        (folder / name).write_bytes(data)
    return len(variants)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_no_patient_identifier_reaches_any_output_log_or_console(tmp_path):
    """Issue 17.6: score marker-laden broken DICOMs with the CLI (its own Ray) and grep
    everything it left: console, Ray's logs of every process, the output files."""
    import shutil
    import tempfile

    arch = tmp_path / "arch"
    arch.mkdir()
    n = _phi_dicoms(arch)
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # Ray's socket paths must stay short
    try:
        res = subprocess.run([sys.executable, "-m", "cxrscreen.cli", "score", str(arch), "-o", str(tmp_path / "out"),
                              "--num-cpus", "2", "--batch-size", "4"],
                             env={**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONWARNINGS": "always"},
                             capture_output=True, timeout=280)
        assert res.returncode == 0, res.stderr[-2000:]
        df = pl.read_parquet(tmp_path / "out" / "*.parquet")
        assert df.height == n and (df.filter(pl.col("key") == "intact.dcm")["status"] == "ok").all()
        blobs = [("console", res.stdout + res.stderr)]
        blobs += [(str(f), f.read_bytes()) for f in ray_tmp.rglob("*") if f.is_file() and f.suffix in (".log", ".out", ".err")]
        blobs += [(str(f), f.read_bytes()) for f in (tmp_path / "out").rglob("*") if f.is_file()]
        blobs += [("rows", repr(df.drop("lung_mask_png").to_dicts()).encode())]
        assert len(blobs) > 5
        for where, blob in blobs:
            for marker in list(MARKERS.values()) + ["MRKNUM"]:
                assert marker.encode() not in blob, f"{marker} in {where}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigint_and_sigterm_keep_finished_rows_and_the_next_run_resumes(tmp_path):
    """Issue 17.4: Ctrl-C (SIGINT to the process group, as a terminal sends it) or SIGTERM writes
    the rows finished so far, exits non-zero with one line; the next run completes the rest."""
    import re
    import threading

    from cxrscreen.data.synth import encode_png, make_phantom

    arch = tmp_path / "arch"
    arch.mkdir()
    for i in range(160):
        (arch / f"{i:03d}.png").write_bytes(encode_png(make_phantom("normal", 64, i).image))
    cmd = [sys.executable, "-m", "cxrscreen.cli", "score", str(arch), "-o", str(tmp_path / "out"), "--classifier",
           "mobilenet_v3_small", "--allow-untrained", "--batch-size", "4", "--rows-per-file", "1000", "--num-cpus", "2"]
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        err = []
        reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(64), b"")), daemon=True)
        reader.start()
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:  # until the progress bar shows finished rows
            done = [int(m) for m in re.findall(rb"\| (\d+)/\d+ \[", b"".join(err))]
            if done and max(done) >= 8:
                break
            time.sleep(0.2)
        assert done and max(done) >= 8, b"".join(err)[-2000:]
        os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
        assert proc.wait(timeout=120) == 130
        reader.join(timeout=10)
        tail = b"".join(err).decode(errors="replace")
        assert "interrupted: stopped by SIG" in tail and "run the same command again" in tail
        assert "starting Ray (embedded, local) and loading the models" in tail  # said before the wait
        rows = pl.read_parquet(tmp_path / "out" / "*.parquet")
        assert rows.height >= 8 and rows["key"].n_unique() == rows.height  # nothing finished was lost
        assert rows.height < 160
    res = subprocess.run(cmd, capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = pl.read_parquet(tmp_path / "out" / "*.parquet")
    assert rows.height == 160 and rows["key"].n_unique() == 160


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_second_run_into_the_same_out_is_refused_while_the_first_holds_it(tmp_path):
    from cxrscreen.pipeline.output import OutputBusy, OutputLock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom cxrscreen.pipeline.output import OutputLock\n"
                               f"with OutputLock({str(tmp_path)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputBusy, match=f"another cxrscreen score \\(pid {holder.pid}\\)"):
            with OutputLock(tmp_path):
                pass
        from click.testing import CliRunner

        from cxrscreen.cli import main

        (tmp_path / "a.png").write_bytes(b"")
        res = CliRunner().invoke(main, ["score", str(tmp_path / "a.png"), "-o", str(tmp_path), "--classifier",
                                        "mobilenet_v3_small", "--allow-untrained"])
        assert res.exit_code == 1 and "being written by another cxrscreen score" in res.output
    finally:
        holder.kill()
        holder.wait()
    with OutputLock(tmp_path):  # released when its process died
        pass


def test_part_files_are_synced_before_they_count(tmp_path, monkeypatch):
    """Issue 17.5: file data, then the folder entry, reach the disk before a part file is 'done'."""
    import pyarrow as pa

    from cxrscreen.pipeline.output import write_part

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    write_part(pa.table({"key": ["a", "b"]}), tmp_path / "part-r-1.parquet")
    assert [Path(p).name for p in synced] == [".part-r-1.parquet.tmp", tmp_path.name]


def test_workers_write_part_files_and_hand_back_only_counts(mixed_archive, tmp_path):
    """Issue 18.4: the write stage turns a batch of output rows into one part file and returns one
    row of counts; a retried write's rows are repeats the run removes; the resume index, the hashes it skips
    by and the keys a new run supersedes are Arrow arrays."""
    import json

    import pyarrow as pa

    from cxrscreen.io.batch import unchanged
    from cxrscreen.pipeline.output import (SHA_PREFIX, drop_repeats, drop_superseded, key_hashes, output_index,
                                           row_counts, write_rows)

    archive, _ = mixed_archive
    cfg = ScoreConfig(**FAST)
    batch = next(iter(score_items_local(list_inputs(archive), cfg)))
    n = len(batch["key"])
    got = write_rows(batch, str(tmp_path), run="20260101T000000-aaaaaa")
    assert list(got["rows"]) == [n] and len(got["counts"]) == 1
    counts = json.loads(got["counts"][0])
    assert counts == row_counts(batch) and counts["ok"] + sum(counts["errors"].values()) == n
    assert counts["ok"] == sum(s == "ok" for s in batch["status"]) > 0
    write_rows(batch, str(tmp_path), run="20260101T000000-aaaaaa")  # Ray retried the task: a file of its own
    assert len(list(tmp_path.glob("part-*.parquet"))) == 2
    assert drop_repeats(tmp_path, output_index(tmp_path).repeated()) == n  # the run's clean-up: one row per key
    files = list(tmp_path.glob("part-*.parquet"))
    assert len(files) == 1 and pl.read_parquet(files[0])["key"].to_list() == [str(k) for k in batch["key"]]
    # a later run re-scores the first two keys (their content changed)
    write_rows({k: v[:2] for k, v in batch.items()}, str(tmp_path), run="20260102T000000-bbbbbb")
    (tmp_path / ".part-20260102T000000-bbbbbb-x.parquet.tmp").write_bytes(b"half")  # a killed write
    index = output_index(tmp_path)
    assert index.num_rows == n + 2 and not list(tmp_path.glob(".part-*.tmp"))
    assert index.runs == ["20260101T000000-aaaaaa", "20260102T000000-bbbbbb"]
    assert index.hashes.nbytes + index.sha.nbytes + index.run.nbytes == 28 * (n + 2)  # no key text kept
    newer = index.superseded("20260102T000000-bbbbbb")
    assert sorted(newer) == sorted(key_hashes([str(k) for k in batch["key"][:2]]))
    first, sha0 = str(batch["key"][0]), batch["sha256"][0]
    assert index.expected_sha(pa.array([first, "not-there"])).to_pylist() == [sha0[:SHA_PREFIX], None]
    assert unchanged(sha0[:SHA_PREFIX], sha0) and not unchanged(sha0[:SHA_PREFIX], "0" * 64)
    assert unchanged("", "") and not unchanged("", sha0) and not unchanged(None, sha0)  # still unreadable
    assert not unchanged(np.float32("nan"), sha0)  # Ray hands an all-None column back as NaN
    assert key_hashes(["a", "b"]).tolist() == key_hashes(pa.array(["a", "b"])).tolist() != key_hashes(["b", "a"]).tolist()
    # the earlier run's rows of the re-scored keys are dropped; its other rows stay
    assert drop_superseded(tmp_path, newer, "20260102T000000-bbbbbb") == 2
    index = output_index(tmp_path)
    assert index.num_rows == n and not len(index.superseded("20260102T000000-bbbbbb"))


_FAULT_SCRIPT = """
import json, os, signal, sys, threading, time
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
import psutil
from cxrscreen.data.synth import encode_png, make_phantom
from cxrscreen.pipeline import ScoreConfig, score_archive

mode, arch, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
for i in range(160):
    (arch / f"{i:03d}.png").write_bytes(encode_png(make_phantom("normal", 64, i).image))
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "node_ip_address": "127.0.0.1",
                                                        "include_dashboard": False})
worker = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
cluster.wait_for_nodes()
ray.init(address=cluster.address, _node_ip_address="127.0.0.1")  # the driver on loopback too
done = {}

def strike():
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        actors = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                title = (p.info["cmdline"] or [""])[0]  # Ray names its actor processes ray::<class>
                if title.startswith("ray::") and "Classif" in title and p.pid != os.getpid():  # Classifier (CPU: two pools)
                    actors.append(p.pid)
            except psutil.Error:
                pass
        if actors:
            time.sleep(3)  # let it work on a few batches first
            if mode == "actor":
                os.kill(actors[0], signal.SIGKILL)
                done["killed"] = "actor"
            else:
                cluster.remove_node(worker, allow_graceful=False)
                done["killed"] = "node"
            return
        time.sleep(0.5)

threading.Thread(target=strike, daemon=True).start()
cfg = ScoreConfig(classifier="mobilenet_v3_small", allow_untrained=True, batch_size=4, rows_per_file=50,
                  address=cluster.address)
s = score_archive(arch, out, cfg, progress=False)
print(json.dumps({"inputs": s.inputs, "ok": s.ok, "missing": len(s.missing), "rows": s.rows, **done}))
ray.shutdown()
cluster.shutdown()
"""


_PLACEMENT_SCRIPT = """
import json, sys
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
from cxrscreen.data.synth import encode_png, make_phantom
from cxrscreen.pipeline import ScoreConfig, score_archive
import cxrscreen.pipeline.score as score

arch, out = Path(sys.argv[1]), Path(sys.argv[2])
for i in range(40):
    (arch / f"{i:03d}.png").write_bytes(encode_png(make_phantom("normal", 64, i).image))
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1",
                                                        "include_dashboard": False})
cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
cluster.wait_for_nodes()
ray.init(address=cluster.address, _node_ip_address="127.0.0.1")
cfg = ScoreConfig(classifier="mobilenet_v3_small", allow_untrained=True, batch_size=4, address=cluster.address)
got = {}
listing = arch.parent / "inputs.txt"
listing.write_text("".join(f"arch/{i:03d}.png\\n" for i in range(40)))
listed = []
pending_items = score.pending_items
score.pending_items = lambda *a: listed.append(1) or pending_items(*a)
for name in ("shared", "local"):
    if name == "local":  # as if the worker node had a disk of its own
        score._sees_token = lambda path: False
        score._sees_archive = lambda path, folders, size: False
    s = score_archive(listing, out / name, cfg, progress=False)
    suffixes = {len(p.name.rsplit("-", 1)[1]) for p in (out / name).glob("part-*.parquet")}
    got[name] = {"ok": s.ok, "rows": s.rows, "missing": len(s.missing), "suffixes": sorted(suffixes),
                 "driver_listed": len(listed)}
print(json.dumps(got))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
@pytest.mark.timeout(330)
def test_workers_write_on_a_shared_disk_and_the_driver_otherwise(tmp_path):
    """Issue 18.4/18.5: on a cluster of two nodes (127.0.0.1) whose nodes all see OUT (a token
    file read back on each node), write tasks write the part files (named by their rows' keys);
    when a node does not see OUT, the driver writes them (numbered). Likewise a list archive is
    listed by read tasks where every node sees it, else by the driver (folder trees alike:
    the same check). One row per input."""
    import json

    (tmp_path / "arch").mkdir()
    res = subprocess.run([sys.executable, "-c", _PLACEMENT_SCRIPT, str(tmp_path / "arch"), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_ADDRESS": "", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    hashed, numbered = len("0123456789abcdef.parquet"), len("00000.parquet")
    # the list file: read tasks list it where every node sees it, else the driver (once)
    assert got == {"shared": {"ok": 40, "rows": 40, "missing": 0, "suffixes": [hashed], "driver_listed": 0},
                   "local": {"ok": 40, "rows": 40, "missing": 0, "suffixes": [numbered], "driver_listed": 1}}
    assert not list((tmp_path / "out").glob("*/.probe-*"))


@pytest.mark.slow
@pytest.mark.timeout(330)
@pytest.mark.parametrize("mode", ["actor", "node"])
def test_scoring_survives_a_killed_model_actor_or_worker_node(tmp_path, mode):
    """Issue 17.14: a local two-node cluster on 127.0.0.1; mid-run a Classifier actor is SIGKILLed
    (or the worker node is removed): the run completes with exactly one row per input.
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray resolve 127.0.0.1 to loopback, not to the
    machine's address, so all test traffic stays on loopback."""
    import json

    (tmp_path / "arch").mkdir()
    res = subprocess.run([sys.executable, "-c", _FAULT_SCRIPT, mode, str(tmp_path / "arch"), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_ADDRESS": "", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary.get("killed") == mode, summary
    assert summary["inputs"] == summary["ok"] == summary["rows"] == 160 and summary["missing"] == 0
    df = pl.read_parquet(tmp_path / "out" / "*.parquet")
    assert df.height == 160 and df["key"].n_unique() == 160


def test_a_key_with_several_rows_keeps_one_and_the_summary_counts_what_stays(tmp_path):
    """``drop_repeats``: of the rows of one key (an input listed twice, a retried write, a run
    killed before its clean-up) the newest run's first row in file order stays; the summary
    counts the run's rows as they stand in OUT (``run_counts``)."""
    from cxrscreen.pipeline.output import PartWriter, drop_repeats, output_index, row_counts, run_counts
    from cxrscreen.pipeline.score import ScoreSummary

    def batch(keys, status):
        n = len(keys)
        return {"key": np.array(keys, object), "status": np.array(status, object),
                "error_type": np.array([None if s == "ok" else "empty" for s in status], object),
                "label": np.array(["covid" if s == "ok" else None for s in status], object),
                "refer_reason": np.array([[] if s == "ok" else ["unreadable"] for s in status] + [None], object)[:n],
                "prob_covid": np.full(n, 0.9, np.float32), "prob_normal": np.full(n, 0.1, np.float32)}

    old = PartWriter(tmp_path, "20260101T000000-aaaaaa", rows_per_file=2)  # killed with a key twice
    old.add(batch(["a", "d", "d"], ["ok", "ok", "error"]))
    old.flush()
    run = "20260102T000000-bbbbbb"
    writer, summary = PartWriter(tmp_path, run, rows_per_file=2), ScoreSummary()
    for keys, status in ((["a", "b"], ["ok", "error"]), (["b", "a"], ["error", "ok"]), (["c", "b"], ["ok", "error"])):
        summary.add(writer.add(batch(keys, status)))
    writer.flush()
    assert summary.ok == 3 and summary.errors == {"empty": 3}
    index = output_index(tmp_path)
    assert index.num_rows == 9 and len(index.repeated()) == 3  # a (both runs), b, d
    assert drop_repeats(tmp_path, index.repeated()) == 5 and not len(output_index(tmp_path).repeated())
    after = pl.read_parquet(tmp_path / "part-*.parquet", include_file_paths="file")
    assert sorted(after["key"]) == ["a", "b", "c", "d"]
    rows = {k: (run in f, st) for k, f, st in after.select("key", "file", "status").iter_rows()}
    assert rows == {"a": (True, "ok"), "b": (True, "error"), "c": (True, "ok"), "d": (False, "ok")}
    summary.recount(run_counts(tmp_path, run))
    left = pl.read_parquet(tmp_path / "part-20260101T000000-aaaaaa-*.parquet")  # as row_counts counts a batch
    assert run_counts(tmp_path, "20260101T000000-aaaaaa") == row_counts({c: left[c].to_list() for c in left.columns})
    assert (summary.ok, summary.errors, summary.referred, summary.labels) == (2, {"empty": 1}, {"unreadable": 1},
                                                                             {"covid": 2})
