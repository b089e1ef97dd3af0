import io
import pickle

import numpy as np
import pydicom
import pytest

from cxrscreen.data.synth import (DICOM_VARIANTS, encode_dicom, encode_jpeg, encode_png, make_phantom,
                                  write_bad_inputs)
from cxrscreen.io import DecodeOptions, ImageError, decode_image, read_bytes
from cxrscreen.io.batch import decode_items
from cxrscreen.io.sources import InputItem
from tests.conftest import shared_path

PHANTOM = make_phantom("covid", 96, seed=7).image


@pytest.mark.parametrize("variant", DICOM_VARIANTS)
def test_dicom_variants_reproduce_the_image(variant):
    d = decode_image(encode_dicom(PHANTOM, variant))
    assert d.format == "dicom" and d.pixels.dtype == np.float32
    assert np.abs(d.pixels - PHANTOM).max() < 0.003  # MONOCHROME1 inverted, modality + VOI applied


def test_prefer_lut_chooses_between_voi_lut_and_window():
    data = encode_dicom(PHANTOM, "m1_16bit_voilut")
    assert decode_image(data).meta["voi"] == "file VOI LUT"
    by_window = decode_image(data, DecodeOptions(prefer_lut=False))
    assert by_window.meta["voi"].startswith("file window")
    assert np.abs(by_window.pixels - PHANTOM).max() > 0.3  # the decoy window, really applied


def test_explicit_window_overrides_file():
    # modality values span [-976, 3024]; a narrow window saturates most of the image
    d = decode_image(encode_dicom(PHANTOM, "m2_16bit_window"), DecodeOptions(window=(0.0, 100.0)))
    assert d.meta["voi"].startswith("explicit")
    assert ((d.pixels == 0) | (d.pixels == 1)).mean() > 0.9


def test_phi_dropped_unless_asked():
    data = encode_dicom(PHANTOM, "m2_8bit", patient_id="SECRET-42")
    meta = decode_image(data).meta
    assert not any("Patient" in k for k in meta) and "SECRET-42" not in str(meta)
    assert meta["dicom_ViewPosition"] == "PA" and meta["dicom_Modality"] == "DX"
    assert meta["pixel_spacing_mm"] == 0.5 and meta["dicom_StudyInstanceUID"]
    with_phi = decode_image(data, DecodeOptions(include_phi=True)).meta
    assert with_phi["dicom_PatientID"] == "SECRET-42"


def test_png_8_and_16_bit_and_jpeg():
    assert np.abs(decode_image(encode_png(PHANTOM)).pixels - PHANTOM).max() <= 0.5 / 255 + 1e-6
    d16 = decode_image(encode_png(PHANTOM, bits=16))
    assert d16.meta["bits"] == 16 and np.abs(d16.pixels - PHANTOM).max() < 1e-4
    assert np.abs(decode_image(encode_jpeg(PHANTOM)).pixels - PHANTOM).mean() < 0.02


def test_plain_8_bit_png_and_pgm_skip_pillow_with_the_same_pixels():
    from PIL import Image

    from cxrscreen.io.decode import _plain_8bit

    u8 = np.rint(PHANTOM * 255).astype(np.uint8)
    for fmt, sniffed in (("PNG", "png"), ("PPM", "pgm")):
        buf = io.BytesIO()
        Image.fromarray(u8).save(buf, format=fmt)
        assert _plain_8bit(buf.getvalue(), sniffed, 10**8) is not None  # the fast path ...
        d = decode_image(buf.getvalue())
        assert d.format == sniffed and d.data.dtype == np.uint8 and (d.data == u8).all()  # ... Pillow's pixels
        assert d.data.flags.writeable and d.meta == {"width": 96, "height": 96, "bits": 8, "source_mode": "L"}
        with pytest.raises(ImageError) as e:  # the pixel limit holds on the fast path too
            decode_image(buf.getvalue(), DecodeOptions(max_pixels=95 * 96))
        assert e.value.kind == "too_large"
    rotated = io.BytesIO()  # an EXIF orientation (rotate 90) in a PNG: Pillow's path, which applies it
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(u8[:, :80]).save(rotated, format="PNG", exif=exif.tobytes())
    assert _plain_8bit(rotated.getvalue(), "png", 10**8) is None
    assert decode_image(rotated.getvalue()).data.shape == (80, 96)
    rgb = io.BytesIO()
    Image.fromarray(np.stack([u8] * 3, -1)).save(rgb, format="PNG")
    assert _plain_8bit(rgb.getvalue(), "png", 10**8) is None and (decode_image(rgb.getvalue()).data == u8).all()
    from PIL.PngImagePlugin import PngInfo

    texted = io.BytesIO()  # text chunks may carry an orientation (XMP): Pillow's path
    info = PngInfo()
    info.add_text("Comment", "x")
    Image.fromarray(u8).save(texted, format="PNG", pnginfo=info)
    assert _plain_8bit(texted.getvalue(), "png", 10**8) is None and (decode_image(texted.getvalue()).data == u8).all()
    plain = io.BytesIO()
    Image.fromarray(u8).save(plain, format="PNG")
    p = plain.getvalue()
    gama = b"gAMA" + (45455).to_bytes(4, "big")
    bad_crc = p[:33] + len(gama[4:]).to_bytes(4, "big") + gama + b"\0\0\0\0" + p[33:]  # an ancillary chunk, wrong CRC
    assert _plain_8bit(bad_crc, "png", 10**8) is None
    with pytest.raises(ImageError) as e:  # Pillow refuses it, as before the fast path
        decode_image(bad_crc)
    assert e.value.kind == "decode_failed"
    with pytest.raises(ImageError):  # a PGM of no pixels is not an image
        decode_image(b"P5\n0 4\n255\n")


def test_pgm_8_and_16_bit_and_cut_pgm():
    from PIL import Image

    u8 = np.rint(PHANTOM * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="PPM")
    data = buf.getvalue()
    d = decode_image(data)
    assert d.format == "pgm" and d.meta["bits"] == 8 and (np.rint(d.pixels * 255) == u8).all()
    assert d.data.dtype == np.uint8 and (d.data == u8).all()  # 8 bits kept as read: no float round trip
    scored = decode_items([InputItem("a", data=data)], work_size=u8.shape[0])
    assert (scored["image"][0] == u8).all() and scored["status"][0] == "ok"
    with pytest.raises(ImageError) as e:
        decode_image(data[:-10])
    assert e.value.kind == "truncated"
    from cxrscreen.io.decode import _plain_8bit

    commented = b"P5\n# made by a scanner\n%d %d # size\n255\n" % u8.shape[::-1] + u8.tobytes()  # comments: Netpbm allows
    assert (decode_image(commented).data == u8).all() and _plain_8bit(commented, "pgm", 1 << 30) is not None
    with pytest.raises(ImageError) as e:
        decode_image(commented[:-10])
    assert e.value.kind == "truncated"
    crlf = b"P5\r\n%d %d\r\n255\n" % u8.shape[::-1] + u8.tobytes()  # one whitespace byte after maxval
    assert (decode_image(crlf).data == u8).all()
    plain = decode_image(b"P2\n# plain text\n3 2\n255\n0 10 20\n30 40 255\n")  # plain PGM: Pillow's path
    assert plain.format == "pgm" and plain.data.tolist() == [[0, 10, 20], [30, 40, 255]]
    with pytest.raises(ImageError) as e:  # a header number Python cannot parse is a broken file, not a crash
        decode_image(b"P5\n" + b"9" * 5000 + b" 2\n255\n" + bytes(8))
    assert e.value.kind in ("decode_failed", "truncated")
    twelve = (PHANTOM * 4095).astype(np.uint16)  # a 16-bit PGM whose maxval (white) is 4095
    d16 = decode_image(b"P5\n%d %d\n4095\n" % twelve.shape[::-1] + twelve.astype(">u2").tobytes())
    assert d16.meta["bits"] == 16 and np.abs(d16.pixels - twelve / 4095).max() < 1e-4
    flat = decode_image(b"P5\n4 4\n4095\n" + b"\x0f\xff" * 16)  # every pixel at maxval: white
    assert np.allclose(flat.pixels, 1.0)
    with pytest.raises(ImageError) as e:
        decode_image(b"P5 is a text file, not an image")
    assert e.value.kind == "decode_failed"


def test_colour_png_becomes_gray():
    from PIL import Image

    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 255
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    d = decode_image(buf.getvalue())
    assert d.pixels.shape == (8, 8) and abs(float(d.pixels.mean()) - 0.299) < 0.01  # ITU-R 601 luma


def test_extensionless_and_raw_dicom_detected():
    data = encode_dicom(PHANTOM, "m2_8bit")
    assert decode_image(data, name="noext").format == "dicom"
    raw = data[132:]  # no preamble: only recognised by the .dcm name hint
    with pytest.raises(ImageError):
        decode_image(raw, name="noext")


def test_every_bad_input_kind(tmp_path):
    expected = write_bad_inputs(tmp_path)
    assert len(set(expected.values())) >= 7
    for name, kind in expected.items():
        with pytest.raises(ImageError) as err:
            decode_image(read_bytes(tmp_path / name), name=name)
        assert err.value.kind == kind, (name, err.value)
        assert err.value.reason


def test_missing_directory_and_limits(tmp_path):
    with pytest.raises(ImageError, match="missing"):
        read_bytes(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="unreadable"):
        read_bytes(tmp_path)
    with pytest.raises(ImageError) as err:
        decode_image(encode_png(PHANTOM), DecodeOptions(max_pixels=1000))
    assert err.value.kind == "too_large"
    with pytest.raises(ImageError) as err:
        decode_image(encode_dicom(PHANTOM, "m2_8bit"), DecodeOptions(max_pixels=1000))
    assert err.value.kind == "too_large"


def test_unsupported_transfer_syntax():
    ds = pydicom.dcmread(io.BytesIO(encode_dicom(PHANTOM, "m2_8bit")))
    from pydicom.encaps import encapsulate

    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG-2: no decoder exists
    ds.PixelData = encapsulate([ds.PixelData])
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(ImageError) as err:
        decode_image(buf.getvalue())
    assert err.value.kind == "unsupported_transfer_syntax"


def test_image_error_pickles():
    e = pickle.loads(pickle.dumps(ImageError("truncated", "half a file")))
    assert e.kind == "truncated" and e.reason == "half a file"


def _rg1(name):
    pytest.importorskip("data_store", reason="pydicom-data is not installed")
    from pydicom.data import get_testdata_file

    path = get_testdata_file(f"{name}.dcm")
    if path is None:
        pytest.skip(f"{name}.dcm not shipped by the installed pydicom-data")
    return read_bytes(path)


@pytest.mark.parametrize("name,lossless", [("RG1_UNCR", True), ("RG1_UNCI", False),
                                           ("RG1_J2KR", True), ("RG1_J2KI", False)])
def test_pydicom_data_chest_cr_in_four_encodings(name, lossless):
    d = decode_image(_rg1(name))
    assert d.pixels.shape == (1955, 1841) and d.meta["dicom_PhotometricInterpretation"] == "MONOCHROME1"
    assert d.meta["voi"].startswith("file window c=15000")
    reference = decode_image(_rg1("RG1_UNCR" if lossless else "RG1_UNCI")).pixels
    if lossless:
        assert np.array_equal(d.pixels, reference)  # J2K lossless == uncompressed
    else:
        assert np.abs(d.pixels - reference).mean() < 0.01
    # MONOCHROME1: dense (high stored value) tissue is displayed bright after inversion
    raw = pydicom.dcmread(io.BytesIO(_rg1(name))).pixel_array.astype(float)
    hi = raw > np.percentile(raw, 90)
    lo = raw < np.percentile(raw, 10)
    assert d.pixels[hi].mean() < d.pixels[lo].mean()


def test_shared_dicom_files():
    folder = shared_path("dicom")
    normal = decode_image(read_bytes(folder / "txv_CR_chest_PA_RSNA-16d7f894.dcm"))
    fake_m1 = decode_image(read_bytes(folder / "txv_CR_chest_PA_RSNA-16d7f894_FAKE-MONOCHROME1.dcm"))
    assert normal.meta["transfer_syntax"] == "JPEG Baseline (Process 1)"
    assert np.allclose(fake_m1.pixels, 1.0 - normal.pixels, atol=1e-6)
    nih = decode_image(read_bytes(folder / "nhsx_DX_chest_NIH-NoFinding_Covid0000.dcm"))
    assert nih.pixels.shape == (1024, 1024) and "Covid0000" not in str(nih.meta)
    for d in (normal, fake_m1, nih):
        assert 0.0 <= d.pixels.min() and d.pixels.max() <= 1.0 and d.pixels.std() > 0.1


def test_special_and_oversized_files_are_error_rows_without_blocking(tmp_path):
    import os

    from cxrscreen.io.batch import decode_items
    from cxrscreen.io.sources import InputItem

    os.mkfifo(tmp_path / "pipe.png")  # nothing ever writes to it: a blocking read would hang
    (tmp_path / "good.png").write_bytes(encode_png(PHANTOM))
    (tmp_path / "big.png").write_bytes(encode_png(PHANTOM) + b"\0" * 5000)
    with pytest.raises(ImageError) as e:
        read_bytes(tmp_path / "pipe.png")
    assert e.value.kind == "unreadable" and "regular file" in e.value.reason
    with pytest.raises(ImageError) as e:
        read_bytes(tmp_path / "big.png", max_bytes=4000)
    assert e.value.kind == "too_large"
    items = [InputItem(n, str(tmp_path / n)) for n in ("pipe.png", "good.png", "big.png")]
    b = decode_items(items, max_bytes=len(encode_png(PHANTOM)) + 10)
    assert list(b["status"]) == ["error", "ok", "error"]
    assert list(b["error_type"]) == ["unreadable", None, "too_large"]
    # a Parquet row whose image is null: neither bytes nor a path, an error row of its own
    b = decode_items([InputItem("null", data=None), InputItem("ok", data=encode_png(PHANTOM))])
    assert list(b["key"]) == ["null", "ok"] and list(b["status"]) == ["error", "ok"]
    assert b["error_type"][0] == "missing" and "null" in b["error_message"][0]
    from cxrscreen.io.batch import decode_batch  # a block of only null images, as Ray hands it over: NaN

    b = decode_batch({"key": np.array(["n1", "n2"], object), "data": np.full(2, np.nan, np.float32)})
    assert list(b["error_type"]) == ["missing", "missing"] and list(b["sha256"]) == ["", ""]


def test_only_allow_listed_raster_formats_are_opened():
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((PHANTOM * 255).astype(np.uint8)).save(buf, format="GIF")
    with pytest.raises(ImageError) as e:
        decode_image(buf.getvalue(), name="renamed.png")
    assert e.value.kind == "not_image"
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageError) as e:
        decode_image(eps, name="figure.png")
    assert e.value.kind == "not_image"


def test_high_bit_depth_containers_use_the_significant_bits():
    from PIL import Image

    twelve = np.rint(PHANTOM * 4095).astype(np.uint16)  # 12-bit data in a 16-bit PNG
    buf = io.BytesIO()
    Image.fromarray(twelve).save(buf, format="PNG")
    d = decode_image(buf.getvalue())
    assert d.meta["bits"] == 12 and np.abs(d.pixels - twelve / 4095).max() < 1e-6
    wide = (PHANTOM * 1e6).astype(np.int32) - 5000  # 32-bit integer TIFF: its own range
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="TIFF")
    d = decode_image(buf.getvalue())
    assert d.pixels.min() == 0 and d.pixels.max() == pytest.approx(1) and np.corrcoef(d.pixels.ravel(), PHANTOM.ravel())[0, 1] > 0.999


def _issue_17_10_cases() -> dict[str, tuple[bytes, str, str]]:
    """name -> (bytes, expected kind, a word the message must contain)."""
    import io

    import pydicom

    from cxrscreen.data.synth import encode_jpeg, encode_png

    png, jpeg = encode_png(PHANTOM), encode_jpeg(PHANTOM)
    dcm = encode_dicom(PHANTOM, "m2_16bit_window")
    name_at = dcm.index(b"PHANTOM")
    flipped_png = bytearray(png)
    flipped_png[20] ^= 0xFF  # inside IHDR: width
    flipped_jpeg = bytearray(jpeg)
    sof = jpeg.index(b"\xff\xc0")
    flipped_jpeg[sof + 4] ^= 0xFF  # precision byte of the frame header
    ds = pydicom.dcmread(io.BytesIO(encode_dicom(PHANTOM, "m2_16bit_window")))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7  # 16-bit data behind an 8-bit header
    eight = io.BytesIO()
    ds.save_as(eight, enforce_file_format=True)
    return {
        "png_named.dcm": (png, "ok", ""),
        "random.dcm": (bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)), "not_image", "signature"),
        "cut_in_header.dcm": (dcm[:name_at + 4], "truncated", "ends inside"),
        "cut_in_pixels.dcm": (dcm[:-1000], "truncated", "Pixel Data"),
        "png_ihdr_flipped.png": (bytes(flipped_png), "decode_failed", "corrupt"),
        "jpeg_header_flipped.jpg": (bytes(flipped_jpeg), "decode_failed", "corrupt"),
        "png_cut.png": (png[:len(png) // 2], "truncated", "cut short"),
        "bits8_with_16bit_data.dcm": (eight.getvalue(), "decode_failed", "BitsAllocated"),
        "window_not_a_number.dcm": (dcm.replace(b"\x28\x00\x50\x10DS", b"\x28\x00\x50\x10DS", 1)
                                    .replace(b"1024.5", b"abcdef", 1), "decode_failed", "WindowCenter"),
    }


@pytest.mark.parametrize("name", list(_issue_17_10_cases()))
def test_error_kinds_come_from_the_content_and_messages_name_the_field(name):
    """Issue 17.10: the format is sniffed from the bytes; truncated only when the file ends early;
    every message says what is wrong in words (and names the DICOM element)."""
    data, kind, word = _issue_17_10_cases()[name]
    if kind == "ok":
        assert decode_image(data, name=name).format == "png"
        return
    with pytest.raises(ImageError) as e:
        decode_image(data, name=name)
    assert e.value.kind == kind, e.value
    assert word in e.value.reason, e.value.reason
    assert "abcdef" not in e.value.reason  # values are never quoted


def test_a_value_with_both_kinds_of_quote_is_not_quoted_either():
    """pydicom's messages quote values with repr: one holding both ' and " is escaped inside its
    quotes, and the whole value is hidden, not only its first part."""
    import io

    ds = pydicom.dcmread(io.BytesIO(encode_dicom(PHANTOM, "m2_16bit_window")))
    ds.PhotometricInterpretation = 'X\'Y"DOE^JOHN'
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(ImageError) as e:
        decode_image(buf.getvalue(), name="x.dcm")
    assert "PhotometricInterpretation" in e.value.reason and "DOE" not in e.value.reason, e.value.reason


@pytest.mark.parametrize("message, scrubbed", [
    ("pixel data doesn't match the expected length - 123 vs 456", "pixel data doesn't match the expected length - 123 vs 456"),
    ("The dataset's transfer syntax 'DOE^JOHN' doesn't match", "The dataset's transfer syntax <value> doesn't match"),
    ("name 'O'BRIEN^PAT' here", "name <value> here"),
    ("value 'ABC' and b'DEF' and \"GHI\" end", "value <value> and <value> and <value> end"),
    ("cut 'DOE^JOHN rest", "cut <value>"),
])
def test_scrub_hides_quoted_values_and_keeps_words(message, scrubbed):
    from cxrscreen.io.decode import _scrub

    assert _scrub(message) == scrubbed


def test_columns_ray_turned_into_nan_come_back_as_nulls():
    """Ray Data hands a text or bytes column that is None in every row of a block (a block of
    unreadable files has no masks) back as float NaN; ``restore_nulls`` makes it None again, so
    that the stage's output joins blocks that have text or bytes there."""
    import pyarrow as pa

    from cxrscreen.io.batch import restore_nulls

    nan = np.full(3, np.nan)
    batch = {"lung_mask_png": nan.copy(), "cam_png": nan.copy(), "error_message": nan.copy(),
             "jpeg_bytes": nan.copy(), "lung_fraction": nan.copy()}
    with pytest.raises(pa.ArrowTypeError):  # what Ray meets when it joins such a block with another
        pa.unify_schemas([pa.table({"lung_mask_png": batch["lung_mask_png"]}).schema,
                          pa.schema([("lung_mask_png", pa.binary())])])
    restore_nulls(batch)
    for k in ("lung_mask_png", "cam_png", "error_message", "jpeg_bytes"):
        assert batch[k].dtype == object and all(v is None for v in batch[k]), k
    assert batch["lung_fraction"].dtype.kind == "f"  # a float column stays float
    pa.unify_schemas([pa.table({"lung_mask_png": pa.array(list(batch["lung_mask_png"]))}).schema,
                      pa.schema([("lung_mask_png", pa.binary())])])
