"""Hand an archive's inputs to Ray Data, and count them afterwards.

List files and folder trees stream: ``archive_datasource`` splits a list into byte ranges, a
tree into folders, that Ray's read tasks list (``cxrscreen.io.sources.list_file_items``,
``folder_items``), so the driver reads only a list's size and head, or a tree's top folders,
before results start, and never holds the archive (it lists it once more at the end, in chunks,
to account for every input: ``input_key_chunks``). Single images, runs with ``limit``, archives
of at most one batch and archives some node cannot see are listed on the driver into an Arrow
table in chunks (``pending_items``). Paths travel as bytes: a
non-UTF-8 name is a valid path but not valid Arrow text. Parquet archives are read by Ray's
Parquet reader (``parquet_keys`` checks them).
"""

from __future__ import annotations

import functools
import itertools
import os
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from cxrscreen.io.errors import ArchiveError
from cxrscreen.io.sources import (InputItem, folder_items, folder_units, list_file_items, list_file_ranges,
                                  list_inputs, safe_text)
from cxrscreen.pipeline.output import ResumeIndex

ITEM_SCHEMA = pa.schema([("key", pa.string()), ("path", pa.binary()), ("expected_sha", pa.string())])
CHUNK = 65_536


def items_table(items: Iterable[InputItem], index: ResumeIndex | None = None) -> pa.Table:
    """Inputs with a path as an Arrow table (key, path, the content hash of the key's row in
    ``index`` or null)."""
    keys, paths = [], []
    for it in items:
        keys.append(it.key)
        paths.append(os.fsencode(it.path))
    k = pa.array(keys, pa.string())
    sha = index.expected_sha(k) if index is not None and index.num_rows else pa.nulls(len(k), pa.string())
    return pa.Table.from_arrays([k, pa.array(paths, pa.binary()), sha], schema=ITEM_SCHEMA)


def pending_items(archive, index: ResumeIndex, limit: int = 0) -> pa.Table:
    """The inputs of a folder, list or single-image archive (the first ``limit``) as one Arrow table, built in
    chunks: for a million paths about 6x less time and 4x less driver memory than a list of
    dicts handed to Ray (benchmarks/README.md)."""
    items = list_inputs(archive)
    parts = [items_table(chunk, index) for chunk in _chunks(itertools.islice(items, limit or None), CHUNK)]
    return pa.concat_tables(parts) if parts else ITEM_SCHEMA.empty_table()


def archive_datasource(path: str | os.PathLike, kind: str, min_rows: int = 64, key_column: str = "key",
                       image_column: str = "image"):
    """A Ray Data datasource whose read tasks list a list file or a folder tree, or read a
    Parquet archive, so that results start before the archive is listed and the driver never
    holds it; ``.parts`` holds one read task's share each. A list file is cut into byte ranges of
    about ``min_rows`` lines (at most 200: ``list_file_ranges``; only its size and head are read
    here), a folder tree into folders and shards of big folders (``folder_units``; only folder
    entries near the top are read here), each listed in blocks of 4,096 inputs (``min_rows`` if
    more); a Parquet archive into its files' row groups, read in blocks of 256 rows of key text
    (``key_texts``, as ``parquet_keys`` counts them) and image bytes. Ray's own Parquet reader
    gave its first block 12 s later here (it plans and samples the files first:
    benchmarks/README.md, "Ceiling"). Ray is imported here, by a run that uses it."""
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    path = Path(path)
    if kind == "list":
        next(list_file_items(path, 0, 0), None)  # a CSV list's header is checked here, not in a task
        parts = list_file_ranges(path, min_rows)
    elif kind == "folder":
        parts = folder_units(path, min_files=min_rows)
    elif kind == "parquet":
        import pyarrow.parquet as pq

        from cxrscreen.io.sources import parquet_files

        parts = [(str(f), g, key_column, image_column) for f in parquet_files(path)
                 for g in range(pq.ParquetFile(f).metadata.num_row_groups)]
    else:
        raise ValueError(f"{kind}: only list files, folder trees and Parquet are read by these tasks")

    class ArchiveListing(Datasource):
        def __init__(self):
            super().__init__()
            self.parts = parts

        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=(str(path),))
            return [ReadTask(functools.partial(_read_part, path, kind, part, max(min_rows, 4096)), meta,
                             per_task_row_limit=per_task_row_limit) for part in self.parts]

    return ArchiveListing()


def _read_part(path: Path, kind: str, part: tuple, block_rows: int) -> Iterator[pa.Table]:
    if kind == "parquet":
        import pyarrow.parquet as pq

        file, group, key_column, image_column = part
        for batch in pq.ParquetFile(file).iter_batches(batch_size=256, row_groups=[group],
                                                        columns=[key_column, image_column]):
            yield pa.table({"key": key_texts(batch.column(key_column)),
                            "data": batch.column(image_column).cast(pa.binary()),
                            "expected_sha": pa.nulls(batch.num_rows, pa.string())})
        return
    if kind == "list":
        items = list_file_items(path, *part)
    else:
        folder, recursive, shard, shards = part
        items = folder_items(path, Path(folder), recursive, shard=shard, shards=shards)
    for chunk in _chunks(items, block_rows):
        yield items_table(chunk)


def without_keys(items: pa.Table, keys: pa.Array) -> pa.Table:
    """Input rows less those whose key is in ``keys`` (the inputs the driver scores itself)."""
    return items.filter(pc.invert(pc.is_in(items["key"], value_set=keys))) if len(keys) else items


def pending_rows(batch: pa.Table, index: ResumeIndex, skip: pa.Array | None = None) -> pa.Table:
    """A streamed archive's rows with the content hash of their key's row in ``index`` (a resumed
    run), less the rows of ``skip`` (keys the driver scores itself)."""
    if skip is not None:
        batch = without_keys(batch, skip)
    return batch.set_column(batch.schema.get_field_index("expected_sha"), "expected_sha",
                            index.expected_sha(batch["key"]))


def check_parquet_columns(files: list[str], key_column: str, image_column: str) -> None:
    """Every Parquet input file has the key and image columns (row numbers are not stable keys)."""
    import pyarrow.parquet as pq

    for f in files:
        names = pq.ParquetFile(f).schema_arrow.names
        for col in (key_column, image_column):
            if col not in names:
                raise ArchiveError(f"{f}: Parquet archives need columns {key_column!r} and {image_column!r} "
                                 f"(has {names}); set key_column / image_column in the score config")


def key_texts(col) -> pa.Array:
    """A Parquet key column as the text each row's key becomes when its batch is scored: ``str``
    of the value as numpy gives it to the read tasks (int keys with nulls: '1.0', 'nan'); text
    keys without nulls as they are (no Python string per key)."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_string(col.type) and not col.null_count:
        return col
    return pa.array([str(k) for k in col.to_numpy(zero_copy_only=False)], pa.string())


def parquet_keys(files: list[str], key_column: str, image_column: str) -> pa.Array:
    """Keys of Parquet inputs as one Arrow text array (``key_texts``). ``ArchiveError`` unless
    the key column exists and every row has a key of its own: a key is a row's identity in OUT
    (resume, replacement), so a missing or repeated one would lose or swap rows."""
    import pyarrow.parquet as pq

    check_parquet_columns(files, key_column, image_column)
    keys = [pa.array([], pa.string())]
    for f in files:
        column = pq.read_table(f, columns=[key_column])[key_column]
        if column.null_count:
            raise ArchiveError(f"{f}: {column.null_count} rows have no {key_column!r} (null): every row needs a key")
        keys.append(key_texts(column))
    keys = pa.concat_arrays(keys)
    counts = pc.value_counts(keys)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        first = repeated[0].as_py()
        raise ArchiveError(f"{len(repeated)} {key_column!r} values occur in more than one row (e.g. "
                           f"{safe_text(str(first['values']))[:80]!r}, {first['counts']} rows): every row needs a key "
                           "of its own")
    return keys


HEAD_MAX_BYTES = 256 << 20  # the driver reads a Parquet archive's first rows only from a row group this small


def parquet_head_items(files: list[str], key_column: str, image_column: str, n: int) -> list[InputItem]:
    """The first ``n`` rows of Parquet inputs in file order, as items with their image bytes and
    their ``key_texts``; none when the first row group's images exceed ``HEAD_MAX_BYTES``
    compressed (pyarrow reads a whole row group: the driver would hold it before Ray starts)."""
    import pyarrow.parquet as pq

    items: list[InputItem] = []
    for f in files:  # only the files it reads are checked here (``parquet_keys`` checks them all)
        check_parquet_columns([f], key_column, image_column)
        pf = pq.ParquetFile(f)
        if pf.metadata.num_row_groups:
            group = pf.metadata.row_group(0)
            image = [group.column(i).path_in_schema for i in range(group.num_columns)].index(image_column)
            if group.column(image).total_compressed_size > HEAD_MAX_BYTES:
                return []
        for batch in pf.iter_batches(batch_size=max(n, 1), columns=[key_column, image_column]):
            keys = key_texts(batch[key_column]).to_pylist()
            for key, data in zip(keys, batch[image_column].to_pylist()):
                if len(items) == n:
                    return items
                items.append(InputItem(key, data=data))
    return items


def input_key_chunks(archive, kind: str, limit: int = 0, key_column: str = "key",
                     image_column: str = "image", chunk: int = CHUNK) -> Iterator[pa.Array]:
    """Every input key of ``archive`` (the first ``limit``), in chunks of ``chunk`` keys (at
    least 65,536): what a run accounts for at its end, in bounded memory (no image bytes read)."""
    chunk = max(chunk, CHUNK)
    if kind == "parquet":
        from cxrscreen.io.sources import parquet_files

        keys = parquet_keys([str(f) for f in parquet_files(Path(archive))], key_column, image_column)
        keys = keys[:limit or None]
        for i in range(0, len(keys), chunk):
            yield keys[i:i + chunk]
        return
    for items in _chunks(itertools.islice(list_inputs(archive), limit or None), chunk):
        yield pa.array([it.key for it in items], pa.string())


def _chunks(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk
