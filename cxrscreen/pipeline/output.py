"""The output dataset: its schema, atomic part files, and the resume index."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
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


class PartWriter:
    """Buffers rows and writes ``part-<run>-<seq>.parquet`` files atomically (temp + rename)."""

    def __init__(self, out_dir: str | Path, schema: pa.Schema, rows_per_file: int = 1000,
                 max_seconds: float = 30.0):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.schema, self.rows_per_file, self.max_seconds = schema, rows_per_file, max_seconds
        self.run = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.buffer: list[pa.Table] = []
        self.buffered = self.seq = self.written = 0
        self.last_flush = time.monotonic()

    def add(self, table: pa.Table) -> None:
        self.buffer.append(table)
        self.buffered += table.num_rows
        if self.buffered >= self.rows_per_file or time.monotonic() - self.last_flush > self.max_seconds:
            self.flush()

    def flush(self) -> None:
        if not self.buffered:
            return
        path = self.out / f"part-{self.run}-{self.seq:05d}.parquet"
        tmp = self.out / f".{path.name}.tmp"
        pq.write_table(pa.concat_tables(self.buffer), tmp)
        durable_replace(tmp, path)
        self.written += self.buffered
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


def completed(out_dir: str | Path) -> dict[str, str]:
    """key -> sha256 of every row already in ``out_dir`` (complete part files only)."""
    out = Path(out_dir)
    done: dict[str, str] = {}
    for f in sorted(out.glob("part-*.parquet")) if out.exists() else []:
        t = pq.read_table(f, columns=["key", "sha256"])
        done.update(zip(t["key"].to_pylist(), t["sha256"].to_pylist()))
    for tmp in out.glob(".part-*.tmp") if out.exists() else []:
        tmp.unlink()  # left by a killed run; its rows were never visible
    return done


def drop_superseded(out_dir: str | Path, keys: set[str], keep_run: str) -> int:
    """Remove rows of ``keys`` from part files of earlier runs (their input changed and was
    re-scored by run ``keep_run``); each affected file is rewritten atomically. Returns rows dropped."""
    dropped = 0
    for f in sorted(Path(out_dir).glob("part-*.parquet")):
        if not keys or f.name.startswith(f"part-{keep_run}-"):
            continue
        t = pq.read_table(f)
        stale = pa.compute.is_in(t["key"], value_set=pa.array(sorted(keys), pa.string()))
        n = pa.compute.sum(stale).as_py() or 0
        if n:
            tmp = f.with_name(f".{f.name}.tmp")
            pq.write_table(t.filter(pa.compute.invert(stale)), tmp)
            durable_replace(tmp, f)
            dropped += n
    return dropped
