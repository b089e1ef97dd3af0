"""One path from pixels to model input: the lung crop."""

import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from cxrscreen.preprocess import crop_boxes


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.sampled_from([32, 64, 100]), side=st.sampled_from([40, 64, 97]))
def test_crop_boxes_is_roi_align(seed, size, side):
    """The batched grid-sample crop gives torchvision's roi_align (aligned, adaptive sampling)
    for boxes smaller and larger than the output, whole images (NaN boxes) and edge boxes."""
    from torchvision.ops import roi_align

    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, (6, side, side + 7), dtype=np.uint8))
    x0, y0 = rng.uniform(0, 0.6, 6), rng.uniform(0, 0.6, 6)
    boxes = np.stack([x0, y0, x0 + rng.uniform(0.05, 1, 6), y0 + rng.uniform(0.05, 1, 6)], 1).astype(np.float32)
    boxes[0] = np.nan
    boxes[1] = [0.9, 0.0, 1.0, 1.0]
    got = crop_boxes(images, boxes, size)
    b = torch.from_numpy(boxes)
    b = torch.where(torch.isnan(b).any(1, keepdim=True), torch.tensor([0.0, 0.0, 1.0, 1.0]), b)
    b = torch.cat([(b[:, :2] - 0.05).clamp(0, 1), (b[:, 2:] + 0.05).clamp(0, 1)], 1)
    h, w = images.shape[-2:]
    rois = torch.cat([torch.arange(6.0)[:, None], b * torch.tensor([w, h, w, h])], 1)
    want = roi_align(images[:, None].float(), rois, (size, size), sampling_ratio=-1, aligned=True)[:, 0]
    diff = (got.float() - want.round().clamp(0, 255)).abs()
    assert got.shape == (6, size, size) and got.dtype == torch.uint8
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01  # a rounding flip at .5 at most
