"""Lung-mask post-processing: two largest components, holes filled, fraction and boxes."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import ndimage

from cxrscreen.data.synth import make_phantom
from cxrscreen.masks import decode_mask_png, dice, lung_regions, lung_regions_batch, mask_png


def test_two_largest_components_kept_holes_filled_and_boxed_per_side():
    m = np.zeros((100, 100), bool)
    m[20:80, 10:40] = True  # image left = the patient's right lung
    m[30:70, 60:90] = True  # image right = the patient's left lung
    m[40:45, 20:25] = False  # a hole
    m[90:93, 50:53] = True  # a speck
    r = lung_regions(m)
    assert r.mask[42, 22] and not r.mask[91, 51]  # hole filled, speck gone
    assert r.fraction == pytest.approx((60 * 30 + 40 * 30) / 10000)
    np.testing.assert_allclose(r.right, [0.10, 0.20, 0.40, 0.80])
    np.testing.assert_allclose(r.left, [0.60, 0.30, 0.90, 0.70])
    np.testing.assert_allclose(r.box, [0.10, 0.20, 0.90, 0.80])


def test_one_lung_or_none():
    m = np.zeros((50, 50), bool)
    m[10:40, 30:45] = True
    r = lung_regions(m)
    assert np.isnan(r.right).all() and not np.isnan(r.left).any()
    empty = lung_regions(np.zeros((50, 50), bool))
    assert empty.fraction == 0 and np.isnan(empty.box).all() and not empty.mask.any()


def test_phantom_lungs_are_boxed_on_the_right_side():
    p = make_phantom("normal", 128, seed=2)
    r = lung_regions(p.lung_mask.astype(bool))
    assert dice(r.mask, p.lung_mask.astype(bool)) > 0.97  # the phantom masks are clean already
    assert r.right[2] <= 0.5 <= r.left[0]


def test_mask_png_round_trip():
    m = np.zeros((64, 64), bool)
    m[8:40, 4:30] = True
    back = decode_mask_png(mask_png(m, 128))
    assert back.shape == (128, 128) and dice(back[::2, ::2], m) == 1.0
    assert dice(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0


def _scipy_regions(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The reference: scipy's two largest 4-connected components, holes filled, their box;
    None where the second and third largest tie (either is right)."""
    labels, n = ndimage.label(mask)
    areas = np.bincount(labels.ravel())[1:]
    if n > 2 and np.sort(areas)[-2] == np.sort(areas)[-3]:
        return None
    keep = np.isin(labels, np.argsort(areas)[-2:] + 1)
    h, w = mask.shape
    ys, xs = np.nonzero(keep)
    box = (np.array([xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h], np.float32) if n
           else np.full(4, np.nan, np.float32))
    return ndimage.binary_fill_holes(keep), box


def _crafted(kind: str) -> np.ndarray:
    m = np.zeros((60, 60), bool)
    m[5:30, 5:20] = True
    m[10:50, 40:55] = True
    if kind == "corner":
        m[30:54, 20:35] = True  # touches the first only at a corner: a component of its own (4-connected)
    if kind == "hole":
        m[20:40, 44:51] = False  # a hole in the second ...
        m[28:32, 46:49] = True  # ... with an island in it
    if kind == "lines":
        m[56, 5:50] = True  # 45 px: more than the 2x2 speck
    m[57:59, 1:3] = True  # a speck
    return m


@pytest.mark.parametrize("kind", ["plain", "corner", "hole", "lines"])
def test_crafted_masks_match_scipy_on_either_path(kind):
    from cxrscreen.masks import _outer_regions

    m = _crafted(kind)
    assert (_outer_regions(m.view(np.uint8)) is None) == (kind in ("corner", "hole"))  # the fast path, or not
    want, box = _scipy_regions(m)
    r = lung_regions(m)
    assert np.array_equal(r.mask, want)
    np.testing.assert_allclose(r.box, box, rtol=1e-6)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), density=st.floats(0.2, 0.8), size=st.integers(1, 64),
       sigma=st.sampled_from([0.3, 1.5, 3.0]))
def test_lung_regions_match_scipy(seed, density, size, sigma):
    """Whichever way OpenCV takes (outer contours, or labels and a flood fill), it gives what
    scipy gives: the two largest 4-connected components, holes filled, their boxes."""
    mask = ndimage.gaussian_filter(np.random.default_rng(seed).random((size, size + 5)), sigma) < 0.5 - (0.5 - density) / 4
    ref = _scipy_regions(mask)
    if ref is None:
        return
    r = lung_regions(mask)
    assert np.array_equal(r.mask, ref[0]) and r.fraction == pytest.approx(ref[0].mean())
    np.testing.assert_allclose(r.box, ref[1], rtol=1e-6)


def test_a_tie_keeps_the_components_the_labelling_keeps():
    """Equal sizes: the components that start later in raster order (OpenCV's labelling keeps
    the last of a stable sort by area), on the contour path too."""
    from cxrscreen.masks import _labelled_regions, _outer_regions

    m = np.zeros((20, 30), bool)
    m[2:8, 2:8] = m[2:8, 20:26] = m[12:18, 10:16] = True  # three equal squares
    m[10, 28] = True  # a speck
    want = np.zeros_like(m)
    want[2:8, 20:26] = want[12:18, 10:16] = True
    u8 = m.view(np.uint8)
    assert _outer_regions(u8) is not None and np.array_equal(_labelled_regions(u8)[0].view(bool), want)
    assert np.array_equal(lung_regions(m).mask, want)


def test_real_lung_masks_mostly_take_the_contours():
    from cxrscreen.masks import _outer_regions

    masks = [make_phantom(c, 128, seed=s).lung_mask.astype(bool) for s in range(4) for c in ("normal", "covid")]
    assert sum(_outer_regions(m.view(np.uint8)) is not None for m in masks) >= 6
    for m in masks:
        assert np.array_equal(lung_regions(m).mask, _scipy_regions(m)[0])


def _random_masks(seed: int, n: int = 12, size: int = 48) -> np.ndarray:
    """Blobby masks with specks and holes, a serpentine (many turns), an empty and a full one."""
    rng = np.random.default_rng(seed)
    masks = ndimage.gaussian_filter(rng.random((n, size, size)), (0, 2.5, 2.5)) > 0.5
    masks[0] = False
    masks[1] = True
    masks[2] = False
    for k, row in enumerate(range(4, size - 6, 2)):  # bars joined at alternate ends: one long path
        masks[2, row, 3:size - 3] = True
        masks[2, row:row + 3, 3 if k % 2 else size - 4] = True
    return masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_post_processing_in_threads_matches_per_image(seed):
    import torch

    masks = _random_masks(seed)
    for out in (lung_regions_batch(torch.from_numpy(masks)), lung_regions_batch(masks, workers=3)):
        assert out.masks.shape == masks.shape
        for m, got, frac, box in zip(masks, out.masks.numpy(), out.fraction, out.box):
            ref = lung_regions(m)
            assert np.array_equal(got, ref.mask) and frac == pytest.approx(ref.fraction)
            np.testing.assert_allclose(box, ref.box, atol=1e-6)


def test_mask_pngs_are_1_bit_and_round_trip_at_any_size():
    from PIL import Image
    import io

    from cxrscreen.masks import mask_pngs, resize_masks

    masks = _random_masks(3, n=4, size=37)  # a width that is not a multiple of 8
    pngs = mask_pngs(masks)
    assert Image.open(io.BytesIO(pngs[0])).mode == "1" and mask_pngs(masks, workers=3) == pngs
    assert all((decode_mask_png(p) == m).all() for p, m in zip(pngs, masks))
    big = resize_masks(masks, 74)
    assert big.shape == (4, 74, 74) and (big[:, ::2, ::2] == masks).all()


def test_mask_outline_is_the_border_of_the_mask():
    from cxrscreen.masks import mask_outline

    m = np.zeros((20, 20), bool)
    m[5:15, 4:12] = True
    edge = mask_outline(m)
    assert edge.sum() == 2 * (10 + 8) - 4 and not edge[7:13, 6:10].any() and (edge <= m).all()
    assert mask_outline(m, 2).sum() > edge.sum() and not mask_outline(np.zeros((5, 5), bool)).any()
