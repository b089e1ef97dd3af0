"""Find the inputs of an archive: a folder tree, a list file, or Parquet with image bytes."""

from __future__ import annotations

import csv
import itertools
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cxrscreen.io.errors import ArchiveError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp", ".pgm")
LIST_SUFFIXES = (".txt", ".lst", ".csv")
PARQUET_SUFFIXES = (".parquet", ".pq")

# Folder names of the common public collections -> our class names (keys normalised by _norm).
DEFAULT_LABEL_MAP = {
    "covid": "covid", "covid19": "covid", "covid_19": "covid", "covid-19": "covid",
    "normal": "normal",
    "viral_pneumonia": "viral_pneumonia", "viral": "viral_pneumonia",
    "bacterial_pneumonia": "bacterial_pneumonia", "bacterial": "bacterial_pneumonia",
    "lung_opacity": "lung_opacity",
    "pneumonia": "pneumonia",
}


@dataclass(frozen=True)
class InputItem:
    """One input: a stable ``key`` plus either a ``path`` or the encoded ``data``."""

    key: str
    path: str | None = None
    data: bytes | None = None
    label: str | None = None


def safe_text(name: str) -> str:
    """A file name as valid UTF-8 text: bytes that are not UTF-8 (names from other systems,
    which Python carries as lone surrogates) become ``\\xNN`` escapes, so every name gives a
    writable, stable key and ``os.fsencode`` of the original can be read off it."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _norm(name: str) -> str:
    return name.strip().lower().replace(" ", "_")


def label_from_path(rel: Path, label_map: dict[str, str]) -> str | None:
    """Class of the nearest ancestor folder whose (normalised) name is in ``label_map``."""
    table = {_norm(k): v for k, v in label_map.items()}
    for part in reversed(rel.parts[:-1]):
        if _norm(part) in table:
            return table[_norm(part)]
    return None


def has_dicom_magic(path: Path) -> bool:
    """Whether ``path`` is a regular file that begins with a DICOM preamble: a FIFO or device
    without a suffix is no image and is never opened (reading it could wait forever); opened
    without blocking, in case one took the file's place since."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        head = os.pread(fd, 132, 0)
    except OSError:
        return False
    finally:
        os.close(fd)
    return len(head) == 132 and head[128:132] == b"DICM"


def archive_kind(archive: str | os.PathLike) -> str:
    """'folder', 'list', 'parquet' (a folder of only .parquet files counts as parquet) or
    'file' (one image: an image suffix or DICOM magic)."""
    p = Path(archive)
    if not p.exists():
        raise ArchiveError(f"{p}: no such file or folder")
    if p.is_dir():
        seen_parquet = False
        for f in p.rglob("*"):
            if f.is_file() and not f.name.startswith("."):
                if f.suffix.lower() not in PARQUET_SUFFIXES:
                    return "folder"
                seen_parquet = True
        return "parquet" if seen_parquet else "folder"
    if p.suffix.lower() in PARQUET_SUFFIXES:
        return "parquet"
    if p.suffix.lower() in LIST_SUFFIXES:
        return "list"
    if p.suffix.lower() in IMAGE_SUFFIXES or (p.suffix == "" and has_dicom_magic(p)):
        return "file"
    raise ArchiveError(f"{p}: not a folder, an image ({', '.join(IMAGE_SUFFIXES)} or DICOM), a list file "
                     f"({', '.join(LIST_SUFFIXES)}) or Parquet")


def list_inputs(archive: str | os.PathLike, labels_from_folders: bool = False,
                label_map: dict[str, str] | None = None,
                image_column: str = "image", key_column: str = "key") -> Iterator[InputItem]:
    """Yield the inputs of ``archive`` in a deterministic order.

    Folder trees are walked recursively for image suffixes and extension-less DICOM
    (DICM magic); hidden files are ignored. List files hold one path per line (``#``
    comments) or, as CSV, a ``path`` column and an optional ``label`` column; relative
    paths are resolved against the list file's folder. Parquet inputs carry bytes.
    """
    label_map = DEFAULT_LABEL_MAP if label_map is None else label_map
    kind = archive_kind(archive)
    root = Path(os.path.abspath(archive))  # inputs' paths are absolute, as read tasks give them
    if kind == "folder":
        yield from folder_items(root, label_map=label_map if labels_from_folders else None)
    elif kind == "file":
        yield InputItem(key=safe_text(root.name), path=str(root))
    elif kind == "list":
        yield from list_file_items(root)
    else:
        yield from _parquet_rows(root, image_column, key_column)


def folder_items(root: Path, folder: Path | None = None, recursive: bool = True,
                 label_map: dict[str, str] | None = None, shard: int = 0, shards: int = 1) -> Iterator[InputItem]:
    """The images of ``folder`` (default: ``root``) and, with ``recursive``, of its sub-folders,
    keyed by their path relative to ``root``, folders and files in name order: image suffixes
    and extension-less DICOM (DICM magic); hidden files and folders are skipped, links to
    folders are not followed; with ``shards`` > 1 only the files whose name hashes to ``shard``
    (CRC-32). ``folder_units`` cuts a tree into calls of this that tile it. With ``label_map``,
    each item's label is its nearest labelled ancestor folder's class."""
    for dirpath, dirnames, filenames in os.walk(root if folder is None else folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        for fn in sorted(filenames):
            if fn.startswith(".") or shards > 1 and zlib.crc32(os.fsencode(fn)) % shards != shard:
                continue
            full = Path(dirpath) / fn
            suffix = full.suffix.lower()
            if suffix not in IMAGE_SUFFIXES and not (suffix == "" and has_dicom_magic(full)):
                continue
            rel = full.relative_to(root)
            label = label_from_path(rel, label_map) if label_map is not None else None
            yield InputItem(key=safe_text(rel.as_posix()), path=str(full), label=label)


def folder_units(root: Path, min_units: int = 64, max_entries: int = 50_000,
                 min_files: int = 64) -> list[tuple[str, bool, int, int]]:
    """``(folder, recursive, shard, shards)`` whose ``folder_items`` tile the tree under ``root``:
    folders are opened breadth first (each one's own files become non-recursive units, its
    sub-folders queued) until there are ``min_units`` units or ``max_entries`` entries were looked
    at; the queued folders are walked whole. An opened folder's files are cut by name hash into
    up to 64 shards of at least ``min_files`` (fewer where that many passes over a huge folder
    would cost more than they save), so that a flat folder is listed, and decoded, by parallel
    tasks. Only folder entries are read here: a tree of millions of files is cut up in seconds."""
    units, queue, seen = [], [Path(root)], 0
    while queue and len(units) + len(queue) < min_units and seen < max_entries:
        folder = queue.pop(0)
        subs, files = [], 0
        try:
            with os.scandir(folder) as entries:
                for e in entries:
                    seen += 1
                    if e.name.startswith("."):
                        continue
                    try:
                        is_dir = e.is_dir()
                    except OSError:  # as os.walk does: a file
                        is_dir = False
                    if is_dir and not e.is_symlink():
                        subs.append(e.name)
                    elif not is_dir:
                        files += 1
        except OSError:  # unreadable: os.walk skips it too
            pass
        shards = max(1, min(files // max(min_files, 1), 64, 20_000_000 // max(files, 1)))
        units += [(str(folder), False, i, shards) for i in range(shards)]
        queue += [folder / d for d in sorted(subs)]
    return units + [(str(f), True, 0, 1) for f in queue]


def list_file_items(path: Path, start: int = 0, end: int | None = None) -> Iterator[InputItem]:
    """The inputs of a list file whose lines begin in bytes ``[start, end)`` (default: all):
    ranges that tile the file (``list_file_ranges``) yield every input exactly once, so tasks
    can read one list in parallel without the driver reading it. Lines are UTF-8; other bytes
    (paths from other systems) are kept in the path and escaped in the key, as ``safe_text``
    does for folder trees. Plain lists end lines with LF, CRLF or CR; a CSV list's records end
    with LF or CRLF and may not contain a line break inside a quoted field."""
    base = str(path.parent)  # os.path.join: a million paths in a fraction of pathlib's time
    with open(path, "rb") as f:
        fields = None
        if path.suffix.lower() == ".csv":
            fields = next(csv.reader([f.readline().decode("utf-8-sig")]), [])  # a spreadsheet's BOM too
            if "path" not in fields:
                raise ArchiveError(f"{path}: a CSV list needs a 'path' column")
            start = max(start, f.tell())
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the rest of a line that began before start belongs to the range before
        lines = (line.decode("utf-8", "surrogateescape") for line in itertools.takewhile(
            lambda line: end is None or f.tell() - len(line) < end, iter(f.readline, b"")))
        if fields is not None:
            for row in csv.DictReader(lines, fieldnames=fields):
                p = (row.get("path") or "").strip()
                if p:
                    yield InputItem(key=safe_text(p), path=os.path.join(base, p), label=(row.get("label") or None))
            return
        for line in lines:
            for p in line.split("\r"):  # old Mac line ends (CR only) too
                p = p.strip()
                if p and not p.startswith("#"):
                    yield InputItem(key=safe_text(p), path=os.path.join(base, p))


def list_file_ranges(path: Path, min_lines: int = 64, max_ranges: int = 200) -> list[tuple[int, int]]:
    """Byte ranges that tile a list file, about ``max(min_lines, lines / max_ranges)`` lines each
    (``estimated_lines``); only the file's size and head are read."""
    size = path.stat().st_size
    step = max(int(min_lines * size / max(estimated_lines(path), 1)), -(-size // max_ranges), 1)
    return [(a, min(a + step, size)) for a in range(0, size, step)]


def estimated_lines(path: Path) -> int:
    """The number of lines of a list file, estimated from its size and first 64 KiB."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(65_536)
    return round(size * max(head.count(b"\n"), 1) / max(len(head), 1))


def parquet_files(path: Path) -> list[Path]:
    return sorted(f for f in path.rglob("*") if f.suffix.lower() in PARQUET_SUFFIXES and f.is_file()) \
        if path.is_dir() else [path]


def _parquet_rows(path: Path, image_column: str, key_column: str) -> Iterator[InputItem]:
    import pyarrow.parquet as pq

    for f in parquet_files(path):
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if image_column not in names:
            raise ArchiveError(f"{f}: no image-bytes column {image_column!r} (columns: {names})")
        cols = [c for c in (image_column, key_column, "label") if c in names]
        row = 0
        for batch in pf.iter_batches(columns=cols, batch_size=256):
            d = batch.to_pydict()
            for i, data in enumerate(d[image_column]):
                key = d[key_column][i] if key_column in d else f"{f.name}#{row}"
                label = d["label"][i] if "label" in d else None
                yield InputItem(key=str(key), data=data, label=label)
                row += 1
