"""Every GPU path against the CPU / fp32 reference. Skipped without CUDA (CI has none);
``benchmarks/gpu/run.sh`` runs this file on a lent GPU machine, without Ray or polars, so
nothing here may import them."""

import numpy as np
import pytest
import torch

from cxrscreen.io import list_inputs
from cxrscreen.io.batch import decode_items
from cxrscreen.masks import decode_mask_png, dice
from cxrscreen.pipeline import ScoreConfig, score_items_local

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CXRSCREEN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def items(mixed_archive):
    return list(list_inputs(mixed_archive[0]))


def _score(items, **cfg):
    batches = list(score_items_local(items, ScoreConfig(**{"batch_size": 16, **cfg})))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _compare(ref, out, tol, min_dice):
    ok = ref["status"] == "ok"
    assert ok.sum() >= 10 and (out["status"] == ref["status"]).all()
    diff = max(np.abs(ref[c][ok] - out[c][ok]).max() for c in ref if c.startswith("prob_"))
    assert diff < tol, diff
    dices = [dice(decode_mask_png(a), decode_mask_png(b)) for a, b in zip(ref["lung_mask_png"][ok], out["lung_mask_png"][ok])]
    assert min(dices) > min_dice, min(dices)


@pytest.fixture(scope="module")
def cpu_fp32(items, whole_image_classifier):
    return _score(items, device="cpu", runtime="torch", precision="fp32", classifier=whole_image_classifier)


@pytest.mark.parametrize("precision, tol", [("fp32", 0.01), ("fp16", 0.02), ("bf16", 0.05)])
def test_gpu_precisions_match_cpu_fp32(items, cpu_fp32, whole_image_classifier, precision, tol):
    """fp32 on CUDA runs cuDNN convolutions in TF32 (PyTorch's default), hence not 1e-4. A
    whole-image classifier: on phantoms the shipped lung-crop one turns any mask difference
    into a different crop, which tests the phantoms, not the GPU."""
    out = _score(items, device="cuda", runtime="torch", precision=precision, classifier=whole_image_classifier)
    _compare(cpu_fp32, out, tol, 0.95)


def test_gpu_masks_are_cleaned_on_the_host_as_cpu_masks(items):
    """CUDA masks from the segmenter are cleaned by OpenCV on the host (one thread and four)
    exactly as the same masks on the CPU."""
    from cxrscreen.masks import lung_regions_batch
    from cxrscreen.predict import ModelRunner

    images = decode_items(items)
    seg = ModelRunner("unet-lungs-fast", "segment", device="cuda")
    masks = seg.segment_probs(images["image"][images["status"] == "ok"]) > 0.5
    cpu = lung_regions_batch(masks.cpu())
    for other in (lung_regions_batch(masks), lung_regions_batch(masks, workers=4)):
        assert (cpu.masks == other.masks).all()
        for k in ("fraction", "box", "right", "left"):
            np.testing.assert_allclose(getattr(cpu, k), getattr(other, k), atol=1e-6, err_msg=k)


def test_cuda_graphs_match_eager(items):
    ref = _score(items, device="cuda", runtime="torch", precision="fp16")
    _compare(ref, _score(items, device="cuda", runtime="torch", precision="fp16", cuda_graphs=True), 1e-3, 0.99)


def test_cuda_graphs_replay_each_batch_size(items):
    """The last batch of an archive is short: a second graph is captured for it, not reused."""
    ref = _score(items, device="cuda", runtime="torch", precision="fp16", batch_size=7)
    _compare(ref, _score(items, device="cuda", runtime="torch", precision="fp16", cuda_graphs=True, batch_size=7),
             1e-3, 0.99)


def test_compile_matches_eager(items, whole_image_classifier):
    good = [it for it in items if not it.key.startswith("bad")][:16]
    kw = dict(device="cuda", runtime="torch", precision="fp16", classifier=whole_image_classifier)
    _compare(_score(good, **kw), _score(good, **kw, compile=True), 0.02, 0.98)


def test_nvjpeg_in_the_actor_matches_host_decoding(items, whole_image_classifier):
    kw = dict(device="cuda", runtime="torch", precision="fp32", classifier=whole_image_classifier, segmenter="unet-lungs")
    host = _score(items, **kw)
    dev = _score(items, **kw, decode_jpeg_on_device=True)
    assert dict(zip(dev["key"], dev["error_type"])) == dict(zip(host["key"], host["error_type"]))
    assert sum(d is not None for d in decode_items(items, defer_jpeg=True)["jpeg_bytes"]) >= 5
    _compare(host, dev, 0.02, 0.97)  # resize filters differ slightly (PIL vs torch)


def test_tensorrt_matches_torch_fp32(items):
    pytest.importorskip("tensorrt", reason="tensorrt is not installed (pip install 'cxrscreen[tensorrt]')")
    ref = _score(items[:24], device="cuda", runtime="torch", precision="fp32")
    _compare(ref, _score(items[:24], device="cuda", runtime="tensorrt", precision="fp16"), 0.02, 0.97)


def test_lung_crop_on_the_gpu_matches_cpu():
    """crop_boxes (grouped grid_sample, roi_align's arithmetic) gives the same crops on the device."""
    from cxrscreen.preprocess import crop_boxes

    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (16, 256, 256), dtype=np.uint8))
    x0, y0 = rng.uniform(0, 0.5, 16), rng.uniform(0, 0.5, 16)
    boxes = np.stack([x0, y0, x0 + rng.uniform(0.1, 0.5, 16), y0 + rng.uniform(0.1, 0.5, 16)], 1).astype(np.float32)
    boxes[0] = np.nan
    cpu, gpu = crop_boxes(images, boxes, 224), crop_boxes(images.cuda(), boxes, 224)
    assert gpu.is_cuda and gpu.shape == cpu.shape
    diff = (gpu.cpu().int() - cpu.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


@pytest.mark.parametrize("threads", [1, 4])  # 4: masks cleaned by OpenCV on the host, as GPU actors do
def test_fused_actor_on_the_gpu_matches_two_stages(items, threads):
    """SegmentClassify (images copied to the device once, both models there) gives the rows of
    Segmenter then Classifier on the same device (masks cleaned by OpenCV on the host)."""
    from cxrscreen.pipeline.stages import Classifier, SegmentClassify, Segmenter

    cfg = ScoreConfig(device="cuda", runtime="torch", precision="fp32", batch_size=16)
    two = Classifier(cfg.classifier_options(), cfg.runtime_options(threads=1))(
        Segmenter(cfg.segmenter_options(), cfg.runtime_options(threads=1))(decode_items(items)))
    fused = SegmentClassify(cfg.segmenter_options(), cfg.classifier_options(),
                            cfg.runtime_options(threads=threads))
    assert fused.segmenter.workers == threads
    out = fused(decode_items(items))
    assert list(out["status"]) == list(two["status"]) and (two["status"] == "ok").sum() >= 10
    _compare(two, out, 1e-3, 0.99)
    ok = two["status"] == "ok"
    np.testing.assert_allclose(out["ood_score"][ok], two["ood_score"][ok], atol=1e-3)  # appearance on the device


def test_appearance_features_on_the_gpu_match_cpu():
    from cxrscreen.models.ood import appearance_features

    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (8, 256, 256), dtype=np.uint8))
    np.testing.assert_allclose(appearance_features(x.cuda()), appearance_features(x), atol=1e-4)
