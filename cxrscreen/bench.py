"""Throughput benchmarks, all on the same inputs and cores, written to Parquet.

Modes: (a) decode+preprocess only, (b) model forward only on pre-decoded tensors, (c) the
full ``score`` pipeline on Ray, (d) a plain PyTorch DataLoader loop doing the same work,
(e) a per-file loop as the papers' notebooks do (open, preprocess, predict one image).
Also: model forward per runtime and precision (what ``--runtime auto`` picks from), and the
agreement of the configured runtime/precision with the torch fp32 reference.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cxrscreen.io.sources import InputItem, list_inputs
from cxrscreen.pipeline.config import ScoreConfig
from cxrscreen.io.batch import decode_items
from cxrscreen.pipeline.stages import Classifier, Segmenter


def prepare_inputs(source: str, n: int, work_dir: Path, shared: Path | None = None) -> Path:
    """A folder of ``n`` inputs: 'phantoms' (generated), 'cxr' or 'fullres' (../shared/data,
    replicated by symlink to reach ``n``)."""
    out = work_dir / f"inputs-{source}-{n}"
    if out.exists():
        return out
    if source == "phantoms":
        from cxrscreen.data.synth import write_archive

        write_archive(work_dir / f"phantoms-{n}", n, seed=0, size=512, formats=("png", "jpeg", "dicom"))
        (work_dir / f"phantoms-{n}" / "images").rename(out)
        return out
    if shared is None or not (shared / source).exists():
        raise FileNotFoundError(f"{source}: ../shared/data/{source} is not present")
    files = sorted(p for p in (shared / source).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    out.mkdir(parents=True)
    for i in range(n):
        src = files[i % len(files)]
        (out / f"{i:06d}{src.suffix}").symlink_to(src.resolve())
    return out


def _decode_chunk(args):
    items, work_size = args
    return len(decode_items(items, work_size)["key"])


def bench_decode(items: list[InputItem], cfg: ScoreConfig, cpus: int) -> float:
    """(a) images/s of read + decode + resize on ``cpus`` processes."""
    chunks = [(items[i:i + 32], cfg.work_size) for i in range(0, len(items), 32)]
    with ProcessPoolExecutor(cpus) as pool:
        list(pool.map(_decode_chunk, chunks[:cpus]))  # warm the workers
        t0 = time.perf_counter()
        n = sum(pool.map(_decode_chunk, chunks))
    return n / (time.perf_counter() - t0)


def _models(cfg: ScoreConfig, threads: int):
    runtime = cfg.runtime_options(threads=threads)
    seg = Segmenter(cfg.segmenter_options(), runtime) if cfg.segmenter else None
    cls = Classifier(cfg.classifier_options(), runtime)
    return seg, cls


def _run_models(batch: dict, seg, cls, times: dict | None = None) -> dict:
    """Segmenter (if any) then classifier; ``times["segment"]`` accumulates the segmenter's
    seconds (it returns host arrays, so its time ends when it returns)."""
    batch = dict(batch)
    if seg is not None:
        t = time.perf_counter()
        batch = seg(batch)
        if times is not None:
            times["segment"] += time.perf_counter() - t
    return cls(batch)


class GpuSampler:
    """GPU utilisation (%) and memory (MiB) sampled by ``nvidia-smi`` every ``interval_ms``
    while the block runs; ``summary()`` is empty where there is no NVIDIA GPU."""

    def __init__(self, interval_ms: int = 100, enabled: bool | None = None):
        self.enabled = (torch.cuda.is_available() and shutil.which("nvidia-smi") is not None) \
            if enabled is None else enabled
        self.interval_ms, self.samples, self._proc = interval_ms, [], None

    def __enter__(self):
        if self.enabled:
            import subprocess

            gpu = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 "-lms", str(self.interval_ms), "-i", gpu], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            out, _ = self._proc.communicate(timeout=10)
            for line in out.splitlines():
                try:
                    util, mem = (float(v) for v in line.split(","))
                except ValueError:  # a partial last line or "[N/A]"
                    continue
                self.samples.append((util, mem))

    def summary(self) -> dict:
        if not self.samples:
            return {}
        util, mem = np.array(self.samples).T
        return {"gpu_util_mean": float(util.mean()), "gpu_util_max": float(util.max()),
                "gpu_mem_mib_max": float(mem.max()), "gpu_samples": len(util)}


def bench_models(items: list[InputItem], cfg: ScoreConfig, cpus: int) -> tuple[float, dict]:
    """(b) images/s of segmentation + classification on pre-decoded uint8 images, or with
    ``cfg.decode_jpeg_on_device`` from JPEG bytes in memory decoded by the model actor; also
    where the time goes (share of the segmentation stage) and, on a GPU, its utilisation."""
    seg, cls = _models(cfg, cpus)
    if cfg.decode_jpeg_on_device:  # bytes in memory: the timed part decodes them
        items = [InputItem(it.key, data=Path(it.path).read_bytes()) if it.path else it for it in items]
    chunks = [items[i:i + cfg.batch_size] for i in range(0, len(items), cfg.batch_size)]
    decoded = None if cfg.decode_jpeg_on_device else [decode_items(c, cfg.work_size) for c in chunks]
    times = {"segment": 0.0}

    def run(i):
        b = decoded[i] if decoded else decode_items(chunks[i], cfg.work_size, defer_jpeg=True)
        return len(_run_models(b, seg, cls, times)["key"])

    run(0)  # warm-up (also captures CUDA graphs, builds engines)
    times["segment"] = 0.0
    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        n = sum(run(i) for i in range(len(chunks)))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    return n / elapsed, {"segment_time_share": times["segment"] / elapsed, **gpu.summary()}


def runtime_grid(cuda: bool, batch_sizes: tuple[int, ...]) -> list[dict]:
    """Model-forward settings compared by ``run_bench`` (what ``--runtime auto`` chooses from)."""
    if not cuda:
        return [dict(runtime=rt, precision=p, batch_size=batch_sizes[0])
                for rt, p in (("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"))]
    import importlib.util

    grid = [dict(runtime="torch", precision=p, cuda_graphs=g, batch_size=bs)
            for bs in batch_sizes for p in ("fp32", "fp16") for g in (False, True)]
    if importlib.util.find_spec("tensorrt"):
        grid += [dict(runtime="tensorrt", precision="fp16", batch_size=bs) for bs in batch_sizes]
    return grid


def bench_pipeline(archive: Path, cfg: ScoreConfig) -> tuple[float, float]:
    """(c) images/s of the full Ray pipeline: overall (actor start-up included; Ray itself
    already running) and steady-state (after the first result)."""
    from cxrscreen.pipeline.score import score_archive

    out = Path(tempfile.mkdtemp(prefix="cxrbench-"))
    try:
        s = score_archive(archive, out, cfg, progress=False)
        return s.images_per_s, s.steady_images_per_s
    finally:
        shutil.rmtree(out, ignore_errors=True)


class _DecodeDataset(torch.utils.data.Dataset):
    def __init__(self, items, work_size):
        self.items, self.work_size = items, work_size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {k: v[0] for k, v in decode_items([self.items[i]], self.work_size).items()}


def _collate(rows):
    return {k: np.stack([r[k] for r in rows]) if k == "image" else np.array([r[k] for r in rows], object)
            for k in rows[0]}


def bench_dataloader(items: list[InputItem], cfg: ScoreConfig, cpus: int) -> float:
    """(d) images/s of a DataLoader (cpus-1 decode workers) feeding the models in the main process."""
    seg, cls = _models(cfg, cpus)
    loader = torch.utils.data.DataLoader(_DecodeDataset(items, cfg.work_size), batch_size=cfg.batch_size,
                                         num_workers=max(1, cpus - 1), collate_fn=_collate)
    t0 = time.perf_counter()
    n = 0
    for batch in loader:
        batch["status"] = batch["status"].astype(object)
        n += len(_run_models(batch, seg, cls)["key"])
    return n / (time.perf_counter() - t0)


def bench_per_file(items: list[InputItem], cfg: ScoreConfig, cpus: int) -> float:
    """(e) images/s of the notebook loop: one file at a time, batch size 1, fp32 (the
    papers' Keras notebooks call ``model.predict`` per image in full precision)."""
    seg, cls = _models(replace(cfg, precision="fp32", runtime="torch"), cpus)
    t0 = time.perf_counter()
    for it in items:
        _run_models(decode_items([it], cfg.work_size), seg, cls)
    return len(items) / (time.perf_counter() - t0)


def agreement(items: list[InputItem], cfg: ScoreConfig, cpus: int) -> dict:
    """Max |p - p_ref|, label agreement and lung-mask Dice of ``cfg``'s runtime and precision
    against the torch fp32 reference, on the same inputs."""
    from cxrscreen.masks import decode_mask_png, dice

    out = {}
    for tag, c in (("ref", replace(cfg, precision="fp32", runtime="torch")), ("cfg", cfg)):
        torch.manual_seed(0)  # registry names: the same random init for both
        seg, cls = _models(c, cpus)
        rows = [_run_models(decode_items(items[i:i + cfg.batch_size], cfg.work_size), seg, cls)
                for i in range(0, len(items), cfg.batch_size)]
        probs = np.concatenate([np.stack([r[f"prob_{k}"] for k in cls.classes], 1) for r in rows])
        masks = [m for r in rows for m in r.get("lung_mask_png", [None] * len(r["key"]))]
        out[tag] = (probs, masks, f"{cls.runner.runtime.name}-{cls.runner.runtime.precision}")
    (a, ma, _), (b, mb, name) = out["ref"], out["cfg"]
    ok = ~np.isnan(a).any(1)
    dices = [dice(decode_mask_png(x), decode_mask_png(y)) for x, y in zip(ma, mb) if x is not None and y is not None]
    return {"compared": name, "max_abs_prob_diff": float(np.abs(a[ok] - b[ok]).max()),
            "label_agreement": float((a[ok].argmax(1) == b[ok].argmax(1)).mean()),
            "min_mask_dice": float(min(dices)) if dices else float("nan")}


def machine_info() -> dict:
    import importlib.metadata

    import pyarrow

    try:
        ray_version = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        ray_version = ""
    return {"cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "",
            "torch": torch.__version__, "ray": ray_version, "pyarrow": pyarrow.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M")}


def run_bench(source: str = "phantoms", n: int = 256, cfg: ScoreConfig = ScoreConfig(),
              actors: tuple[int, ...] = (1,), batch_sizes: tuple[int, ...] = (16,),
              per_file_n: int = 64, out: Path | None = None, shared: Path | None = None,
              work_dir: Path | None = None, echo=print, use_ray: bool = True):
    """Run every mode, return a polars DataFrame (and write it to ``out`` as Parquet).
    Without ``use_ray`` (a GPU machine that has no ray) the Ray pipeline mode is skipped."""
    import polars as pl

    work = Path(work_dir or tempfile.mkdtemp(prefix="cxrbench-inputs-"))
    archive = prepare_inputs(source, n, work, shared)
    items = list(list_inputs(archive))
    cpus = cfg.num_cpus or os.cpu_count() or 1
    if use_ray:
        from cxrscreen.cluster import init_ray

        init_ray(cfg.address, cpus)
    info = machine_info()
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    rows = []

    def record(mode, ips, **kw):
        row = dict(source=source, n=n, mode=mode, images_per_s=ips, classifier=cfg.classifier,
                   segmenter=cfg.segmenter, runtime=cfg.runtime, precision=cfg.precision, batch_size=cfg.batch_size,
                   actors=cfg.cls_actors, **info)
        row.update(kw)
        rows.append(row)
        echo(f"{mode:<28} bs={row['batch_size']:<3} actors={row['actors']} {ips:8.1f} img/s")

    record("a_decode_preprocess", bench_decode(items, cfg, cpus))
    for setting in runtime_grid(cuda, batch_sizes):
        ips, extra = bench_models(items, replace(cfg, **setting), cpus)
        record("b_model_forward_runtime", ips, **setting, **extra)
    jpegs = [it for it in items if str(it.path or "").lower().endswith((".jpg", ".jpeg"))]
    if jpegs:
        ips, extra = bench_models(jpegs, replace(cfg, decode_jpeg_on_device=True), cpus)
        record("b_jpeg_bytes_decoded_by_actor", ips, n=len(jpegs), **extra)
    for bs in batch_sizes:
        c = replace(cfg, batch_size=bs)
        ips, extra = bench_models(items, c, cpus)
        record("b_model_forward", ips, batch_size=bs, **extra)
        for a in actors if use_ray else ():
            overall, steady = bench_pipeline(archive, replace(c, cls_actors=a, seg_actors=a))
            record("c_pipeline", overall, batch_size=bs, actors=a)
            record("c_pipeline_steady", steady, batch_size=bs, actors=a)
        record("d_dataloader", bench_dataloader(items, c, cpus), batch_size=bs)
    record("e_per_file", bench_per_file(items[:per_file_n], cfg, cpus), batch_size=1)
    df = pl.DataFrame(rows, infer_schema_length=None)
    agree = agreement(items[:64], cfg, cpus)
    df = df.with_columns(**{k: pl.lit(v) for k, v in agree.items()})
    echo(f"{agree['compared']} vs torch fp32: {agree}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        df.write_parquet(out)
    return df


CEILING_INPUTS = ("parquet", "parquet_png", "png", "jpeg", "dicom")


def ceiling_inputs(source: str, n: int, work: Path, shared: Path | None = None,
                   inputs: tuple[str, ...] = CEILING_INPUTS) -> dict[str, Path]:
    """Archives of ``n`` inputs by kind for the ceiling benchmark: PNG / JPEG / DICOM folders
    (phantoms: generated at 256 px; cxr: its 224 px PNGs; fullres: its JPEGs), and the PNG or
    JPEG folder ingested at 256 px (``cxrscreen ingest --resize 256``) as pre-decoded Parquet
    (``parquet``: ``--pixels pgm``, raw pixels) and as PNG in Parquet (``parquet_png``)."""
    from cxrscreen.data.ingest import ingest
    from cxrscreen.data.synth import write_archive

    folders: dict[str, Path] = {}
    if source == "phantoms":
        for kind in ("png", "jpeg", "dicom"):
            folder = work / f"ceiling-{kind}-{n}"
            if not folder.exists():
                write_archive(folder, n, seed=1, size=256, formats=(kind,))
            folders[kind] = folder / "images"
    else:
        folders["png" if source == "cxr" else "jpeg"] = prepare_inputs(source, n, work, shared)
    out = {kind: path for kind, path in folders.items() if kind in inputs}
    first = folders.get("png") or folders["jpeg"]
    for kind, pixels in (("parquet", "pgm"), ("parquet_png", "png")):
        if kind not in inputs:
            continue
        out[kind] = parquet = work / f"ceiling-parquet-{pixels}-{source}-{n}"  # named by content: a reused work_dir stays right
        if not parquet.exists():
            import polars as pl

            files = sorted(p for p in first.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
            ingest(pl.DataFrame({"file": [str(f) for f in files], "path": [str(f.relative_to(first)) for f in files],
                                 "label": ["unknown"] * len(files)}), parquet, resize=256, progress=False, pixels=pixels)
    return {kind: out[kind] for kind in CEILING_INPUTS if kind in out}


def run_ceiling(source: str = "phantoms", n: int = 256, cfg: ScoreConfig = ScoreConfig(),
                cores: tuple[int, ...] = (1, 2), out: Path | None = None, shared: Path | None = None,
                work_dir: Path | None = None, echo=print, inputs: tuple[str, ...] = CEILING_INPUTS):
    """The pipeline's ceiling: the real ``score`` pipeline on Ray (same stages, same output) with
    zero-cost models (``runtime="replay"``: each model's output for the first image, replayed),
    per input kind (``CEILING_INPUTS``; those of ``inputs`` the source has) and number of cores. Rows: ``mode="ceiling"``, ``input``, ``cores``,
    ``images_per_s`` (overall and steady), ``images_per_s_per_core`` (steady / cores), the
    stages' milliseconds per image (``ms_decode``, ``ms_segment``, ``ms_classify``) and the
    seconds to the first result and to the model actors' first (``first_row_s``, ``steady_from_s``)."""
    import polars as pl
    import ray

    from cxrscreen.cluster import init_ray
    from cxrscreen.pipeline.score import score_archive

    work = Path(work_dir or tempfile.mkdtemp(prefix="cxrbench-ceiling-"))
    archives = ceiling_inputs(source, n, work, shared, inputs)
    info, rows = machine_info(), []
    for kind, archive in archives.items():
        for c in cores:
            ray.shutdown()
            init_ray(cfg.address, c)
            dest = Path(tempfile.mkdtemp(prefix="cxrbench-out-"))
            try:
                s = score_archive(archive, dest, replace(cfg, runtime="replay", num_cpus=c), progress=False)
                t = pl.read_parquet(dest / "part-*.parquet", columns=["t_decode_ms", "t_segment_ms", "t_classify_ms"])
            finally:
                shutil.rmtree(dest, ignore_errors=True)
            rows.append(dict(source=source, n=n, mode="ceiling", input=kind, cores=c, images_per_s=s.images_per_s,
                             images_per_s_steady=s.steady_images_per_s,
                             # None when every row came in the first result (Parquet blocks): no steady state
                             images_per_s_per_core=s.steady_images_per_s / c if s.steady_images_per_s else None,
                             ms_decode=t["t_decode_ms"].mean(), ms_segment=t["t_segment_ms"].mean(),
                             ms_classify=t["t_classify_ms"].mean(), first_row_s=s.first_row_s,
                             steady_from_s=s.steady_from_s, ok=s.ok, classifier=cfg.classifier,
                             segmenter=cfg.segmenter, batch_size=cfg.batch_size, **info))
            echo(f"ceiling {kind:<8} {c} core(s): {s.steady_images_per_s:8.1f} img/s steady "
                 f"({s.steady_images_per_s / c:.1f} per core; 0 = all rows in one burst), {s.images_per_s:.1f} overall")
    ray.shutdown()
    df = pl.DataFrame(rows, infer_schema_length=None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        df.write_parquet(out)
    return df


def ratios(df) -> dict:
    """c/b, c/d, c/e from the best configuration of each mode (none without the pipeline mode),
    and c/ab: the pipeline against a perfect one that decodes as fast as (a) and runs the model
    stages as fast as (b) on the same cores, 1 / (1/a + 1/b). (b) does not decode, so c/b cannot
    exceed a / (a + b) however little Ray and the writes cost; c/ab = 1 would mean they cost nothing."""
    best = {m: df.filter(df["mode"] == m)["images_per_s"].max() for m in df["mode"].unique()}
    out = {}
    for name in ("c_pipeline", "c_pipeline_steady"):
        if name not in best:
            continue
        c, tag = best[name], "" if name == "c_pipeline" else " steady"
        out.update({f"c/b{tag}": c / best["b_model_forward"], f"c/d{tag}": c / best["d_dataloader"],
                    f"c/e{tag}": c / best["e_per_file"],
                    f"c/ab{tag}": c * (1 / best["a_decode_preprocess"] + 1 / best["b_model_forward"])})
    return out
