"""Every GPU path of the model stage, timed in one process (``benchmarks/gpu/run.sh`` runs it).

Sections, each a set of rows of one Parquet file (``section`` column), written after every
section so that a run stopped by its time limit still returns what it measured:

- ``model``: the default segmenter + classifier forward passes alone, on model input already on
  the device, per batch size x precision (fp32 / fp16 / bf16) x CUDA graphs off/on; then
  ``torch.compile`` (fp16, graphs off) at one batch size: the ceiling of the models.
- ``stage``: the pipeline's own ``Segmenter`` + ``Classifier`` actors on pre-decoded uint8 work
  images in host memory (host-device transfers, preprocessing, lung boxes, mask PNGs, OOD
  score, referral included), with the GPU utilisation sampled by nvidia-smi; also from JPEG
  bytes in memory decoded by the segmenter actor (nvJPEG on CUDA); and the fused
  ``SegmentClassify`` actor with 1, 2, 4 and 8 threads (masks cleaned by OpenCV on the host in
  that many threads; until stop 18 one thread meant tensor ops on the device, now removed).
- ``parts``: where a stage's time goes: raw batched ``decode_jpeg`` on the device and on the
  CPU, host-device copy of a uint8 batch, and the segmenter stage's mask post-processing:
  per image with ``lung_regions`` + PIL (as before) and batched (``lung_regions_batch`` + ``mask_pngs``:
  OpenCV on the host in 1, 2, 4, 8 threads, from masks on the device or on the host).
- ``profile``: a ``torch.profiler`` table (``profile.txt``) of the batched mask post-processing
  and one segmenter forward.
- ``cpu``: the CPU-side ceiling: decode + resize of PNG and JPEG files on every core.
- ``agreement``: fp16 and bf16 (graphs on) against fp32 on the same real images: max |dp|,
  label agreement, minimum lung-mask Dice.

Usage: python benchmarks/gpu/bench_gpu.py --device cuda|cpu --data DIR --out DIR [--budget S] [--sections a,b]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cxrscreen.bench import GpuSampler, agreement, bench_decode, machine_info
from cxrscreen.io.batch import decode_items
from cxrscreen.io.sources import InputItem
from cxrscreen.masks import lung_regions, lung_regions_batch, mask_pngs, resize_masks
from cxrscreen.pipeline.config import ScoreConfig
from cxrscreen.pipeline.stages import Classifier, SegmentClassify, Segmenter
from cxrscreen.predict import ModelRunner
from cxrscreen.preprocess import to_model_input


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device: str, reps: int, warm: int = 2) -> float:
    """Median wall seconds of ``fn()`` (device synchronised), after ``warm`` untimed calls."""
    for _ in range(warm):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Run:
    """Rows, the time budget and the log of one run; ``save()`` rewrites the Parquet file."""

    def __init__(self, out: Path, budget_s: float, device: str):
        self.out, self.deadline, self.device = out, time.monotonic() + budget_s, device
        self.rows: list[dict] = []
        self.info = machine_info()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, section: str, name: str, **values) -> None:
        import cv2  # its per-call thread count is process-wide: recorded with every row

        row = {"section": section, "name": name, "device": self.device, **values, **self.info,
               "opencv_threads": cv2.getNumThreads()}
        self.rows.append(row)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in values.items()}
        print(f"{section:9s} {name:32s} {shown}", flush=True)

    def save(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        pq.write_table(pa.Table.from_pylist(self.rows, pa.schema(
            [(k, _arrow_type(self.rows, k)) for k in keys])), self.out / "gpu_bench.parquet")


def _arrow_type(rows: list[dict], key: str):
    import pyarrow as pa

    vals = [r[key] for r in rows if r.get(key) is not None]
    if vals and all(isinstance(v, bool) for v in vals):
        return pa.bool_()
    if vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        return pa.float64()
    return pa.string()


def work_images(files: list[Path], n: int) -> np.ndarray:
    """``n`` uint8 work images (the pipeline's decode), the decodable files repeated."""
    b = decode_items([InputItem(f.name, str(f)) for f in files])
    images = b["image"][b["status"] == "ok"]
    return images[np.arange(n) % len(images)]


def model_section(run: Run, cfg: ScoreConfig, images: np.ndarray, batch_sizes, precisions, reps: int) -> None:
    """Forward passes alone (input already on the device) of the segmenter and the classifier."""
    grid = [(p, g, False) for p in precisions for g in ((False, True) if run.device == "cuda" else (False,))]
    compile_grid = [("fp16" if run.device == "cuda" else "bf16", False, True)]
    for precision, graphs, compiled in grid + compile_grid:
        sizes = batch_sizes if not compiled else batch_sizes[len(batch_sizes) // 2:][:1]
        if run.left() < (120 if compiled else 20):
            run.add("model", "skipped", reason=f"time budget: {precision} graphs={graphs} compile={compiled}")
            continue
        t_build = time.perf_counter()
        opts = dict(device=run.device, precision=precision, runtime="torch", cuda_graphs=graphs, compile=compiled)
        seg = ModelRunner(cfg.segmenter, "segment", **opts)
        cls = ModelRunner(cfg.classifier, "classify", **opts)
        for bs in sizes:
            x = torch.from_numpy(images[:bs]).to(run.device)
            xs = to_model_input(x, seg.info.input_size, seg.info.in_channels, seg.info.intensity)
            xc = to_model_input(x, cls.info.input_size, cls.info.in_channels, cls.info.intensity)
            t_seg = median_seconds(lambda: seg.runtime(xs), run.device, reps)
            t_cls = median_seconds(lambda: cls.runtime(xc), run.device, reps)
            run.add("model", "segmenter+classifier forward", batch_size=bs, precision=precision, cuda_graphs=graphs,
                    compile=compiled, images_per_s=bs / (t_seg + t_cls), segmenter_images_per_s=bs / t_seg,
                    classifier_images_per_s=bs / t_cls, segmenter=cfg.segmenter, classifier=cfg.classifier,
                    segmenter_px=seg.info.input_size, classifier_px=cls.info.input_size,
                    setup_s=time.perf_counter() - t_build)
        run.save()


def _stage_batches(images: np.ndarray, bs: int) -> list[dict]:
    n = len(images)
    return [{"key": np.array([f"k{i}" for i in range(j, min(j + bs, n))], object),
             "image": images[j:j + bs].copy(), "status": np.array(["ok"] * len(images[j:j + bs]), object),
             "error_type": np.full(len(images[j:j + bs]), None, object),
             "error_message": np.full(len(images[j:j + bs]), None, object),
             "polarity": np.full(len(images[j:j + bs]), 0.5, np.float32)} for j in range(0, n, bs)]


def _time_stages(seg: Segmenter, cls: Classifier, make_batches, device: str) -> tuple[float, float, int, dict]:
    """Seconds in the segmenter stage, in the classifier stage, images, and nvidia-smi samples,
    over every batch of ``make_batches()`` (one warm-up pass first)."""
    for b in make_batches()[:1]:
        cls(seg(b))
    sync(device)
    t_seg = t_cls = 0.0
    n = 0
    with GpuSampler() as gpu:
        for b in make_batches():
            t0 = time.perf_counter()
            b = seg(b)
            sync(device)
            t1 = time.perf_counter()
            b = cls(b)
            sync(device)
            t_seg, t_cls, n = t_seg + t1 - t0, t_cls + time.perf_counter() - t1, n + int((b["status"] == "ok").sum())
    return t_seg, t_cls, n, gpu.summary()


def _time_actor(actor, make_batches, device: str) -> tuple[float, int, dict]:
    """Seconds in one actor's ``__call__`` and images, over every batch (one warm-up pass first)."""
    for b in make_batches()[:1]:
        actor(b)
    sync(device)
    t, n = 0.0, 0
    with GpuSampler() as gpu:
        for b in make_batches():
            t0 = time.perf_counter()
            b = actor(b)
            sync(device)
            t, n = t + time.perf_counter() - t0, n + int((b["status"] == "ok").sum())
    return t, n, gpu.summary()


def stage_section(run: Run, cfg: ScoreConfig, images: np.ndarray, jpeg_files: list[Path], batch_sizes) -> None:
    """The pipeline's actors on pre-decoded images and on JPEG bytes (decoded by the segmenter actor)."""
    precision = "fp16" if run.device == "cuda" else "bf16"
    c = replace(cfg, device=run.device, precision=precision, runtime="torch", cuda_graphs=run.device == "cuda")
    seg = Segmenter(c.segmenter_options(), c.runtime_options())
    cls = Classifier(c.classifier_options(), c.runtime_options())
    for bs in batch_sizes:
        if run.left() < 20:
            run.add("stage", "skipped", reason=f"time budget: batch {bs}")
            continue
        t_seg, t_cls, n, gpu = _time_stages(seg, cls, lambda: _stage_batches(images, bs), run.device)
        run.add("stage", "Segmenter+Classifier pre-decoded", batch_size=bs, precision=precision, cuda_graphs=c.cuda_graphs,
                images_per_s=n / (t_seg + t_cls), segment_stage_share=t_seg / (t_seg + t_cls), images=n, **gpu)
    bs = batch_sizes[-1]
    for threads in (1, 2, 4, 8):  # the fused actor (the GPU default); masks cleaned by OpenCV in that many threads
        if run.left() < 20:
            break
        fused = SegmentClassify(c.segmenter_options(), c.classifier_options(), c.runtime_options(threads=threads))
        t, n, gpu = _time_actor(fused, lambda: _stage_batches(images, bs), run.device)
        run.add("stage", "SegmentClassify (fused) pre-decoded", batch_size=bs, precision=precision, threads=threads,
                cuda_graphs=c.cuda_graphs, images_per_s=n / t, images=n,
                note=f"masks: OpenCV on the host, {threads} threads", **gpu)
    data = [f.read_bytes() for f in jpeg_files]
    items = [InputItem(f"j{i}", data=data[i % len(data)]) for i in range(max(len(images), bs))]
    if jpeg_files and run.left() > 20:
        batches = lambda: [decode_items(items[j:j + bs], cfg.work_size, defer_jpeg=True)  # noqa: E731
                           for j in range(0, len(items), bs)]
        t_seg, t_cls, n, gpu = _time_stages(seg, cls, batches, run.device)
        run.add("stage", "Segmenter+Classifier from JPEG bytes", batch_size=bs, precision=precision,
                cuda_graphs=c.cuda_graphs, images_per_s=n / (t_seg + t_cls), segment_stage_share=t_seg / (t_seg + t_cls),
                images=n, note="host: read header only; decode_jpeg on the actor's device", **gpu)
    run.save()


def _post_process_per_image(probs: np.ndarray) -> int:
    """The segmenter stage's post-processing before it was batched: ``lung_regions`` + PIL per image."""
    from PIL import Image
    import io

    for p in probs:
        buf = io.BytesIO()
        Image.fromarray(lung_regions(p > 0.5).mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return len(probs)


def parts_section(run: Run, cfg: ScoreConfig, images: np.ndarray, jpeg_files: list[Path], reps: int) -> None:
    """Where a stage's time goes: decode_jpeg on device/CPU, host->device copy, host post-processing."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in jpeg_files]
    bs = min(len(images), 256)
    if data:
        enc = [data[i % len(data)] for i in range(bs)]
        for dev in dict.fromkeys((run.device, "cpu")):
            t = median_seconds(lambda: decode_jpeg(enc, mode=ImageReadMode.GRAY, device=dev), run.device, reps)
            run.add("parts", f"decode_jpeg batched on {dev}", batch_size=bs, images_per_s=bs / t,
                    threads=torch.get_num_threads())
    if run.device == "cuda":
        host = torch.from_numpy(images[:bs]).pin_memory()
        t = median_seconds(lambda: host.to("cuda", non_blocking=True), run.device, reps)
        run.add("parts", "host->device copy, uint8 work images", batch_size=bs, images_per_s=bs / t,
                gb_per_s=host.numel() / t / 1e9)
    seg = ModelRunner(cfg.segmenter, "segment", device=run.device, runtime="torch")
    probs = seg.segment_probs(images[:bs])
    t = median_seconds(lambda: _post_process_per_image(probs[:64].cpu().numpy()), "cpu", max(2, reps // 4), warm=1)
    run.add("parts", "mask post-processing per image (before)", images_per_s=64 / t,
            note="lung_regions per image + PIL 8-bit PNG, one core")
    for where, workers in dict.fromkeys(((run.device, 1), ("cpu", 1), (run.device, 2), (run.device, 4),
                                          (run.device, 8))):
        p = probs.to(where)
        t = median_seconds(lambda: mask_pngs(resize_masks(lung_regions_batch(p > 0.5, workers).masks, 256).cpu().numpy(),
                                             workers=workers), run.device, max(2, reps // 4), warm=1)
        run.add("parts", f"mask post-processing from {where}, {workers} threads", batch_size=bs, images_per_s=bs / t,
                threads=workers, note="lung_regions_batch + 1-bit mask_pngs: OpenCV on the host")
    run.save()


def profile_section(run: Run, cfg: ScoreConfig, images: np.ndarray) -> None:
    """``torch.profiler`` table of one batched mask post-processing call (the GPU actors' cap in
    the 2026-11-27 run) and one segmenter forward, written to ``profile.txt``."""
    from torch.profiler import ProfilerActivity, profile

    seg = ModelRunner(cfg.segmenter, "segment", device=run.device, runtime="torch")
    bs = min(len(images), 256)
    masks = seg.segment_probs(images[:bs]) > 0.5
    lung_regions_batch(masks)  # warm-up
    sync(run.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.device == "cuda" else [])
    with profile(activities=activities) as prof:
        lung_regions_batch(masks)
        sync(run.device)
        seg.segment_probs(images[:bs])
        sync(run.device)
    try:
        table = prof.key_averages().table(sort_by="device_time_total" if run.device == "cuda" else "cpu_time_total",
                                          row_limit=30)
    except (KeyError, AttributeError, ValueError):  # older names of the sort key
        table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=30)
    (run.out / "profile.txt").write_text(table)
    run.add("profile", "lung_regions_batch + segmenter forward", batch_size=bs, note="profile.txt")


def cpu_section(run: Run, cfg: ScoreConfig, files: dict[str, list[Path]], n: int, cpus: int) -> None:
    """Decode + resize to work images on every core: the CPU side's ceiling."""
    for fmt, fs in files.items():
        if fs and run.left() > 15:
            items = [InputItem(f"{i}", str(fs[i % len(fs)])) for i in range(max(n, 32 * cpus * 2))]
            run.add("cpu", f"decode+resize {fmt}, {cpus} processes", images_per_s=bench_decode(items, cfg, cpus),
                    images=len(items))
    run.save()


def agreement_section(run: Run, cfg: ScoreConfig, files: list[Path]) -> None:
    items = [InputItem(f.name, str(f)) for f in files]
    for precision in (("fp16", "bf16") if run.device == "cuda" else ("bf16",)):
        if run.left() < 15:
            break
        c = replace(cfg, device=run.device, precision=precision, runtime="torch", cuda_graphs=run.device == "cuda",
                    batch_size=32)
        run.add("agreement", f"{precision} vs fp32", images=len(items), **agreement(items, c, 1))
    run.save()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--data", required=True, help="folder with png/ and jpeg/ (benchmarks/gpu/prepare_data.py)")
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, default=240, help="seconds; later sections are skipped past it")
    p.add_argument("--batch-sizes", default="32,128,256,512")
    p.add_argument("--n", type=int, default=2048, help="images per stage timing")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--sections", default="model,stage,parts,profile,cpu,agreement")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    run, cfg = Run(out, a.budget, a.device), ScoreConfig()
    sizes = [int(s) for s in a.batch_sizes.split(",")]
    data = Path(a.data)
    files = {fmt: sorted((data / fmt).glob("*")) for fmt in ("png", "jpeg")}
    cpus = os.cpu_count() or 1
    images = work_images(files["png"], max(a.n, max(sizes)))
    precisions = ("fp32", "fp16", "bf16") if a.device == "cuda" else ("fp32", "bf16")
    run.add("run", "start", gpu=run.info["gpu"], cpus=cpus, images=len(images), budget_s=a.budget)
    sections = a.sections.split(",")
    if "model" in sections:
        model_section(run, cfg, images, sizes, precisions, a.reps)
    if "stage" in sections:
        stage_section(run, cfg, images, files["jpeg"], sizes[1:] or sizes)
    if "parts" in sections:
        parts_section(run, cfg, images, files["jpeg"], a.reps)
    if "profile" in sections and run.left() > 20:
        profile_section(run, cfg, images)
    if "cpu" in sections:
        cpu_section(run, cfg, files, a.n, cpus)
    if "agreement" in sections:
        agreement_section(run, cfg, files["png"][:96])
    run.add("run", "end", seconds_left=run.left())
    run.save()


if __name__ == "__main__":
    main()
