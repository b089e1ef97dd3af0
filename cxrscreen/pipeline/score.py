"""Score an archive: Ray Data streams inputs (listed by read tasks, ``listing``) through decode
tasks and a model actor pool (segmenter and classifier fused in one actor; or two pools), while
the driver scores the first batch itself with the same stages; the driver (one node) or write
tasks on the workers (a cluster) write atomic Parquet part files; an interrupted run resumes."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxrscreen.io.errors import ArchiveError
from cxrscreen.io.sources import (InputItem, archive_kind, estimated_lines, folder_items, list_file_items, list_inputs,
                                  parquet_files)
from cxrscreen.cluster import init_ray
from cxrscreen.pipeline.config import ScoreConfig
from cxrscreen.pipeline.listing import (archive_datasource, input_key_chunks, parquet_head_items, parquet_keys,
                                        pending_items, pending_rows, without_keys)
from cxrscreen.pipeline.output import (OutputLock, PartWriter, ResumeIndex, check_phi_columns, drop_repeats,
                                       drop_superseded, key_array, key_hashes, new_run_id, output_index, run_counts,
                                       write_rows)
from cxrscreen.io.batch import decode_batch, decode_items

if TYPE_CHECKING:  # torch and the models load in the model check's thread while Ray starts, not here
    from cxrscreen.pipeline.stages import Classifier, Segmenter


@dataclass
class ScoreSummary:
    inputs: int = 0  # inputs found in the archive
    skipped: int = 0  # inputs not scored by this run: in OUT from an earlier run with the same content
    ok: int = 0
    errors: Counter = field(default_factory=Counter)  # error type -> count
    seconds: float = 0.0
    missing: list = field(default_factory=list)  # input keys without an output row (should be empty)
    arrived: int = 0  # inputs of a streamed archive that appeared after their part was listed (next run scores them)
    first_row_s: float = 0.0  # start-up: seconds until the first result arrived (the driver's own batch, if any)
    first_rows: int = 0  # rows of that first result
    steady_from_s: float = 0.0  # seconds until the model actors' first result (the steady rate is counted after it)
    steady_from_rows: int = 0  # rows finished by then (not counted in the steady rate)
    referred: Counter = field(default_factory=Counter)  # refer_reason code -> rows
    labels: Counter = field(default_factory=Counter)  # predicted label -> rows
    drift: str = ""  # one line when the archive differs from the training data (drift_warning)
    rows: int = 0  # rows in OUT after the run
    stale: int = 0  # rows in OUT whose input is no longer in the archive (kept unless prune)
    pruned: int = 0  # such rows removed by prune
    repeated: int = 0  # entries of the archive that list an input listed before (one row each input)

    def add(self, counts: dict) -> None:
        """Add one part file's counts (``cxrscreen.pipeline.output.row_counts``)."""
        self.ok += counts["ok"]
        self.errors.update(counts["errors"])
        self.referred.update(counts["referred"])
        self.labels.update(counts["labels"])

    def recount(self, counts: dict) -> None:
        """The run's counts as its rows stand in OUT at the end (``output.run_counts``)."""
        self.ok, self.errors, self.referred, self.labels = 0, Counter(), Counter(), Counter()
        self.add(counts)

    @property
    def steady_images_per_s(self) -> float:
        """Throughput after start-up (Ray init, actor and model loading): the rows after the model
        actors' first result, over the time after it (0 when the driver scored every row)."""
        steady = self.scored - self.steady_from_rows
        return steady / max(self.seconds - self.steady_from_s, 1e-9) if steady > 0 and self.steady_from_s else 0.0

    @property
    def scored(self) -> int:
        return self.ok + sum(self.errors.values())

    @property
    def images_per_s(self) -> float:
        return self.scored / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        """The summary as plain JSON-able values (``cxrscreen score --json``)."""
        return {"inputs": self.inputs, "skipped": self.skipped, "ok": self.ok, "errors": dict(self.errors),
                "referred_by_reason": dict(self.referred), "labels": dict(self.labels),
                "rows": self.rows, "stale": self.stale, "pruned": self.pruned, "missing": len(self.missing), "arrived": self.arrived,
                "repeated": self.repeated,
                "seconds": round(self.seconds, 3), "first_row_s": round(self.first_row_s, 3),
                "steady_from_s": round(self.steady_from_s, 3),
                "images_per_s": round(self.images_per_s, 3), "steady_images_per_s": round(self.steady_images_per_s, 3),
                "drift": self.drift or None}

    def __str__(self) -> str:
        errs = ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "none"
        refs = ", ".join(f"{k} {v}" for k, v in self.referred.most_common()) or "none"
        return (f"{self.inputs} inputs" + (f" ({self.repeated} more entries list one of them again: one row each)"
                                           if self.repeated else "") + f": {self.skipped} already done, {self.ok} ok, "
                f"{sum(self.errors.values())} errors ({errs}); referred by reason: {refs}; "
                f"{self.images_per_s:.1f} images/s overall, {self.steady_images_per_s:.1f} steady; "
                f"{self.rows} rows in the output" + (f", {self.stale} of them for inputs no longer in the archive "
                                                     "(kept; --prune removes them)" if self.stale else "")
                + (f"; {self.pruned} rows of removed inputs pruned" if self.pruned else "")
                + (f"; {self.arrived} inputs arrived during the run (run again to score them)" if self.arrived else ""))


def check_models(cfg: ScoreConfig) -> dict:
    """Resolve and load-check every model (and the site profile) in the driver, while Ray starts
    (``_start``): a wrong name or a broken checkpoint fails in seconds with one line (ValueError).
    Returns what the end-of-run drift check needs from the classifier's checkpoint."""
    import cxrscreen.pipeline.stages  # noqa: F401 - the stages' imports (torch, masks) done here, while Ray starts
    from cxrscreen.models import load_model
    from cxrscreen.models.site import SiteProfile

    cls = load_model(cfg.classifier, "classify", allow_untrained=cfg.allow_untrained)
    if cfg.segmenter:
        load_model(cfg.segmenter, "segment", allow_untrained=cfg.allow_untrained)
    elif cfg.lung_crop and not cls.info.lung_crop:
        raise ValueError("lung_crop needs a segmenter (e.g. --segmenter unet-lungs-fast)")
    if cfg.site:
        SiteProfile.load(cfg.site, cls)
    if cfg.ood_threshold is not None and cls.ood is None and not cfg.site:
        raise ValueError(f"ood_threshold given, but {cfg.classifier} has no OOD reference (ood.safetensors): "
                         "run `cxrscreen evaluate` on it first")
    ev = cls.info.evaluation
    return {"ood_refer_rate": cls.info.ood_refer_rate, "train_class_share": ev.get("train_class_share")}


def drift_warning(summary: ScoreSummary, reference: dict, min_rows: int = 50) -> str:
    """One line when the scored archive differs from the classifier's training data: far more
    out-of-distribution rows than the rate the threshold was set for on validation, or a
    predicted class mix far from the training split's (total variation distance > 0.3)."""
    n = summary.ok
    if n < min_rows:
        return ""
    msgs = []
    ood = summary.referred.get("out_of_distribution", 0) / n
    rate = reference.get("ood_refer_rate")
    if rate is not None and ood > max(0.1, 3 * rate):
        msgs.append(f"{ood:.0%} of images are out of distribution (validation: {rate:.0%})")
    prior = reference.get("train_class_share") or {}
    if prior:
        tv = 0.5 * sum(abs(summary.labels.get(c, 0) / n - p) for c, p in prior.items())
        if tv > 0.3:
            mix = ", ".join(f"{c} {summary.labels.get(c, 0) / n:.0%} (train {p:.0%})" for c, p in prior.items())
            msgs.append(f"predicted classes {mix}")
    return "; ".join(msgs) + ": calibrate on a labelled sample (cxrscreen calibrate) before trusting labels" if msgs else ""


class ModelCheckFailed(ValueError):
    """A model or site profile given to ``score`` cannot be used (wrong name, broken checkpoint)."""


def driver_stages(cfg: ScoreConfig) -> tuple[Segmenter | None, Classifier]:
    """The model stages in the driver, on its CPU with one torch thread: they score the archive's
    first batch while Ray starts the model actors (``first_batch_on_driver``)."""
    import torch

    from cxrscreen.pipeline.stages import Classifier, Segmenter

    runtime, threads = cfg.runtime_options("cpu", 1), torch.get_num_threads()
    try:
        return Segmenter(cfg.segmenter_options(), runtime) if cfg.segmenter else None, \
            Classifier(cfg.classifier_options(), runtime)
    finally:  # the torch runtime sets the process's thread count: a Python caller keeps its own
        torch.set_num_threads(threads)


def _start(cfg: ScoreConfig):
    """Ray started while the models are checked: the check (torch and model imports, weights
    read), then the driver's own stages (``driver_stages``), run in a thread during Ray's
    start-up, which mostly waits for its processes. Returns Ray, what ``drift_warning`` needs and
    the driver's stages (or None); a model that fails its check raises ``ModelCheckFailed``."""
    from concurrent.futures import ThreadPoolExecutor

    import ray as ray_module

    fresh = not ray_module.is_initialized()
    with ThreadPoolExecutor(1) as pool:
        checked = pool.submit(check_models, cfg)
        stages = pool.submit(driver_stages, cfg) if cfg.first_batch_on_driver else None
        try:
            ray = init_ray(cfg.address, cfg.num_cpus)
        finally:
            err = checked.exception()
        if err is not None:
            if stages is not None:
                stages.cancel()
            if fresh:  # started for this run only: a Python caller is not left with it
                ray.shutdown()
            raise ModelCheckFailed(str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}") from err
    return ray, checked.result(), stages.result() if stages is not None else None


class ClusterTooSmall(RuntimeError):
    """The Ray cluster's CPUs cannot hold the model actors and the decode or read tasks together."""


@dataclass
class ResourcePlan:
    actor_cpus: float
    actor_gpus: float
    threads: int
    device: str
    decode_cpus: float = 1.0  # per decode task: what the actors leave of a node with fewer CPUs than they need
    fused: bool = False  # segmenter and classifier in one actor pool


def plan_resources(cfg: ScoreConfig, cpus: float, gpus: float) -> ResourcePlan:
    """Size actor reservations so that decode tasks always get CPUs.

    An actor that reserves a whole CPU on a 2-CPU node leaves decode tasks starved and Ray
    Data waits forever; so CPU actors reserve at most (cpus - 1) / n_actors (at least 0.1), a
    decode task at most what they leave (on one CPU: 0.8), and torch threads are split between
    the actors.
    """
    use_gpu = gpus >= 1 and cfg.device in ("auto", "cuda")
    if cfg.device == "cuda" and gpus < 1:
        raise RuntimeError("--device cuda, but the Ray cluster has no GPU")
    # one fused pool by default on a GPU (the images stay on the device); two pools on CPUs,
    # where they measured faster (benchmarks/README.md, "One model stage")
    fused = bool(cfg.segmenter) and (cfg.fused if cfg.fused is not None else use_gpu)
    n_actors = cfg.cls_actors + (cfg.seg_actors if cfg.segmenter and not fused else 0)
    if use_gpu:  # the actors share about a quarter of the node, 1-4 CPUs each: their threads clean the
        # masks (4 threads: 1,152 vs 900 images/s with 2 on an H200, benchmarks/README.md); the rest decodes
        actor_cpus = cfg.actor_cpus or float(max(1, min(4, int(cpus) // (4 * n_actors))))
        return ResourcePlan(actor_cpus, min(1.0, gpus / n_actors), cfg.torch_threads or max(2, int(actor_cpus)), "cuda",
                            _decode_cpus(cpus, n_actors * actor_cpus), fused)
    actor_cpus = cfg.actor_cpus or max(0.1, min(1.0, (cpus - 1) / n_actors))
    # at least 2 threads per actor: measured faster on 2 cores (actors alternate, they rarely collide)
    threads = cfg.torch_threads or max(min(int(cpus), 2), int(cpus) // n_actors)
    return ResourcePlan(actor_cpus, 0.0, threads, "cpu", _decode_cpus(cpus, n_actors * actor_cpus), fused)


def _decode_cpus(cpus: float, reserved: float) -> float:
    left = cpus - reserved
    if left < 0.05:
        raise ClusterTooSmall(f"the model actors reserve {reserved:g} of the cluster's {cpus:g} CPUs: nothing is "
                           "left for decoding; lower actor_cpus or the number of actors")
    return round(min(1.0, left), 3)


def dry_run(archive: str | os.PathLike, out_dir: str | os.PathLike, cfg: ScoreConfig = ScoreConfig()) -> dict:
    """What ``score`` would do, without reading an image or starting Ray: inputs by format, how
    many already have a row in ``out_dir`` (skipped if their content is unchanged, re-scored
    otherwise), and how many would be scored for the first time (``cfg.limit`` applied). Counts
    inputs as ``score`` does: a path listed twice is one input; refuses what ``score`` refuses."""
    kind = archive_kind(archive)
    keys = check_archive(archive, kind, cfg)
    check_phi_columns(out_dir, cfg.include_phi)
    index = output_index(out_dir, clean=False)  # no lock held: a running score's temp files stay
    formats, n, have, seen = Counter(), 0, 0, np.zeros(0, "<u8")
    chunks = [keys[:cfg.limit or None]] if keys is not None else \
        input_key_chunks(archive, kind, cfg.limit, cfg.key_column, cfg.image_column, chunk=index.num_rows)
    for chunk in chunks:
        hashes = key_hashes(chunk)
        _, first = np.unique(hashes, return_index=True)
        new = first[~np.isin(hashes[first], seen)]  # each input once, however often it is listed
        seen = np.union1d(seen, hashes[new])
        chunk = pc.take(key_array(chunk), pa.array(new))
        n += len(chunk)
        formats.update(("parquet" if kind == "parquet" else Path(k).suffix.lower().lstrip(".") or "dicom")
                       for k in chunk.to_pylist())
        have += int(index.has(chunk).sum())
    return {"archive": str(archive), "kind": kind, "inputs": n, "by_format": dict(formats.most_common()),
            "with_rows_in_out": have, "new": n - have, "rows_in_out": index.num_rows}


def _on_every_node(ray, nodes: list[str], check, *args) -> bool:
    """Whether ``check(*args)`` holds on every node of ``nodes`` (a task pinned to each; nothing
    to check when the only node is this process's own). False on a timeout."""
    import ray.util.client
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if nodes == [ray.get_runtime_context().get_node_id()] and not ray.util.client.ray.is_connected():
        return True
    remote = ray.remote(num_cpus=0)(check)
    try:
        return all(ray.get([remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
                            .remote(*args) for n in nodes], timeout=120))
    except ray.exceptions.GetTimeoutError:
        return False


def _workers_see(ray, out_dir: Path, nodes: list[str]) -> bool:
    """Whether every node that may run a write task sees ``out_dir`` as this process does (a
    token file written here is read back on each node)."""
    import uuid

    token = out_dir / f".probe-{uuid.uuid4().hex}"
    token.write_text(token.name)
    try:
        return _on_every_node(ray, nodes, _sees_token, str(token))
    finally:
        token.unlink()


FIRST_BATCH = 16  # inputs the driver scores itself while the actors start


def _read(ray, source, nodes: int):
    """The archive's read tasks (``listing.archive_datasource``), as many at a time as the cluster
    has CPU nodes, with no CPU of their own: a read task that Ray Data pauses (its output not yet taken) still holds the
    CPU it asked for, and on a small node that CPU was the one the decode tasks were waiting for;
    the first 1,000 pre-decoded Parquet rows took 50 s (benchmarks/README.md, "Ceiling")."""
    return ray.data.read_datasource(source, override_num_blocks=len(source.parts), num_cpus=0,
                                    concurrency=max(nodes, 1))


def _cpu_nodes(ray) -> list[str]:
    return [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]


def _sees_token(path: str) -> bool:
    p = Path(path)
    return p.is_file() and p.read_text() == p.name


def _seen(archive) -> tuple[str, list[str], int]:
    """What another node must see of a list file or folder tree to list it as the driver would:
    the path, and the list's size or up to 16 of the tree's top folders."""
    path = os.path.abspath(archive)
    if os.path.isfile(path):
        return path, [], os.path.getsize(path)
    with os.scandir(path) as entries:
        top = sorted(e.path for e in itertools.islice(entries, 256) if not e.name.startswith(".") and _is_dir(e))
    return path, top[:16], -1


def _is_dir(entry: os.DirEntry) -> bool:
    """``entry.is_dir()``, False where it cannot be told (a link loop: an error row later)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _sees_archive(path: str, folders: list[str], size: int) -> bool:
    if size >= 0:
        return os.path.isfile(path) and os.path.getsize(path) == size
    return os.path.isdir(path) and all(os.path.isdir(f) for f in folders)


class Interrupted(RuntimeError):
    """SIGINT or SIGTERM stopped a run after its finished rows were written; ``str`` says so."""


@contextlib.contextmanager
def _interruptible():
    """SIGTERM raises KeyboardInterrupt like SIGINT does (main thread only; Ray's handler restored)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def score_archive(archive: str | os.PathLike, out_dir: str | os.PathLike, cfg: ScoreConfig = ScoreConfig(),
                  progress: bool = True, on_start: Callable[[], None] | None = None) -> ScoreSummary:
    """Score every input of ``archive`` into ``out_dir`` (one row per input, resumable).

    One run at a time per ``out_dir`` (``OutputBusy`` otherwise). SIGINT / SIGTERM write the
    rows already finished and raise ``Interrupted``; the next run resumes from them.
    ``on_start`` is called once the archive and OUT passed their checks, before models and Ray
    start (the CLI says there what it starts)."""
    kind = archive_kind(archive)  # a wrong ARCHIVE fails here, before models and Ray
    keys = check_archive(archive, kind, cfg)
    out_dir = Path(out_dir).resolve()  # write tasks on other nodes do not share this process's directory
    check_phi_columns(out_dir, cfg.include_phi)
    if on_start is not None:
        on_start()
    with OutputLock(out_dir):
        return _score_locked(archive, kind, out_dir, cfg, progress, keys)


def check_archive(archive, kind: str, cfg: ScoreConfig) -> pa.Array | None:
    """``ArchiveError`` for an archive whose structure cannot be scored, before models and Ray
    start: a CSV list without its path column, Parquet without its key or image column, or with
    keys missing or repeated. Returns a Parquet archive's keys (``parquet_keys``), else None."""
    try:
        if kind == "list":
            next(list_file_items(Path(archive)), None)  # a CSV list's header
        if kind != "parquet":
            return None
        return parquet_keys([str(f) for f in parquet_files(Path(archive))], cfg.key_column, cfg.image_column)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise ArchiveError(f"{archive}: cannot be read as a {kind} archive: {type(e).__name__}: {e}"[:500]) from None


def _score_locked(archive, kind: str, out_dir: Path, cfg: ScoreConfig, progress: bool,
                  keys: pa.Array | None = None) -> ScoreSummary:
    from tqdm import tqdm

    t0, started = time.perf_counter(), time.time()
    ray, reference, stages = _start(cfg)
    res = ray.cluster_resources()
    plan = plan_resources(cfg, res.get("CPU", 1), res.get("GPU", 0))
    index = output_index(out_dir)
    nodes = _cpu_nodes(ray)
    files = [str(f) for f in parquet_files(Path(archive))] if kind == "parquet" else []
    # the first batch is scored in the driver while Ray starts the actors (on CPUs: on GPUs the
    # actors' runtime differs); if it is the whole archive, Ray runs nothing. At most
    # FIRST_BATCH inputs: a full batch (64 by default) would delay the first result by a second or two.
    n_first = min(cfg.batch_size, FIRST_BATCH, cfg.limit or cfg.batch_size)
    first = [] if stages is None or plan.device != "cpu" else \
        parquet_head_items(files, cfg.key_column, cfg.image_column, n_first + 1) if kind == "parquet" else \
        list(itertools.islice(list_inputs(archive), n_first + 1))
    rest = not first or len(first) > n_first  # else the first batch is all of it
    first = first[:n_first]
    skip = pa.array([it.key for it in first], pa.string())
    tree_size: list[int] = []  # a streamed tree's inputs, once a thread has counted them
    if kind == "parquet":
        input_keys = (keys if keys is not None else parquet_keys(files, cfg.key_column, cfg.image_column))[
            :cfg.limit or None]
        n_inputs = len(input_keys)
        n_pending = n_inputs - int(index.has(input_keys).sum())
        source = archive_datasource(os.path.abspath(archive), kind, cfg.batch_size, cfg.key_column, cfg.image_column)
        if not source.parts or (first and (not rest or (cfg.limit and cfg.limit <= n_first))):
            ds = None  # no rows, or the driver's batch is all of it
        else:
            ds = _read(ray, source, len(nodes))
            if cfg.limit:  # the first N rows in file order, as input_keys counts them (this dataset only)
                ds.context.execution_options.preserve_order = True
                ds = ds.limit(cfg.limit)
            if index.num_rows or len(skip):  # as for a streamed list: the read tasks' rows have no resume hash
                ds = ds.map_batches(pending_rows, fn_kwargs=dict(index=index, skip=skip), batch_format="pyarrow",
                                    batch_size=None, num_cpus=plan.decode_cpus)
    elif kind in ("list", "folder") and not cfg.limit and rest and _on_every_node(ray, nodes, _sees_archive, *_seen(archive)):
        # streamed: read tasks list it (every node sees it), results start at once
        source = archive_datasource(os.path.abspath(archive), kind, cfg.batch_size)  # a link: its folder, not the target's
        if not source.parts:
            return ScoreSummary(seconds=time.perf_counter() - t0, rows=index.num_rows)
        input_keys, n_inputs = None, 0  # counted at the end
        # for the progress bar and the write batches: a list's lines less the rows already in OUT
        # (an estimate); a tree's size is unknown until a thread has walked it (the bar's total then)
        n_pending = max(estimated_lines(Path(archive)) - index.num_rows, 0) if kind == "list" else None
        if n_pending is None and progress:
            threading.Thread(target=lambda: tree_size.append(sum(1 for _ in folder_items(Path(archive)))),
                             daemon=True).start()
        ds = _read(ray, source, len(nodes))
        if index.num_rows or len(skip):
            ds = ds.map_batches(pending_rows, fn_kwargs=dict(index=index, skip=skip),
                                batch_format="pyarrow", batch_size=None, num_cpus=plan.decode_cpus)
    else:
        items = pending_items(archive, index, cfg.limit)
        input_keys = items["key"]
        n_inputs = items.num_rows
        n_pending = items["expected_sha"].null_count
        if not n_inputs:
            return ScoreSummary(seconds=time.perf_counter() - t0, rows=index.num_rows)
        items = without_keys(items, skip)
        step = max(cfg.batch_size, -(-items.num_rows // 200))  # at most 200 puts; cut into batches below
        ds = ray.data.from_arrow([items.slice(i, step) for i in range(0, items.num_rows, step)]) \
            if items.num_rows else None
    ds = _model_stages(ray, ds, cfg, plan) if ds is not None else None
    # who writes the part files (benchmarks/README.md, "Who writes the part files"): on one node
    # the driver (measured faster there); on a cluster write tasks on the workers, so that the
    # head does not convert and write every row; the driver then only receives each file's counts
    run = new_run_id()
    # workers write only where every node with CPUs sees OUT (a shared filesystem), else the driver
    on_workers = (cfg.writers == "workers" or (cfg.writers == "auto" and len(nodes) > 1)) and \
        _workers_see(ray, out_dir, nodes)
    if on_workers and ds is not None:
        ds = ds.map_batches(write_rows, fn_kwargs=dict(out_dir=str(out_dir), run=run, include_phi=cfg.include_phi),
                            batch_size=cfg.rows_per_file if n_pending is None else
                            min(cfg.rows_per_file, max(cfg.batch_size, -(-max(n_pending, 1) // 8))),
                            batch_format="numpy", num_cpus=plan.decode_cpus)
    writer = None if on_workers else PartWriter(out_dir, run, cfg.rows_per_file, cfg.include_phi)
    summary = ScoreSummary(inputs=n_inputs)
    bar = tqdm(total=n_pending, unit="img", desc="score", disable=not progress, smoothing=0.1)
    lock, failed = threading.Lock(), []

    def take(batch: dict, from_actors: bool = True) -> None:
        """Write a batch of output rows (the driver writes), or count the part files written
        (one row of counts each); the driver's own first batch arrives from a thread."""
        with lock:
            written = [(len(batch["key"]), writer.add(batch))] if writer is not None else \
                [(int(n), json.loads(c)) for n, c in zip(batch["rows"], batch["counts"])]
            for n, counts in written:
                now = time.perf_counter() - t0
                if not summary.first_row_s:
                    summary.first_row_s, summary.first_rows = now, n
                summary.add(counts)
                if from_actors and not summary.steady_from_s:
                    summary.steady_from_s, summary.steady_from_rows = now, summary.scored
                if bar.total is None and tree_size:
                    bar.total = max(tree_size[0] - index.num_rows, bar.n + n)
                bar.update(n)

    def score_first() -> None:
        try:
            rows = _score_on_driver(first, index, stages, cfg)
            if rows is not None:
                take(rows if writer is not None else write_rows(rows, str(out_dir), run, cfg.include_phi), False)
        except BaseException as e:  # noqa: BLE001 - raised in the main thread after the run
            failed.append(e)

    on_driver = threading.Thread(target=score_first, daemon=True)
    if first:
        on_driver.start()
    stopped = None
    try:
        with _interruptible():  # after Ray's start-up, which sets a SIGTERM handler of its own
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2) if ds is not None else []:
                take(batch)
            if first:
                on_driver.join()
    except KeyboardInterrupt as e:
        stopped = str(e) or "SIGINT"
    finally:  # the driver's batch is finished, and written, before anything else happens
        if first:
            on_driver.join()
    bar.close()
    if writer is not None:  # also when stopped: what is finished is kept
        writer.flush()
    index = output_index(out_dir)
    if drop_superseded(out_dir, index.superseded(run), run):  # also when stopped: what is written is kept
        index = output_index(out_dir)
    if drop_repeats(out_dir, index.repeated()):  # one row per key: an input listed twice, a retried write
        index = output_index(out_dir)
    summary.recount(run_counts(out_dir, run))
    if failed:  # the driver's first batch could not be written (what Ray scored is kept)
        raise failed[0]
    if stopped:
        raise Interrupted(f"stopped by {stopped}: {summary.scored} rows finished in this run were written to "
                          f"{out_dir}; run the same command again to score the rest")
    # a streamed list is read again in chunks as large as OUT (each chunk costs one pass over OUT)
    key_chunks = [input_keys] if input_keys is not None else input_key_chunks(archive, kind, chunk=index.num_rows)
    summary.missing, stale, listed, summary.inputs = _missing_and_stale(key_chunks, index)
    summary.repeated = listed - summary.inputs
    if input_keys is None and summary.missing:  # listed in parts while the run went on
        late = _arrived_during(archive, kind, summary.missing, started)
        summary.missing, summary.arrived = [k for k in summary.missing if k not in late], len(late)
    summary.skipped = summary.inputs - summary.scored - summary.arrived - len(summary.missing)
    summary.seconds = time.perf_counter() - t0
    if len(stale) and cfg.prune:
        summary.pruned = drop_superseded(out_dir, stale, keep_run="")
        index = output_index(out_dir)
        stale = stale[:0]
    summary.rows, summary.stale = index.num_rows, len(stale)
    summary.drift = drift_warning(summary, reference)
    return summary


def _model_stages(ray, ds, cfg: ScoreConfig, plan: ResourcePlan):
    """Inputs (key, path or bytes, expected_sha) -> output rows: batches, decode tasks, model actors."""
    from cxrscreen.pipeline.stages import Classifier, SegmentClassify, Segmenter  # imported by the model check already

    # Ray joins what a task yields into blocks of up to 128 MiB: the decoded images of a folder
    # or list range would reach the actors as a few blocks, so the first result would wait for
    # thousands of images; blocks of about one batch of work images stream out as decoded.
    # (Ray's repartition cuts blocks too, but measured slower, and its tasks take a whole CPU,
    # which a 1-CPU cluster never has beside the actors: benchmarks/README.md, "Ceiling".)
    ds.context.target_max_block_size = cfg.batch_size * cfg.work_size ** 2
    # Fault tolerance is Ray's, kept at the defaults on purpose (they fit: every stage is pure):
    # a decode task lost with its worker or node is re-run (Ray's task max_retries=3); a dead
    # model actor is restarted without limit and its in-flight batches are retried on the new
    # one (Ray Data's max_restarts=-1, max_task_retries=-1). Every input still gets exactly one
    # row: tests/test_pipeline.py kills a model actor, and a worker node, in the middle of a run.
    ds = ds.map_batches(decode_batch, fn_kwargs=dict(work_size=cfg.work_size, **cfg.decode_options()),
                        batch_size=cfg.batch_size, batch_format="numpy", num_cpus=plan.decode_cpus)
    model_kwargs = cfg.runtime_options(plan.device, plan.threads)
    pool = dict(batch_size=cfg.batch_size, batch_format="numpy", num_cpus=plan.actor_cpus,
                num_gpus=plan.actor_gpus or None)
    if plan.fused:
        ds = ds.map_batches(SegmentClassify, fn_constructor_kwargs=dict(
            segmenter=cfg.segmenter_options(), classifier=cfg.classifier_options(), runtime=model_kwargs),
            compute=ray.data.ActorPoolStrategy(size=cfg.cls_actors), **pool)
    else:
        if cfg.segmenter:
            ds = ds.map_batches(Segmenter, fn_constructor_kwargs=dict(options=cfg.segmenter_options(),
                                                                      runtime=model_kwargs),
                                compute=ray.data.ActorPoolStrategy(size=cfg.seg_actors), **pool)
        ds = ds.map_batches(Classifier, fn_constructor_kwargs=dict(options=cfg.classifier_options(), runtime=model_kwargs),
                            compute=ray.data.ActorPoolStrategy(size=cfg.cls_actors), **pool)
    return ds


def _arrived_during(archive, kind: str, keys: list[str], since: float) -> set[str]:
    """Of a streamed archive's keys without a row, those that may have arrived after their part
    was listed: a folder's files created (ctime) since the run began, or every one if the list
    file itself changed since then."""
    if kind == "list":
        return set(keys) if os.stat(archive).st_mtime >= since else set()
    late = set()
    for k in keys:
        with contextlib.suppress(OSError):  # gone again, or an escaped name: missing
            if os.stat(os.path.join(archive, k)).st_ctime >= since:
                late.add(k)
    return late


def _missing_and_stale(key_chunks: Iterable, index: ResumeIndex) -> tuple[list[str], np.ndarray, int, int]:
    """Input keys without a row in OUT, the key hashes of OUT's rows whose input is no longer
    in the archive, and the number of entries and of distinct inputs, from the input keys in
    chunks (compared as hashes: no Python set of a million keys, 8 bytes per key; each chunk
    costs a pass over OUT, so chunks should not be much smaller)."""
    listed = np.zeros(index.num_rows, bool)
    missing, n, every = set(), 0, [np.zeros(0, "<u8")]
    for keys in key_chunks:
        keys, hashes = key_array(keys), key_hashes(keys)
        n += len(keys)
        every.append(hashes)
        found, _ = index.find(hashes)
        missing.update(pc.filter(keys, pa.array(~found)).to_pylist())
        listed |= np.isin(index.hashes, hashes)
    return sorted(missing), np.unique(index.hashes[~listed]), n, len(np.unique(np.concatenate(every)))


def _score_on_driver(items: list[InputItem], index: ResumeIndex, stages: tuple, cfg: ScoreConfig) -> dict | None:
    """Output rows of ``items`` scored by the driver's own stages, as a model actor would score
    them (inputs whose content has a row in ``index`` skipped); None when every one was skipped."""
    batch = decode_items(items, cfg.work_size, index.expected_sha([it.key for it in items]).to_pylist(),
                         **cfg.decode_options())
    return _model_rows(batch, *stages) if len(batch["key"]) else None


def _model_rows(batch: dict, segmenter: Segmenter | None, classifier: Classifier) -> dict:
    """A decoded batch through the model stages, as the actors run them."""
    return classifier(segmenter(batch) if segmenter is not None else batch)


def score_items_local(items: Iterable[InputItem], cfg: ScoreConfig = ScoreConfig(),
                      segmenter: Segmenter | None = None, classifier: Classifier | None = None) -> Iterable[dict]:
    """The same stages without Ray, one batch at a time (for tests, notebooks and benchmarks)."""
    from cxrscreen.pipeline.stages import Classifier, Segmenter

    if segmenter is None and cfg.segmenter:
        segmenter = Segmenter(cfg.segmenter_options(), cfg.runtime_options())
    if classifier is None:
        classifier = Classifier(cfg.classifier_options(), cfg.runtime_options())
    buf: list[InputItem] = []

    def run(chunk):
        return _model_rows(decode_items(chunk, cfg.work_size, **cfg.decode_options()), segmenter, classifier)

    for it in items:
        buf.append(it)
        if len(buf) == cfg.batch_size:
            yield run(buf)
            buf = []
    if buf:
        yield run(buf)
