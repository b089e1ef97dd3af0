import polars as pl

from cxrscreen.data.synth import encode_dicom, encode_png, make_phantom
from cxrscreen.io import list_inputs
from cxrscreen.io.sources import archive_kind

IMG = make_phantom("normal", 32, 0).image


def _tree(root):
    for rel in ("COVID/a.png", "Normal/b.png", "Viral Pneumonia/c.png", "Lung_Opacity/d.png",
                "chest_xray/train/NORMAL/e.png", "chest_xray/test/PNEUMONIA/f.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(encode_png(IMG))
    (root / "COVID" / "IM0001").write_bytes(encode_dicom(IMG, "m2_8bit"))  # extension-less DICOM
    (root / "COVID" / "notes.txt").write_text("not an input")
    (root / "COVID" / "README").write_text("extension-less, not DICOM")
    (root / ".hidden.png").write_bytes(b"x")


def test_folder_tree_recursive_with_labels(tmp_path):
    _tree(tmp_path)
    items = list(list_inputs(tmp_path, labels_from_folders=True))
    got = {it.key: it.label for it in items}
    assert got == {
        "COVID/IM0001": "covid", "COVID/a.png": "covid", "Lung_Opacity/d.png": "lung_opacity",
        "Normal/b.png": "normal", "Viral Pneumonia/c.png": "viral_pneumonia",
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
