import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cxrscreen.data.synth import encode_dicom, encode_png, make_phantom
from cxrscreen.io import list_inputs
from cxrscreen.io.errors import ArchiveError
from cxrscreen.io.sources import archive_kind

IMG = make_phantom("normal", 32, 0).image


def _tree(root):
    for rel in ("COVID/a.png", "Normal/b.png", "Viral Pneumonia/c.png", "Lung_Opacity/d.png",
                "chest_xray/train/NORMAL/e.png", "chest_xray/test/PNEUMONIA/f.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(encode_png(IMG))
    (root / "COVID" / "IM0001").write_bytes(encode_dicom(IMG, "m2_8bit"))  # extension-less DICOM
    u8 = (IMG * 255).astype(np.uint8)
    (root / "Normal" / "g.pgm").write_bytes(b"P5\n%d %d\n255\n" % u8.shape[::-1] + u8.tobytes())  # `ingest --pixels pgm`
    (root / "COVID" / "notes.txt").write_text("not an input")
    (root / "COVID" / "README").write_text("extension-less, not DICOM")
    (root / ".hidden.png").write_bytes(b"x")


def test_folder_tree_recursive_with_labels(tmp_path):
    _tree(tmp_path)
    items = list(list_inputs(tmp_path, labels_from_folders=True))
    got = {it.key: it.label for it in items}
    assert got == {
        "COVID/IM0001": "covid", "COVID/a.png": "covid", "Lung_Opacity/d.png": "lung_opacity",
        "Normal/b.png": "normal", "Normal/g.pgm": "normal", "Viral Pneumonia/c.png": "viral_pneumonia",
        "chest_xray/test/PNEUMONIA/f.png": "pneumonia", "chest_xray/train/NORMAL/e.png": "normal",
    }
    assert [it.key for it in items] == [it.key for it in list_inputs(tmp_path)]  # deterministic order
    custom = {it.key: it.label for it in list_inputs(tmp_path, True, {"COVID": "positive"})}
    assert custom["COVID/a.png"] == "positive" and custom["Normal/b.png"] is None


def test_list_files(tmp_path):
    _tree(tmp_path)
    (tmp_path / "list.txt").write_text("# comment\nCOVID/a.png\n\nNormal/b.png\nmissing.png\n")
    items = list(list_inputs(tmp_path / "list.txt"))
    assert [it.key for it in items] == ["COVID/a.png", "Normal/b.png", "missing.png"]
    assert items[0].path == str(tmp_path / "COVID/a.png")
    (tmp_path / "list.csv").write_text("path,label\nCOVID/a.png,covid\nNormal/b.png,normal\n")
    assert [(it.key, it.label) for it in list_inputs(tmp_path / "list.csv")] == [
        ("COVID/a.png", "covid"), ("Normal/b.png", "normal")]


def test_list_file_ranges_yield_every_input_exactly_once(tmp_path):
    from cxrscreen.io.sources import list_file_items, list_file_ranges

    rng = np.random.default_rng(0)
    txt = tmp_path / "list.txt"
    txt.write_bytes("".join(rng.choice(["# note\n", "\n", "  \n"]) if i % 7 == 3 else f"d{i % 5}/ö{i:0{i % 9 + 1}d}.png\r\n"
                            for i in range(300)).encode() + b"caf\xe9.png\n")  # a Latin-1 name
    csv_list = tmp_path / "list.csv"
    csv_list.write_text("label,path\n" + "".join(f'normal,"a,{i}.png"\n' for i in range(200)))
    for path in (txt, csv_list):
        whole = [(it.key, it.path, it.label) for it in list_inputs(path)]
        assert len(whole) in (258, 200) and whole == [(it.key, it.path, it.label) for it in list_file_items(path)]
        size = path.stat().st_size
        for cuts in ([0, size], *(sorted({0, size, *rng.integers(0, size, k).tolist()}) for k in (1, 5, 40, 300))):
            pieces = [(it.key, it.path, it.label) for a, b in zip(cuts, cuts[1:]) for it in list_file_items(path, a, b)]
            assert pieces == whole  # any tiling, even mid-line or mid-character cuts, gives each line once
        ranges = list_file_ranges(path, min_lines=16)
        assert ranges[0][0] == 0 and ranges[-1][1] == size and all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))
        assert 8 <= len(ranges) <= 40  # about 16 lines each
        assert [(it.key, it.path, it.label) for a, b in ranges for it in list_file_items(path, a, b)] == whole
    assert len(list_file_ranges(txt, min_lines=1, max_ranges=3)) == 3
    cr = tmp_path / "cr.txt"
    cr.write_bytes(b"a.png\rb.png\r\n# c.png\rd.png")  # old Mac line ends, mixed
    assert [it.key for it in list_inputs(cr)] == ["a.png", "b.png", "d.png"]
    no_path = tmp_path / "bad.csv"
    no_path.write_text("file,label\na.png,normal\n")
    from cxrscreen.pipeline.listing import archive_datasource

    with pytest.raises(ValueError, match="'path' column"):  # on the driver, before any read task
        archive_datasource(no_path, "list")
    latin = list(list_inputs(txt))[-1]  # kept as a path, escaped in the key
    assert latin.key == "caf\\xe9.png" and os.fsencode(latin.path).endswith(b"caf\xe9.png")


def test_folder_units_tile_the_tree_whatever_its_shape(tmp_path):
    """However a tree is cut into read tasks' folders, every image is listed exactly once, with
    the key and label the driver's walk gives it; only the top folders are opened to cut it."""
    from cxrscreen.io.sources import folder_items, folder_units
    from cxrscreen.pipeline.listing import _read_part, archive_datasource

    _tree(tmp_path)
    for i in range(30):  # a wide folder and a deep one
        (tmp_path / "wide" / f"{i:02d}").mkdir(parents=True)
        (tmp_path / "wide" / f"{i:02d}" / f"{i}.png").write_bytes(b"x")
    deep = tmp_path / "deep" / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "z.dcm").write_bytes(b"x")
    (tmp_path / "root.jpg").write_bytes(b"x")
    (tmp_path / ".hidden" / "x").mkdir(parents=True)
    (tmp_path / ".hidden" / "x" / "h.png").write_bytes(b"x")
    (tmp_path / "linked").symlink_to(tmp_path / "wide", target_is_directory=True)  # not followed
    whole = [(it.key, it.path, it.label) for it in list_inputs(tmp_path, labels_from_folders=True)]
    assert len(whole) == 40 and not any(k.startswith((".hidden", "linked")) for k, *_ in whole)
    labels = {"covid": "covid", "normal": "normal"}
    for min_units, min_files in ((1, 64), (2, 64), (5, 1), (40, 2), (1000, 1)):
        units = folder_units(tmp_path, min_units=min_units, min_files=min_files)
        assert min_units == 1 or len(units) >= min(min_units, 8)  # the root opened: 1 + 7 folders
        got = [(it.key, it.path, it.label) for f, rec, i, k in units
               for it in folder_items(tmp_path, Path(f), rec, label_map=None, shard=i, shards=k)]
        assert sorted(k for k, *_ in got) == sorted(k for k, *_ in whole)  # each once
        assert sorted(got) == sorted((k, p, None) for k, p, _ in whole)
        lab = {it.key: it.label for f, rec, i, k in units for it in folder_items(tmp_path, Path(f), rec, labels, i, k)}
        assert lab["COVID/a.png"] == "covid" and lab["chest_xray/train/NORMAL/e.png"] == "normal"
    assert folder_units(tmp_path, min_units=1) == [(str(tmp_path), True, 0, 1)]  # nothing opened
    source = archive_datasource(tmp_path, "folder", min_rows=2)
    blocks = [t for part in source.parts for t in _read_part(tmp_path, "folder", part, 4)]
    assert all(t.num_rows <= 4 for t in blocks) and sum(t.num_rows for t in blocks) == 40
    assert sorted(k for t in blocks for k in t["key"].to_pylist()) == sorted(k for k, *_ in whole)
    flat = tmp_path / "wide" / "00"
    for i in range(200):
        (flat / f"x{i:03d}.png").write_bytes(b"x")
    shards = [u for u in folder_units(flat, min_files=16) if not u[1]]
    assert len(shards) == 12 and {k for *_, k in shards} == {12}  # a flat folder: parallel shards
    keys = [it.key for f, rec, i, k in shards for it in folder_items(flat, Path(f), rec, shard=i, shards=k)]
    assert sorted(keys) == sorted(it.key for it in list_inputs(flat)) and len(keys) == 201
    assert len(folder_units(tmp_path, min_units=1000, max_entries=3)) < 10  # stops after a few entries


def test_parquet_rows(phantom_archive):
    pq = phantom_archive / "phantoms.parquet"
    assert archive_kind(pq) == "parquet"
    items = list(list_inputs(pq))
    df = pl.read_parquet(pq)
    assert [it.key for it in items] == df["key"].to_list()
    assert items[0].data == df["image"][0] and items[0].label == df["label"][0]


def test_non_utf8_file_names_become_ordinary_rows_with_escaped_keys(tmp_path):
    import os

    from cxrscreen.data.synth import encode_png, make_phantom
    from cxrscreen.io.batch import decode_batch
    from cxrscreen.pipeline.output import batch_to_table, output_schema

    raw = b"caf\xe9 \xff.png"
    (tmp_path / os.fsdecode(raw)).write_bytes(encode_png(make_phantom("normal", 64, 1).image))
    items = list(list_inputs(tmp_path))
    assert [it.key for it in items] == ["caf\\xe9 \\xff.png"]
    assert os.fsencode(items[0].path).endswith(raw)  # the real name is kept for reading
    b = decode_batch({"key": [items[0].key], "path": [os.fsencode(items[0].path)]})
    assert b["status"][0] == "ok" and b["source_path"][0].endswith("caf\\xe9 \\xff.png")
    table = batch_to_table(b, output_schema(["a"]))  # valid Arrow text: no UnicodeEncodeError
    assert table["key"].to_pylist() == ["caf\\xe9 \\xff.png"]


def test_parquet_keys_are_the_keys_rows_get(tmp_path):
    """The keys the driver counts a Parquet archive by, and those of the first rows it scores
    itself, are the text its rows' keys become when a batch is scored (``str`` of each value as
    numpy gives it): float ids, int ids, float32 and plain text alike; the read tasks skip the
    driver's keys. A key missing (null) or repeated is refused: it would lose or swap rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cxrscreen.pipeline.listing import _read_part, parquet_head_items, parquet_keys, pending_rows
    from cxrscreen.pipeline.output import output_index

    def read(path, skip=()):  # what the read tasks of a Parquet archive give the decode tasks
        tables = [pending_rows(t, empty, pa.array(list(skip), pa.string()))
                  for t in _read_part(path, "parquet", (str(path), 0, "key", "image"), 16)]
        return pa.concat_tables(tables).to_pydict()

    empty = output_index(tmp_path / "no-out")
    cols = {"f": pa.array([1.0, 2.5, 4.0]), "t": pa.array(["x", "y", "z"]),
            "i": pa.array([1, 2, 3], pa.int64()), "f32": pa.array([0.1, 0.2, 0.3], pa.float32())}
    for name, keys in cols.items():
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"key": keys, "image": pa.array([b"1", b"2", b"3"])}), path)
        rows = read(path)
        assert parquet_keys([str(path)], "key", "image").to_pylist() == rows["key"], name
        assert rows["key"] == [str(k) for k in pq.read_table(path)["key"].to_numpy()], name  # str of each value
        head = parquet_head_items([str(path)], "key", "image", 2)
        assert [it.key for it in head] == rows["key"][:2] and [it.data for it in head] == [b"1", b"2"], name
        rest = read(path, skip=[it.key for it in head])
        assert rest["key"] == rows["key"][2:] and rest["data"] == [b"3"] and rest["expected_sha"] == [None], name
    assert parquet_keys([str(tmp_path / "f.parquet")], "key", "image").to_pylist() == ["1.0", "2.5", "4.0"]
    with pytest.raises(ArchiveError, match="need columns"):
        parquet_head_items([str(tmp_path / "t.parquet")], "nokey", "image", 2)
    for name, keys, why in (("null", pa.array(["a", None, "c"]), "1 rows have no 'key'"),
                            ("nullint", pa.array([1, None, 3]), "1 rows have no 'key'"),
                            ("dup", pa.array(["a", "b", "a"]), r"1 'key' values occur in more than one row \(e.g. 'a', 2")):
        pq.write_table(pa.table({"key": keys, "image": pa.array([b"1", b"2", b"3"])}), tmp_path / f"{name}.parquet")
        with pytest.raises(ArchiveError, match=why):
            parquet_keys([str(tmp_path / f"{name}.parquet")], "key", "image")
    # a key repeated across two files of one archive too
    with pytest.raises(ArchiveError, match="more than one row"):
        parquet_keys([str(tmp_path / "t.parquet"), str(tmp_path / "t.parquet")], "key", "image")


def test_the_driver_reads_no_parquet_head_from_a_huge_row_group(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    import cxrscreen.pipeline.listing as listing

    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"key": ["a", "b"], "image": [os.urandom(1000), os.urandom(1000)]}), path)
    assert len(listing.parquet_head_items([str(path)], "key", "image", 2)) == 2
    monkeypatch.setattr(listing, "HEAD_MAX_BYTES", 100)  # the first row group's images are bigger
    assert listing.parquet_head_items([str(path)], "key", "image", 2) == []


@pytest.mark.timeout(60)
def test_special_files_and_link_loops_neither_hang_nor_stop_the_listing(tmp_path):
    """A FIFO without a suffix is checked for DICOM magic without blocking (it is no image), and a
    link loop at the top of a tree does not stop what the driver checks of the tree (``_seen``)."""
    from cxrscreen.io.sources import has_dicom_magic
    from cxrscreen.pipeline.score import _seen

    (tmp_path / "a.png").write_bytes(encode_png(IMG))
    os.mkfifo(tmp_path / "scan")  # nobody writes to it: a blocking open would wait forever
    os.symlink(tmp_path / "l2.png", tmp_path / "l1.png")
    os.symlink(tmp_path / "l1.png", tmp_path / "l2.png")
    (tmp_path / "sub").mkdir()
    assert not has_dicom_magic(tmp_path / "scan")
    assert [it.key for it in list_inputs(tmp_path)] == ["a.png", "l1.png", "l2.png"]  # the loops: error rows later
    assert _seen(tmp_path) == (str(tmp_path), [str(tmp_path / "sub")], -1)


def test_inputs_have_absolute_paths_whatever_the_archive_path(tmp_path, monkeypatch):
    """``source_path`` is absolute for every row: the driver's own first batch lists the archive
    as the read tasks do (they get its absolute path)."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(encode_png(IMG))
    (tmp_path / "list.txt").write_text("imgs/a.png\n")
    monkeypatch.chdir(tmp_path)
    for archive, key in (("imgs", "a.png"), ("list.txt", "imgs/a.png"), ("imgs/a.png", "a.png")):
        (item,) = list_inputs(archive)
        assert item.key == key and os.path.isabs(item.path) and Path(item.path).samefile(tmp_path / "imgs" / "a.png")
