"""The output dataset: its schema, atomic part files, and the resume index."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cxrscreen.io.batch import stage_columns

# stable codes of ``refer_reason`` (a list per row), in the order they are listed
REFER_CODES = ("unreadable", "low_confidence", "out_of_distribution", "atypical_lungs", "atypical_intensity")


def output_schema(classes: list[str], include_phi: bool = False) -> pa.Schema:
    """Column names and types of every output row (documented in README.md): the batch
    contract ``cxrscreen.io.batch.COLUMNS`` of every stage."""
    types = {"string": pa.string(), "float32": pa.float32(), "float64": pa.float64(), "int64": pa.int64(),
             "bool": pa.bool_(), "binary": pa.binary(), "box": pa.list_(pa.float32(), 4), "codes": pa.list_(pa.string())}
    stages = ("decode", "classify", "segment", "cam") + (("phi",) if include_phi else ())
    return pa.schema([(name, types[kind]) for name, kind in stage_columns(stages, classes)])


def batch_to_table(batch: dict[str, np.ndarray], schema: pa.Schema) -> pa.Table:
    """A numpy batch -> Arrow table of exactly ``schema`` (missing columns become nulls)."""
    n = len(batch["key"])
    arrays = []
    for f in schema:
        v = batch.get(f.name)
        if v is None:
            arrays.append(pa.nulls(n, f.type))
        elif pa.types.is_fixed_size_list(f.type):
            v = np.asarray(v, np.float32)
            flat = pa.array(v.reshape(-1), pa.float32(), mask=np.isnan(v.reshape(-1)))
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, f.type.list_size))
        elif pa.types.is_floating(f.type):
            v = np.asarray(v, dtype=np.float64)
            arrays.append(pa.array(v, f.type, mask=np.isnan(v)))
        elif pa.types.is_list(f.type):
            arrays.append(pa.array([None if x is None or isinstance(x, float) else list(x) for x in v], f.type))
        elif pa.types.is_boolean(f.type):
            arrays.append(pa.array(np.asarray(v, dtype=bool), f.type))
        else:  # strings / bytes; Ray may hand an all-None object column back as float NaN
            arrays.append(pa.array([None if isinstance(x, (float, np.floating)) else x for x in v], f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def new_run_id() -> str:
    """The id of one ``score`` run; its part files are ``part-<run>-<digest>.parquet``."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


def write_part(table: pa.Table, path: Path) -> None:
    """Write one part file atomically: a temp file, synced, renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    durable_replace(tmp, path)


def row_counts(batch: dict[str, np.ndarray]) -> dict:
    """What the run summary counts of a batch of output rows: ok rows, errors by type, rows by
    refer reason, ok rows by predicted label."""
    from collections import Counter

    errors, referred, labels = Counter(), Counter(), Counter()
    for status, etype, label, reasons in zip(batch["status"], batch["error_type"], batch["label"],
                                             batch["refer_reason"]):
        if status == "ok":
            labels[str(label)] += 1
        else:
            errors[str(etype)] += 1
        referred.update(str(r) for r in (reasons if isinstance(reasons, (list, np.ndarray)) else []))
    return {"ok": sum(labels.values()), "errors": dict(errors), "referred": dict(referred), "labels": dict(labels)}


def rows_table(batch: dict[str, np.ndarray], include_phi: bool = False) -> pa.Table:
    """A batch of output rows as an Arrow table of the output schema (its classes read from
    the batch's ``prob_*`` columns)."""
    classes = [k[5:] for k in batch if k.startswith("prob_")]
    return batch_to_table(batch, output_schema(classes, include_phi))


def write_rows(batch: dict[str, np.ndarray], out_dir: str, run: str, include_phi: bool = False) -> dict:
    """The last stage of ``score`` when the workers write (``writers``): convert a batch of output
    rows to Arrow and write it as one part file; hand back only its counts (one row: ``rows``,
    ``counts`` as JSON), so the driver coordinates and counts but never touches a row. Each file
    has a name of its own (two batches may hold the same keys: a list naming its paths twice); the
    rows of a write that Ray retried are found again as repeats and removed at the end of the run
    (``drop_repeats``), whose summary counts the rows in OUT (``run_counts``)."""
    write_part(rows_table(batch, include_phi), Path(out_dir) / f"part-{run}-{uuid.uuid4().hex[:16]}.parquet")
    return {"rows": np.array([len(batch["key"])]), "counts": np.array([json.dumps(row_counts(batch))], object)}


class PartWriter:
    """The driver's writer (``writers: driver``): buffers output rows and writes
    ``part-<run>-<seq>.parquet`` files atomically every ``rows_per_file`` rows or 30 s."""

    def __init__(self, out_dir: str | Path, run: str, rows_per_file: int = 1000, include_phi: bool = False,
                 max_seconds: float = 30.0):
        self.out, self.run, self.rows_per_file, self.include_phi = Path(out_dir), run, rows_per_file, include_phi
        self.max_seconds = max_seconds
        self.buffer: list[pa.Table] = []
        self.buffered = self.seq = 0
        self.last_flush = time.monotonic()

    def add(self, batch: dict[str, np.ndarray]) -> dict:
        """Buffer a batch of output rows; returns their counts (``row_counts``)."""
        self.buffer.append(rows_table(batch, self.include_phi))
        self.buffered += len(batch["key"])
        if self.buffered >= self.rows_per_file or time.monotonic() - self.last_flush > self.max_seconds:
            self.flush()
        return row_counts(batch)

    def flush(self) -> None:
        if self.buffered:
            write_part(pa.concat_tables(self.buffer), self.out / f"part-{self.run}-{self.seq:05d}.parquet")
            self.seq += 1
        self.buffer, self.buffered, self.last_flush = [], 0, time.monotonic()


def durable_replace(tmp: Path, path: Path) -> None:
    """Rename a written temp file over ``path`` so that a power loss leaves the old file or the
    whole new one: the file's data is synced before the rename, the folder's entry after it."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutputMismatch(ValueError):
    """OUT holds rows that a run with these settings must not mix with (one line for the user)."""


def check_phi_columns(out_dir: str | Path, include_phi: bool) -> None:
    """``OutputMismatch`` when OUT's part files were written with the other ``include_phi``: a
    folder holds patient identifiers in every part file or in none (so that dropping
    ``--include-phi`` never leaves them behind unnoticed, and the part files read as one table)."""
    first = next(iter(sorted(Path(out_dir).glob("part-*.parquet"))), None) if Path(out_dir).exists() else None
    if first is None:
        return
    has_phi = "patient_name" in pq.read_schema(first).names
    if has_phi != include_phi:
        raise OutputMismatch(
            f"{out_dir} holds rows written {'with' if has_phi else 'without'} --include-phi; score into another "
            f"folder, or {'add' if has_phi else 'leave out'} --include-phi (a folder holds patient identifiers in "
            "every row or in none)")


class OutputBusy(RuntimeError):
    """Another process is writing the same output folder."""


class OutputLock:
    """An exclusive lock on an output folder (``.cxrscreen.lock``, ``flock``): a second
    ``score`` into the same OUT fails at once with one line instead of interleaving its part
    files. The kernel drops the lock when its process dies, so a killed run leaves none behind."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / ".cxrscreen.lock"
        self.fd: int | None = None

    def __enter__(self) -> "OutputLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputBusy(f"{self.path.parent} is being written by another cxrscreen score (pid {holder}); "
                             "wait for it to finish or choose another -o") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
            self.fd = None


SHA_PREFIX = 16  # hex characters of a row's content hash that the resume index keeps (64 bits)


def key_hashes(keys) -> np.ndarray:
    """64-bit BLAKE2b hashes of keys (a list or Arrow array of text): the same in every process,
    machine and version, so the driver's index and a worker's batch compare by them."""
    import hashlib

    keys = key_array(keys).to_pylist()
    return np.frombuffer(b"".join(hashlib.blake2b(k.encode("utf-8", "surrogateescape"), digest_size=8).digest()
                                  for k in keys), "<u8")


class ResumeIndex:
    """What a run needs to know of the rows already in OUT, in about 28 bytes per row (about
    27 MB for a million rows, where the keys and hashes as Arrow text took 93 MB): each row's key
    as a 64-bit hash (``key_hashes``, sorted), the first ``SHA_PREFIX`` hex characters of its
    content hash and its run. Keys themselves are read one part file at a time and never kept. A
    hash collision between two of a million keys has odds of about 1 in 37 million; two colliding
    keys would share one row's place (the newer scored input replaces the other's row)."""

    def __init__(self, hashes: np.ndarray, sha: np.ndarray, run: np.ndarray, runs: list[str]):
        order = np.argsort(hashes, kind="stable")
        self.hashes, self.sha, self.run, self.runs = hashes[order], sha[order], run[order], runs

    @property
    def num_rows(self) -> int:
        return len(self.hashes)

    def find(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per key hash: whether OUT has a row of it, and that row's position."""
        pos = np.minimum(np.searchsorted(self.hashes, hashes), max(self.num_rows - 1, 0))
        found = self.hashes[pos] == hashes if self.num_rows else np.zeros(len(hashes), bool)
        return found, pos

    def has(self, keys) -> np.ndarray:
        """Per key, whether OUT has a row of it."""
        return self.find(key_hashes(keys))[0]

    def expected_sha(self, keys) -> pa.Array:
        """Per key, the content hash prefix of its row (null where it has none): an input whose
        content hash still begins with it is skipped as already scored (``cxrscreen.io.batch``)."""
        found, pos = self.find(key_hashes(keys))
        out = np.full(len(found), None, object)
        out[found] = self.sha[pos[found]].astype(f"U{SHA_PREFIX}")
        return pa.array(out, pa.string())

    def repeated(self) -> np.ndarray:
        """Key hashes with more than one row (an input listed twice, a retried write, a run
        killed before it removed the rows its new ones replaced)."""
        return np.unique(self.hashes[1:][self.hashes[1:] == self.hashes[:-1]])  # sorted

    def superseded(self, run: str) -> np.ndarray:
        """Key hashes scored by ``run`` that also have rows of earlier runs (their input changed)."""
        mine = self.run == (self.runs.index(run) if run in self.runs else -1)
        return np.intersect1d(self.hashes[mine], self.hashes[~mine])


def output_index(out_dir: str | Path, clean: bool = True) -> ResumeIndex:
    """The resume index of ``out_dir``'s complete part files, read one file at a time. With
    ``clean`` (the lock holder only), temp files of a killed run are removed: their rows were
    never visible."""
    out = Path(out_dir)
    hashes, shas, codes, runs = [], [], [], {}
    for f in sorted(out.glob("part-*.parquet")) if out.exists() else []:
        t = pq.read_table(f, columns=["key", "sha256"])
        code = runs.setdefault(_run_of(f), len(runs))
        hashes.append(key_hashes(t["key"]))
        sha = pc.utf8_slice_codeunits(pc.fill_null(t["sha256"], ""), 0, SHA_PREFIX)
        shas.append(np.asarray(sha.to_pylist(), f"S{SHA_PREFIX}"))
        codes.append(np.full(t.num_rows, code, np.int32))
    for tmp in out.glob(".part-*.tmp") if clean and out.exists() else []:
        tmp.unlink()
    cat = (lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype))  # noqa: E731
    return ResumeIndex(cat(hashes, "<u8"), cat(shas, f"S{SHA_PREFIX}"), cat(codes, np.int32), list(runs))


def key_array(values) -> pa.Array:
    """Keys (a list, an Arrow array or chunked array) as one Arrow string array (Arrow's set
    lookups take no chunked value sets)."""
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks() if values.num_chunks else pa.array([], values.type)
    return values if isinstance(values, pa.Array) else pa.array(list(values), pa.string())


def drop_superseded(out_dir: str | Path, hashes: np.ndarray, keep_run: str) -> int:
    """Remove rows whose key hash is in ``hashes`` from part files of runs other than ``keep_run``
    (their input changed and was re-scored, or is gone); each affected file is rewritten
    atomically. Returns rows dropped."""
    dropped = 0
    for f in sorted(Path(out_dir).glob("part-*.parquet")) if len(hashes) else []:
        if keep_run and f.name.startswith(f"part-{keep_run}-"):
            continue
        t = pq.read_table(f)
        stale = np.isin(key_hashes(t["key"]), hashes)
        n = int(stale.sum())
        if n:
            write_part(t.filter(pa.array(~stale)), f)
            dropped += n
    return dropped


def _run_of(part: Path) -> str:
    return part.name[len("part-"):].rsplit("-", 1)[0]


def drop_repeats(out_dir: str | Path, hashes: np.ndarray) -> int:
    """Keep one row of each key hash in ``hashes`` and remove the others: the newest run's row,
    the first in its files' order. Each affected file is rewritten atomically (removed when no
    row is left). Returns rows removed."""
    files = sorted(Path(out_dir).glob("part-*.parquet")) if len(hashes) else []
    seen: set[int] = set()
    dropped = 0
    for f in sorted(files, key=_run_of, reverse=True):  # newest run first, each run's files in name order
        h = key_hashes(pq.read_table(f, columns=["key"])["key"])
        drop = np.zeros(len(h), bool)
        for i in np.flatnonzero(np.isin(h, hashes)):
            drop[i] = int(h[i]) in seen
            seen.add(int(h[i]))
        if drop.all():
            f.unlink()
        elif drop.any():
            write_part(pq.read_table(f).filter(pa.array(~drop)), f)
        dropped += int(drop.sum())
    return dropped


def run_counts(out_dir: str | Path, run: str) -> dict:
    """``row_counts`` of the rows ``run`` left in OUT (its part files, after any were removed),
    counted with Arrow one file at a time (no Python object per row of a million-row run)."""
    from collections import Counter

    errors, referred, labels = Counter(), Counter(), Counter()
    for f in sorted(Path(out_dir).glob(f"part-{run}-*.parquet")):
        t = pq.read_table(f, columns=["status", "error_type", "label", "refer_reason"])
        ok = pc.equal(t["status"], "ok")
        for counter, values in ((labels, pc.filter(t["label"], ok)), (errors, pc.filter(t["error_type"], pc.invert(ok))),
                                (referred, pc.list_flatten(t["refer_reason"]))):
            for item in pc.value_counts(values).to_pylist():
                counter[str(item["values"])] += item["counts"]
    return {"ok": sum(labels.values()), "errors": dict(errors), "referred": dict(referred), "labels": dict(labels)}
