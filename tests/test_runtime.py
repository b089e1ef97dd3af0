"""Every runtime against the torch fp32 reference: probabilities and lung masks."""

import importlib.util
import logging

import numpy as np
import pytest
import torch

from cxrscreen.io import list_inputs
from cxrscreen.masks import decode_mask_png, dice
from cxrscreen.models.registry import build_model
from cxrscreen.pipeline import ScoreConfig, score_items_local
from cxrscreen.io.batch import decode_items
from cxrscreen.runtime import make_runtime

PROB_TOL = 1e-4  # max |p - p_ref| of an fp32 runtime
MASK_DICE = 0.99  # min Dice of a runtime's lung mask against the reference mask


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CXRSCREEN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _score(items, **cfg):
    batches = list(score_items_local(items, ScoreConfig(**{"device": "cpu", "batch_size": 16, **cfg})))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _compare(ref, out, tol=PROB_TOL, min_dice=MASK_DICE):
    ok = ref["status"] == "ok"
    assert ok.sum() >= 10 and (out["status"] == ref["status"]).all()
    probs = [c for c in ref if c.startswith("prob_")]
    diff = max(np.abs(ref[c][ok] - out[c][ok]).max() for c in probs)
    assert diff < tol, diff
    assert (ref["label"][ok] == out["label"][ok]).all()
    dices = [dice(decode_mask_png(a), decode_mask_png(b)) for a, b in zip(ref["lung_mask_png"][ok], out["lung_mask_png"][ok])]
    assert min(dices) > min_dice, min(dices)


@pytest.mark.slow
def test_onnxruntime_matches_torch_fp32_on_the_shipped_models(mixed_archive):
    items = list(list_inputs(mixed_archive[0]))[:24]
    ref = _score(items, runtime="torch", precision="fp32")
    _compare(ref, _score(items, runtime="onnxruntime"))


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("p0_cnn_lstm", 128), ("p2_small_cnn", 224), ("resnet18", 224)])
def test_onnx_export_of_registry_models_keeps_dynamic_batch(name, size):
    torch.manual_seed(0)
    module = build_model(name, 4, 1).eval()
    ort_rt = make_runtime(module, "cpu", runtime="onnxruntime", size=size)
    ref = make_runtime(module, "cpu", "fp32", runtime="torch")
    for batch in (1, 5):
        x = torch.randn(batch, 1, size, size)
        p_ref, p = torch.softmax(ref(x), 1), torch.softmax(ort_rt(x), 1)
        assert p.shape == (batch, 4) and (p - p_ref).abs().max() < PROB_TOL


def test_auto_picks_the_fastest_cpu_runtime_and_falls_back_to_torch(monkeypatch, caplog):
    from cxrscreen.runtime.torch_runtime import cpu_has_fast_bf16

    module = build_model("cxrnet", 4, 1)
    assert make_runtime(module, "cpu", "fp32").name == "onnxruntime"  # fp32: onnxruntime beats torch
    auto = make_runtime(module, "cpu")
    assert (auto.name, auto.precision) == (("torch", "bf16") if cpu_has_fast_bf16() else ("onnxruntime", "fp32"))
    assert make_runtime(module, "cpu", "bf16").name == "torch"  # reduced precision: torch autocast

    def broken(*a, **k):
        raise RuntimeError("export failed")

    monkeypatch.setattr("cxrscreen.runtime.onnx_export.export_onnx", broken)
    with caplog.at_level(logging.WARNING):
        rt = make_runtime(module, "cpu", "fp32")
    assert rt.name == "torch" and "export failed" in caplog.text
    with pytest.raises(RuntimeError, match="export failed"):
        make_runtime(module, "cpu", runtime="onnxruntime")


def test_bad_runtime_requests_are_refused():
    module = build_model("cxrnet", 4, 1)
    with pytest.raises(ValueError, match="expected one of"):
        make_runtime(module, "cpu", runtime="tflite")
    with pytest.raises(ValueError, match="fp32 only"):
        make_runtime(module, "cpu", "bf16", runtime="onnxruntime")


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    module = build_model("p0_cnn_lstm", 4, 1).eval()
    x = torch.randn(3, 1, 128, 128)
    eager = make_runtime(module, "cpu", "fp32", runtime="torch")(x)
    compiled = make_runtime(module, "cpu", "fp32", runtime="torch", compile=True)(x)
    assert (torch.softmax(eager, 1) - torch.softmax(compiled, 1)).abs().max() < PROB_TOL


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed: GPU tests cover it")
def test_tensorrt_without_the_package_says_how_to_get_it():
    with pytest.raises(ImportError, match=r"cxrscreen\[tensorrt\]"):
        make_runtime(build_model("cxrnet", 4, 1), "cpu", runtime="tensorrt")


def test_jpegs_decoded_on_the_model_device_match_host_decoding(mixed_archive, whole_image_classifier):
    """decode_jpeg_on_device: JPEGs travel as bytes and the first model actor decodes them in one
    torchvision.io.decode_jpeg call (nvJPEG on CUDA; here on CPU); broken JPEGs stay error rows."""
    archive, bad = mixed_archive
    items = list(list_inputs(archive))
    kw = dict(classifier=whole_image_classifier, segmenter="unet-lungs", runtime="torch", precision="fp32",
              batch_size=len(items))
    host = _score(items, **kw)
    dev = _score(items, **kw, decode_jpeg_on_device=True)
    assert dict(zip(dev["key"], dev["error_type"])) == dict(zip(host["key"], host["error_type"]))
    jpeg = np.array([k.endswith(".jpg") for k in host["key"]]) & (host["status"] == "ok")
    assert jpeg.sum() >= 5
    _compare(host, dev, tol=0.02, min_dice=0.97)  # resize filters differ slightly (PIL vs torch)
    deferred = decode_items(items, defer_jpeg=True)["jpeg_bytes"]
    assert sum(d is not None for d in deferred) == jpeg.sum()  # every good JPEG took the device path


def test_jpeg_cut_inside_the_scan_is_not_deferred(tmp_path):
    from cxrscreen.data.synth import encode_jpeg, make_phantom

    data = encode_jpeg(make_phantom("covid", 128, 1).image)
    (tmp_path / "cut.jpg").write_bytes(data[: int(len(data) * 0.7)])  # header intact, scan cut
    (tmp_path / "whole.jpg").write_bytes(data)
    batch = decode_items(list(list_inputs(tmp_path)), defer_jpeg=True)
    assert dict(zip(batch["key"], batch["error_type"])) == {"cut.jpg": "truncated", "whole.jpg": None}
    assert [d is not None for d in batch["jpeg_bytes"]] == [False, True]


def test_a_cpu_batch_runs_through_the_model_in_chunks_with_the_same_outputs():
    """On a CPU ``ModelRunner.forward`` feeds the runtime CPU_FORWARD_BATCH images at a time
    (faster there); the outputs are those of one call over the whole batch."""
    from cxrscreen.predict import CPU_FORWARD_BATCH, ModelRunner

    class Counting:  # the runtime, counting the images of each call
        def __init__(self, runtime):
            self.runtime, self.device, self.sizes = runtime, runtime.device, []

        def __call__(self, x):
            self.sizes.append(len(x))
            return self.runtime(x)

    runner = ModelRunner("unet-lungs-fast", "segment", device="cpu", runtime="torch", precision="fp32")
    whole = runner.runtime
    runner.runtime = counting = Counting(whole)
    images = np.random.default_rng(0).integers(0, 256, (CPU_FORWARD_BATCH * 2 + 5, 256, 256), dtype=np.uint8)
    x = runner.model_input(images)
    out = runner.forward(x)
    assert counting.sizes == [CPU_FORWARD_BATCH, CPU_FORWARD_BATCH, 5]
    assert torch.allclose(out, whole(x), atol=1e-5)
