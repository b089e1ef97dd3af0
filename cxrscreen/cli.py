"""The ``cxrscreen`` command line: a thin layer over the Python API."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cxrscreen import __version__
from cxrscreen.pipeline.config import ScoreConfig
from cxrscreen.referral import OOD_REFER_RATE, TARGET_SENSITIVITY
from cxrscreen.runtime import RUNTIMES


class ScoreCommand(click.Command):
    """``score --help`` shows each option's default from ``ScoreConfig`` (the one source of the
    defaults; the options themselves default to None so that a config file can set them), in
    the words click uses for the other commands."""

    KEYS = {"actors": "cls_actors", "compile_": "compile"}  # option name -> config key where they differ

    def format_options(self, ctx, formatter):
        from dataclasses import MISSING, fields

        defaults = {f.name: f.default for f in fields(ScoreConfig)}
        unset = (None, getattr(click.core, "UNSET", None))  # click >= 8.2 marks "no default" with UNSET
        for p in self.params:
            key = self.KEYS.get(p.name, p.name)
            if isinstance(p, click.Option) and p.default in unset and defaults.get(key, MISSING) is not MISSING:
                value = defaults[key]
                if value is not None and "[default:" not in (p.help or ""):  # said once, also if asked twice
                    shown = f"'{value}'" if value == "" else str(value).lower() if isinstance(value, bool) else value
                    p.help = f"{p.help or ''}  [default: {shown}]".strip()
        super().format_options(ctx, formatter)


@click.group(context_settings={"show_default": True})
@click.version_option(__version__, prog_name="cxrscreen")
@click.option("-v", "--verbose", is_flag=True, help="Also show Ray's own log lines (worker output, warnings, "
              "C++ logs); by default only cxrscreen's lines and errors are printed.")
def main(verbose):
    """Batch screening of chest X-rays for COVID-19 and pneumonia."""
    if verbose:
        import os

        os.environ["CXRSCREEN_VERBOSE"] = "1"


@main.command()
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("-n", "--num", default=100, help="Number of phantoms.")
@click.option("--seed", default=0)
@click.option("--size", default=256, help="Image side in pixels.")
@click.option("--formats", default="png",
              help="Comma-separated, round-robin: png, png16, jpeg, dicom.")
@click.option("--parquet", is_flag=True, help="Also write phantoms.parquet with PNG bytes.")
@click.option("--bad", is_flag=True, help="Also write broken files (images/bad/) that must become error rows.")
def synth(out_dir, num, seed, size, formats, parquet, bad):
    """Generate synthetic chest-radiograph phantoms with known labels and lung masks."""
    from cxrscreen.data.synth import write_archive, write_bad_inputs

    manifest = write_archive(out_dir, num, seed=seed, size=size,
                             formats=tuple(f.strip() for f in formats.split(",")), parquet=parquet)
    if bad:
        kinds = write_bad_inputs(Path(out_dir) / "images" / "bad")
        click.echo(f"wrote {len(kinds)} broken files to {Path(out_dir) / 'images' / 'bad'}")
    click.echo(f"wrote {num} phantoms; manifest {manifest}")


@main.command()
@click.argument("src", type=click.Path(exists=True))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--shard-size", default=1000, help="Images per Parquet shard.")
@click.option("--resize", type=int, default=None, help="Re-encode at SIZE x SIZE (default: original bytes).")
@click.option("--pixels", type=click.Choice(["png", "pgm"]), default="png", show_default=True,
              help="How --resize re-encodes: PNG, or PGM (raw pixels: 2.2x the size, decoded 13x as fast).")
def ingest(src, out_dir, shard_size, resize, pixels):
    """Ingest a manifest (CSV/Parquet) or labeled folder tree into sharded Parquet."""
    from cxrscreen.data.ingest import ingest as run_ingest
    from cxrscreen.data.manifest import load_manifest

    manifest = load_manifest(src)
    try:  # ingest refuses --pixels without --resize before it writes anything
        shards = run_ingest(manifest, out_dir, shard_size=shard_size, resize=resize, pixels=pixels)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"wrote {len(shards)} shards to {out_dir}")


@main.command()
@click.argument("manifest", type=click.Path(exists=True))
@click.option("-o", "--out", "out_path", required=True, type=click.Path(dir_okay=False), help="CSV or Parquet.")
@click.option("--fractions", default="0.7,0.15,0.15", help="train,val,test")
@click.option("--seed", default=0)
@click.option("--cap-per-class", type=int, default=None, help="Keep at most N images per class (whole patients).")
def split(manifest, out_path, fractions, seed, cap_per_class):
    """Assign patient-level, label-stratified train/val/test splits."""
    from cxrscreen.data.manifest import load_manifest
    from cxrscreen.data.splits import leaking_groups, patient_split

    df = patient_split(load_manifest(manifest).drop("split"), tuple(float(x) for x in fractions.split(",")),
                       seed=seed, cap_per_class=cap_per_class)
    if leaking_groups(df):  # the splitter's own invariant; never expected to fire
        raise click.ClickException(f"patients in two splits: {leaking_groups(df)[:5]}")
    _write_table(df.drop("file"), out_path)
    click.echo(df.group_by("label", "split").len().sort("label", "split"))


@main.command()
@click.argument("manifest", type=click.Path(exists=True))
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False), help="Write the pairs (CSV/Parquet).")
@click.option("--threshold", default=0.99, help="Min fingerprint cosine similarity.")
@click.option("--drop", "drop_path", type=click.Path(dir_okay=False), help="Write the manifest without duplicates.")
def audit(manifest, out_path, threshold, drop_path):
    """Report near-duplicate image pairs inside and across splits."""
    from cxrscreen.data.dedup import audit_duplicates, drop_duplicates
    from cxrscreen.data.manifest import load_manifest

    df = load_manifest(manifest)
    pairs = audit_duplicates(df, threshold)
    cross = pairs.filter(pairs["cross_split"])
    click.echo(f"{len(pairs)} near-duplicate pairs, {len(cross)} across splits")
    if out_path:
        _write_table(pairs, out_path)
    if drop_path:
        kept = drop_duplicates(df, pairs)
        _write_table(kept.drop("file"), drop_path)
        click.echo(f"kept {len(kept)} of {len(df)} images")


@main.command(cls=ScoreCommand)
@click.argument("archive", type=click.Path(exists=True))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder of Parquet part files (re-running resumes).")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="YAML score config (see configs/score.yaml); options below override it.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override any config key (repeatable), e.g. --set mask_size=128 --set lung_fraction_min=0.1.")
@click.option("--classifier", help="Shipped weights (cxrnet-4class) or a checkpoint folder.")
@click.option("--segmenter", help="Shipped weights (unet-lungs, unet-lungs-fast), a checkpoint folder, or '' for none.")
@click.option("--allow-untrained", is_flag=True, default=None, help="Accept an architecture name (random weights).")
@click.option("--site", type=click.Path(exists=True, file_okay=False),
              help="Site profile from `cxrscreen calibrate` (temperature, thresholds, OOD reference).")
@click.option("--refer-below", type=float, help="Refer below this top probability (default: site profile, else checkpoint).")
@click.option("--ood-threshold", type=float, help="Refer above this ood_score (default: site profile, else checkpoint).")
@click.option("--batch-size", type=int)
@click.option("--actors", type=int, help="Actors per model pool.")
@click.option("--device", type=click.Choice(ScoreConfig.CHOICES["device"]))
@click.option("--precision", type=click.Choice(ScoreConfig.CHOICES["precision"]))
@click.option("--runtime", type=click.Choice(RUNTIMES), help="Model runtime (auto: fastest available).")
@click.option("--cuda-graphs/--no-cuda-graphs", default=None, help="torch on CUDA: replay CUDA graphs.")
@click.option("--compile/--no-compile", "compile_", default=None, help="torch runtime: torch.compile.")
@click.option("--decode-jpeg-on-device", is_flag=True, default=None,
              help="Pass JPEGs as bytes to the model actor, decoded there in batch (nvJPEG on GPU).")
@click.option("--int8-calibration", type=click.Path(exists=True), help="TensorRT int8: images to calibrate on.")
@click.option("--lung-crop/--no-lung-crop", default=None, help="Classify the lung bounding box.")
@click.option("--cam", type=click.Choice(ScoreConfig.CHOICES["cam"]), help="Add a Grad-CAM heatmap (PNG) and its lung energy per row.")
@click.option("--include-phi", is_flag=True, default=None, help="Write DICOM patient identifiers.")
@click.option("--rows-per-file", type=int, help="Rows per output part file.")
@click.option("--prune", is_flag=True, default=None, help="Remove output rows of inputs no longer in the archive.")
@click.option("--worklist/--no-worklist", default=None,
              help="Write the triage worklist (OUT/worklist.csv, OUT/worklist.html) after the run.")
@click.option("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray).")
@click.option("--num-cpus", type=int, help="CPUs of the embedded local Ray.")
@click.option("--limit", type=int, help="Score only the first N inputs (a trial run; a later run without it resumes).")
@click.option("--dry-run", is_flag=True, help="Say what would be scored (inputs by format, rows already in OUT) and stop.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object (no progress bar).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary: only errors (see the exit code).")
def score(archive, out_dir, config_path, settings, classifier, segmenter, allow_untrained, site, refer_below, ood_threshold,
          batch_size, actors, device, precision, runtime, cuda_graphs, compile_, decode_jpeg_on_device,
          int8_calibration, lung_crop, cam, include_phi, rows_per_file, prune, worklist, address, num_cpus, limit,
          dry_run, as_json, quiet):
    """Score every image of ARCHIVE (folder tree, list file, Parquet, or one image): one row per input.

    Referral thresholds: an explicit --refer-below / --ood-threshold (or config key) wins, then
    the --site profile's, then the checkpoint's (fitted on its validation split).

    Exit status: 0 done, 1 failed (cluster unreachable, OUT busy, inputs without a row),
    2 usage (options, config, ARCHIVE, models), 130 interrupted (finished rows kept)."""
    import json

    from cxrscreen.config import ConfigError, load_config, parse_settings
    from cxrscreen.io.sources import archive_kind
    from cxrscreen.pipeline import score_archive

    try:
        flags = dict(classifier=classifier, segmenter=segmenter, allow_untrained=allow_untrained, site=site,
                     refer_below=refer_below, ood_threshold=ood_threshold, batch_size=batch_size, cls_actors=actors,
                     seg_actors=actors, device=device, precision=precision, runtime=runtime, cuda_graphs=cuda_graphs,
                     compile=compile_, decode_jpeg_on_device=decode_jpeg_on_device,
                     int8_calibration=int8_calibration, lung_crop=lung_crop, cam=cam, include_phi=include_phi,
                     rows_per_file=rows_per_file, prune=prune, worklist=worklist, address=address,
                     num_cpus=num_cpus, limit=limit)
        given = parse_settings(settings)
        both = sorted(k for k in given if flags.get(k) is not None)
        if both:
            raise ConfigError(f"{', '.join(both)} given both as an option and with --set: give it once")
        cfg = load_config(ScoreConfig, config_path, settings=given, **flags)
        archive_kind(archive)
        if dry_run:
            from cxrscreen.pipeline.score import dry_run as plan

            p = plan(archive, out_dir, cfg)
            click.echo(json.dumps(p) if as_json else
                       f"{p['inputs']} inputs ({', '.join(f'{k} {v}' for k, v in p['by_format'].items()) or 'none'}): "
                       f"{p['new']} new, {p['with_rows_in_out']} with a row in {out_dir} (skipped if unchanged, "
                       "else scored again); nothing was scored (--dry-run)")
            return
    except (ConfigError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    from cxrscreen.cluster import ClusterUnreachable
    from cxrscreen.pipeline.output import OutputBusy, OutputMismatch
    from cxrscreen.io.errors import ArchiveError
    from cxrscreen.pipeline.score import ClusterTooSmall, Interrupted, ModelCheckFailed

    def say_what_starts() -> None:  # the first seconds go to Ray's start and model loading: say so
        import os

        ray_at = cfg.address or os.environ.get("RAY_ADDRESS")
        click.echo(f"scoring {archive} -> {out_dir}: classifier {cfg.classifier}, segmenter {cfg.segmenter or 'none'}, "
                   f"device {cfg.device}; starting Ray ({'cluster at ' + ray_at if ray_at else 'embedded, local'}) "
                   "and loading the models ...", err=True)

    try:  # an archive or OUT it refuses is refused in one line, before that line
        summary = score_archive(archive, out_dir, cfg, progress=not (as_json or quiet),
                                on_start=None if as_json or quiet else say_what_starts)
    except (ModelCheckFailed, ArchiveError, OutputMismatch) as e:
        raise click.UsageError(str(e)) from None
    except (ClusterUnreachable, ClusterTooSmall, OutputBusy) as e:
        raise click.ClickException(str(e)) from None
    except Interrupted as e:
        click.echo(f"\ninterrupted: {e}", err=True)
        sys.exit(130)
    except KeyboardInterrupt:  # before Ray and the models were up: no row was finished yet
        click.echo(f"\ninterrupted while starting: nothing new was written to {out_dir}; run the same command again",
                   err=True)
        sys.exit(130)
    lists = None
    if cfg.worklist and summary.rows:
        from cxrscreen.results import write_worklist

        lists = write_worklist(out_dir)
    if as_json:
        click.echo(json.dumps({"out": str(out_dir), "worklist": str(lists[1]) if lists else None, **summary.to_dict()}))
    elif not quiet:
        click.echo(f"{summary}; written to {out_dir}" + (f"; worklist {lists[1]} (and .csv)" if lists else ""))
        if summary.drift:
            click.echo(f"warning: {summary.drift}")
    if summary.missing:
        raise click.ClickException(f"{len(summary.missing)} inputs have no output row, e.g. {summary.missing[:3]}")


@main.command()
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--max-html-rows", default=10_000, help="Rows shown in worklist.html (the CSV has all).")
def worklist(out_dir, max_html_rows):
    """Write the triage worklist of a scored OUT folder again: worklist.csv (every row, by
    priority) and worklist.html (thumbnails with the lung outline; opens offline)."""
    from cxrscreen.results import write_worklist

    try:
        csv_path, html_path = write_worklist(out_dir, max_html_rows)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"wrote {html_path} and {csv_path}")


@main.command("export-masks")
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--to", "to_dir", required=True, type=click.Path(file_okay=False), help="Folder for the mask PNGs.")
def export_masks_cmd(out_dir, to_dir):
    """Write each scored row's lung mask as a PNG at its original image's size (for viewers):
    TO/<key without extension>.png, 0 = background, 255 = lung."""
    from cxrscreen.results import export_masks

    try:
        n = export_masks(out_dir, to_dir)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"wrote {n} masks to {to_dir}")


@main.command()
@click.argument("archive", type=click.Path(exists=True, file_okay=False))
@click.option("--labels", "labels_csv", required=True, type=click.Path(exists=True, dir_okay=False),
              help="CSV with path (relative to ARCHIVE or absolute) and label (a class of the classifier).")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Profile folder.")
@click.option("--classifier", default="cxrnet-4class", help="Shipped weights or a checkpoint folder.")
@click.option("--target-sensitivity", default=TARGET_SENSITIVITY,
              help="COVID sensitivity (predicted or referred) the referral threshold must reach on the sample.")
def calibrate(archive, labels_csv, out_dir, classifier, target_sensitivity):
    """Fit a site profile from a labelled sample (100-500 images) of your own archive; use it
    with `cxrscreen score --site PROFILE`."""
    from cxrscreen.evaluate.calibrate import calibrate_site

    try:
        p = calibrate_site(archive, labels_csv, out_dir, classifier, target_sensitivity=target_sensitivity)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    f = p.fitted_on
    click.echo(f"site profile {out_dir}: {f['images']} images; temperature {f['checkpoint_temperature']:.2f} -> "
               f"{p.temperature:.2f}, COVID referral threshold {f['checkpoint_refer_threshold']} -> "
               f"{p.refer_threshold:.3f}; accuracy on the sample {f['accuracy']:.3f}")


@main.command()
@click.argument("archive", type=click.Path(exists=True))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--classifier", default="cxrnet-4class", help="Checkpoint or bundled weights.")
@click.option("--segmenter", default="unet-lungs", help="For the lung energy ('' = none).")
@click.option("--cam", "method", type=click.Choice(ScoreConfig.CHOICES["cam"]), default="gradcam",
              help="Heatmap method (as score's --cam).")
@click.option("--limit", type=int, help="Explain only the first N inputs.")
def explain(archive, out_dir, classifier, segmenter, method, limit):
    """Grad-CAM heatmaps, overlays and CAM energy inside the lungs for the images of ARCHIVE."""
    from cxrscreen.explain import explain_archive

    df = explain_archive(archive, out_dir, classifier, segmenter, method, limit)
    ok = df.filter(df["status"] == "ok")
    click.echo(f"{len(df)} inputs, {len(ok)} explained -> {out_dir}/explanations.parquet, {out_dir}/overlays/")
    if len(ok) and ok["cam_lung_energy"].null_count() < len(ok):
        click.echo(f"CAM energy inside the lungs: mean {ok['cam_lung_energy'].mean():.3f}, "
                   f"min {ok['cam_lung_energy'].min():.3f} (low values: the model looks outside the lungs)")


@main.command()
@click.option("--source", type=click.Choice(["phantoms", "cxr", "fullres"]), default="phantoms")
@click.option("-n", "--num", default=256, help="Number of inputs (replicated if needed).")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="YAML score config.")
@click.option("--classifier", help="Shipped weights or a checkpoint folder (architecture names need --allow-untrained in score).")
@click.option("--segmenter", help="Registry name or checkpoint folder ('' = none).")
@click.option("--precision", type=click.Choice(ScoreConfig.CHOICES["precision"]))
@click.option("--runtime", type=click.Choice(RUNTIMES), help="Model runtime (auto: fastest available).")
@click.option("--actors", type=int, multiple=True, default=(1,), help="Actors per model pool (repeat to compare several).")
@click.option("--batch-size", "batch_sizes", type=int, multiple=True, default=(16,),
              help="Images per model batch (repeat to compare several).")
@click.option("--per-file-n", default=64, help="Inputs for the slow per-file loop.")
@click.option("--device", type=click.Choice(ScoreConfig.CHOICES["device"]))
@click.option("--no-ray", is_flag=True, help="Skip the Ray pipeline mode (a machine without ray).")
@click.option("--ceiling", is_flag=True, help="Instead: the pipeline's ceiling, zero-cost models replaying their first "
              "output, from Parquet and PNG/JPEG/DICOM folders, on each --cores count.")
@click.option("--cores", type=int, multiple=True, default=(1, 2), help="--ceiling: Ray CPUs (repeat for several).")
@click.option("--inputs", default=None, help="--ceiling: input kinds, comma-separated (default all: parquet = "
              "pre-decoded PGM pixels, parquet_png, png, jpeg, dicom).")
@click.option("--shared", type=click.Path(file_okay=False), default="../shared/data")
@click.option("-o", "--out", "out_path", default="benchmarks/results/bench.parquet", type=click.Path(dir_okay=False))
def bench(source, num, config_path, classifier, segmenter, precision, runtime, actors, batch_sizes, per_file_n,
          device, no_ray, ceiling, cores, inputs, shared, out_path):
    """Throughput of decode, model, full pipeline, DataLoader and per-file loops (to Parquet);
    with --ceiling, what the pipeline reaches around an infinitely fast model."""
    from cxrscreen.bench import CEILING_INPUTS, ratios, run_bench, run_ceiling
    from cxrscreen.config import load_config

    cfg = load_config(ScoreConfig, config_path, classifier=classifier, segmenter=segmenter, precision=precision,
                      runtime=runtime, device=device)
    if ceiling:
        kinds = tuple(k.strip() for k in inputs.split(",") if k.strip()) if inputs else CEILING_INPUTS
        if unknown := set(kinds) - set(CEILING_INPUTS):
            raise click.UsageError(f"--inputs: unknown {', '.join(sorted(unknown))}; choose from {', '.join(CEILING_INPUTS)}")
        run_ceiling(source, num, cfg, tuple(cores), Path(out_path), Path(shared), echo=click.echo, inputs=kinds)
        return
    df = run_bench(source, num, cfg, tuple(actors), tuple(batch_sizes), per_file_n, Path(out_path), Path(shared),
                   echo=click.echo, use_ray=not no_ray)
    click.echo(" ".join(f"{k}={v:.2f}" for k, v in ratios(df).items()))


@main.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="YAML train config.")
@click.option("--model", help="Registry model name.")
@click.option("--task", type=click.Choice(["4class", "3class", "binary"]))
@click.option("--data", help="Manifest (CSV/Parquet) or labeled folder.")
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--num-workers", type=int, help="Ray Train workers (DDP).")
@click.option("--device", type=click.Choice(ScoreConfig.CHOICES["device"]),
              help="Where each worker trains (auto: CUDA when there is a GPU) [default: the config's use_gpu].")
@click.option("--resume-from", type=click.Path(exists=True, file_okay=False), help="Checkpoint folder to continue.")
@click.option("--seed", type=int, help="Random seed (initialisation, augmentation, batch order).")
@click.option("-o", "--out", type=click.Path(file_okay=False), help="Output folder for the checkpoint.")
def train(config_path, model, task, data, epochs, batch_size, num_workers, device, resume_from, seed, out):
    """Train a registry model with Ray Train (CPU or GPUs, 1..N workers)."""
    from cxrscreen.config import load_config
    from cxrscreen.train import TrainConfig, train as run_train

    use_gpu = None
    if device is not None:
        import torch

        use_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    cfg = load_config(TrainConfig, config_path, model=model, task=task, data=data, epochs=epochs,
                      batch_size=batch_size, num_workers=num_workers, use_gpu=use_gpu,
                      resume_from=resume_from, seed=seed, out=out)
    run_train(cfg, progress=click.echo)


@main.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--data", help="Manifest to evaluate on (default: the training data).")
@click.option("--split", default="test")
@click.option("--target-sensitivity", default=TARGET_SENSITIVITY,
              help="COVID sensitivity the refer flag must reach on val.")
@click.option("--ood-refer-rate", default=OOD_REFER_RATE,
              help="Share of in-distribution (val) images the OOD threshold refers.")
@click.option("--predictions", "predictions_path", type=click.Path(dir_okay=False),
              help="Write the per-image probabilities it computed (Parquet: key, file, label, prob_*, ood_score).")
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False), help="Write the metrics as JSON.")
def evaluate(model_dir, data, split, target_sensitivity, ood_refer_rate, predictions_path, out_path):
    """Metrics of a trained model: classifiers on a patient-level split (calibrated on val),
    segmenters on the expert masks and the pseudo-mask validation split."""
    import json

    _require_report_extra()
    from cxrscreen.evaluate.run import evaluate_model, evaluate_segmenter, write_predictions
    from cxrscreen.models.checkpoint import read_info

    try:
        segmenter = read_info(model_dir).task == "segment"
        res = (evaluate_segmenter(model_dir, data) if segmenter else
               evaluate_model(model_dir, data, split, target_sensitivity=target_sensitivity,
                              ood_refer_rate=ood_refer_rate, predictions=bool(predictions_path)))
    except ValueError as e:  # a missing or mismatched manifest, leakage, a bad checkpoint: one line
        raise click.UsageError(str(e)) from None
    if segmenter:
        for k, v in res.items():
            if isinstance(v, dict):
                click.echo(f"{k:<26} n={v['n']} Dice={v['dice']:.4f} IoU={v['iou']:.4f} "
                           f"pixel-acc={v['pixel_accuracy']:.4f}")
        if out_path:
            Path(out_path).write_text(json.dumps(res, indent=2))
        return
    if predictions_path:
        write_predictions(res.pop("predictions"), res["classes"], predictions_path)
    m = res["metrics"]
    click.echo(f"{split}: n={m['n']} accuracy={m['accuracy']:.4f} macro-F1={m['macro_f1']:.4f} "
               f"macro-AUC={m['macro_auc']:.4f} ECE={m['ece']:.4f} (T={res['temperature']:.2f})")
    for c, v in m["per_class"].items():
        click.echo(f"  {c:<22} P={v['precision']:.3f} R={v['recall']:.3f} F1={v['f1']:.3f} "
                   f"spec={v['specificity']:.3f} AUC={v['auc']:.3f} n={v['support']}")
    cov = res["at_coverage"]
    click.echo(f"val referred {res['val_referred_fraction']:.1%}; {split} referred {res['referred_fraction']:.1%} (" + ", ".join(
        f"{k} {v:.1%}" for k, v in res["referred_by_reason"].items()) + f"); accuracy of the rest "
        f"{cov['accuracy']:.4f} at coverage {cov['coverage']:.1%}")
    probe = res.get("source_probe")
    if probe and probe["balanced_accuracy"] is not None:
        click.echo(f"source probe: balanced accuracy {probe['balanced_accuracy']:.3f} "
                   f"(chance {probe['chance']:.3f}) over {', '.join(probe['sources'])}")
    if out_path:
        Path(out_path).write_text(json.dumps(res, indent=2))


@main.command()
@click.argument("model_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--data", help="Manifest to evaluate on (default: the first model's training data).")
@click.option("--split", default="test")
@click.option("--segmenter", default="unet-lungs", help="For lung masks and CAM energy ('' = none).")
@click.option("--seg-data", help="Segmentation manifest for image/expert/predicted triplets.")
@click.option("--loso", multiple=True, type=click.Path(exists=True, dir_okay=False), help="loso.parquet files to include.")
@click.option("--samples", default=8, help="Sample images per model.")
def report(model_dirs, out_dir, data, split, segmenter, seg_data, loso, samples):
    """HTML report + comparison table (Parquet, Markdown) of one or more trained classifiers."""
    _require_report_extra()
    from cxrscreen.evaluate.report import build_report

    try:
        path = build_report(list(model_dirs), out_dir, data, split, segmenter or None, seg_data, list(loso), samples,
                            progress=lambda message: click.echo(f"report: {message}", err=True))
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"report: {path}; comparison: {Path(out_dir) / 'comparison.md'}")


@main.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="YAML train config.")
@click.option("--model", help="Registry model name.")
@click.option("--data", help="Manifest with a source column.")
@click.option("--epochs", type=int)
@click.option("--crop-segmenter", help="Train and test on the lung boxes of this segmenter (config key lung_crop).")
@click.option("--hold-out", "sources", multiple=True, help="A manifest source to hold out (repeatable; default: each in turn).")
@click.option("--reuse", is_flag=True, help="Audit folds already trained in OUT again instead of training them.")
@click.option("--ood-refer-rate", "ood_refer_rates", type=float, multiple=True, default=(OOD_REFER_RATE,),
              help="Share of each fold's val the OOD threshold refers (repeat for several: one row each).")
@click.option("--target-sensitivity", "target_sensitivities", type=float, multiple=True,
              default=(TARGET_SENSITIVITY,),
              help="COVID sensitivity the low-confidence threshold is set for on each fold's val (repeatable).")
@click.option("--ensemble-of", "members", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="An earlier loso OUT (repeatable): audit, per fold, the ensemble of their fold models "
                   "(cxrscreen ensemble) instead of training.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False))
def loso(config_path, model, data, epochs, crop_segmenter, sources, reuse, ood_refer_rates, target_sensitivities,
         members, out_dir):
    """Leave-one-source-out: train without each source, test on it (writes loso.parquet)."""
    from cxrscreen.config import load_config
    from cxrscreen.evaluate.source_shift import leave_one_source_out
    from cxrscreen.train import TrainConfig

    rates = tuple(dict.fromkeys(ood_refer_rates))  # each once, in the order given
    if reuse and members:
        raise click.UsageError("--reuse and --ensemble-of: give one (an ensemble's folds are combined, never trained)")
    if not all(0 < r < 1 for r in rates):
        raise click.UsageError("--ood-refer-rate: each rate must be between 0 and 1")
    if not all(0 < t <= 1 for t in target_sensitivities):
        raise click.UsageError("--target-sensitivity: each target must be in (0, 1]")
    cfg = load_config(TrainConfig, config_path, model=model, data=data, epochs=epochs, lung_crop=crop_segmenter)
    df = leave_one_source_out(cfg, out_dir, list(sources) or None, progress=click.echo, reuse=reuse,
                              ood_refer_rates=rates, members=list(members) or None,
                              target_sensitivities=tuple(dict.fromkeys(target_sensitivities)))
    click.echo(str(df))


@main.command()
@click.argument("member_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the ensemble checkpoint.")
def ensemble(member_dirs, out_dir):
    """Combine trained classifiers of one architecture into one ensemble checkpoint
    (mean log-probability); run `evaluate` on it to calibrate it on val."""
    from cxrscreen.models.ensemble import combine_checkpoints

    click.echo(f"wrote {combine_checkpoints(list(member_dirs), out_dir)}")


@main.command("adapt-segmenter")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the adapted U-Net.")
@click.option("--data", help="Segmentation manifest (default: the model's training data).")
@click.option("--steps", default=40, type=int)
@click.option("--lr", default=1e-4, type=float)
@click.option("--batch-size", default=8, type=int)
def adapt_segmenter(model_dir, out_dir, data, steps, lr, batch_size):
    """Fine-tune a U-Net on the expert masks, with a leave-one-out Dice estimate."""
    from cxrscreen.train.adapt import adapt_segmenter as run

    run(model_dir, out_dir, steps=steps, lr=lr, batch_size=batch_size, data=data, progress=click.echo)


@main.command("model-card")
@click.argument("classifier_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--segmenter", "segmenters", multiple=True,
              help="Shipped weights (unet-lungs, unet-lungs-fast) or a checkpoint folder: a section each (repeatable).")
@click.option("--comparison", type=click.Path(exists=True, dir_okay=False), help="A report's comparison.parquet.")
@click.option("--loso", multiple=True, type=click.Path(exists=True, dir_okay=False), help="loso.parquet files.")
@click.option("--study", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Shortcut-study loso.parquet files (recipe = folder name); the card leads with them.")
@click.option("-o", "--out", "out_path", default="MODEL_CARD.md", type=click.Path(dir_okay=False))
def model_card(classifier_dir, segmenters, comparison, loso, study, out_path):
    """Render MODEL_CARD.md from evaluated checkpoints (run `evaluate` on them first)."""
    from cxrscreen.evaluate.card import render_model_card
    from cxrscreen.models.checkpoint import checkpoint_path

    segmenter_dirs = [checkpoint_path(s) for s in segmenters]
    missing = [s for s, d in zip(segmenters, segmenter_dirs) if not (d / "model.json").exists()]
    if missing:
        raise click.UsageError(f"--segmenter {missing[0]!r}: neither a checkpoint folder nor shipped weights")
    Path(out_path).write_text(render_model_card(classifier_dir, segmenter_dirs, comparison, list(loso),
                                                list(study)))
    click.echo(f"wrote {out_path}")


def _require_report_extra() -> None:
    """Fail at once, in one line, where the ``report`` extra is missing (not minutes into a run)."""
    from cxrscreen.extras import require

    try:
        require("matplotlib"), require("sklearn")
    except ImportError as e:
        raise click.ClickException(str(e)) from None


def _write_table(df, path: str) -> None:
    if str(path).endswith((".parquet", ".pq")):
        df.write_parquet(path)
    else:
        df.write_csv(path)


if __name__ == "__main__":
    main()
