"""Grad-CAM and Grad-CAM++ for any registry classifier, where the heatmap falls (CAM energy
inside the lungs), heatmap PNGs and overlays: plain torch and numpy, used by the pipeline's
``Classifier`` (``--cam``), ``cxrscreen explain`` and the report.

The target layer is found automatically: the last module (in the order modules finish their
forward pass) whose output is a spatial feature map larger than 1x1, pooling layers excluded
(for a plain CNN the last conv block's activation; for ResNet ``layer4``, for GoogLeNet
``inception5b``, for the CNN+RNN hybrids the last map before the sequence model; for an
ensemble, each member's such map, the members' heatmaps summed).
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

METHODS = ("gradcam", "gradcampp")
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def find_target_layer(module: nn.Module, in_channels: int, size: int) -> str:
    """Name of the module whose activations Grad-CAM uses (see the module docstring)."""
    finished: list[tuple[str, tuple]] = []  # (name, output shape) in the order modules finish
    hooks = [m.register_forward_hook(lambda m, i, o, n=name: finished.append((n, tuple(getattr(o, "shape", ())))))
             for name, m in module.named_modules() if name and not isinstance(m, _POOLS)]
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            module(torch.zeros(1, in_channels, size, size, device=next(module.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        module.train(was_training)
    spatial = [n for n, shape in finished if len(shape) == 4 and shape[2] * shape[3] > 1]
    if not spatial:
        raise ValueError(f"{type(module).__name__} has no spatial feature map for Grad-CAM")
    return spatial[-1]


class GradCAM:
    """``cam(x) -> (heatmaps (B, H, W) in [0, 1], target classes, logits)`` for a batch ``x``.

    ``method``: "gradcam" (channel weights = mean gradient) or "gradcampp" (Grad-CAM++:
    weights from positive gradients with per-location alphas). ``target`` defaults to the
    predicted class. Heatmaps are upsampled to the input size and scaled to max 1 per image.
    """

    def __init__(self, module: nn.Module, in_channels: int, size: int, method: str = "gradcam",
                 layer: str | None = None):
        if method not in METHODS:
            raise ValueError(f"CAM method {method!r}: expected one of {METHODS}")
        self.module, self.method = module, method
        members = getattr(module, "members", None)  # an ensemble: one map per member, summed
        if layer:
            self.layers = [layer]
        elif isinstance(members, nn.ModuleList):
            self.layers = [f"members.{i}.{find_target_layer(m, in_channels, size)}" for i, m in enumerate(members)]
        else:
            self.layers = [find_target_layer(module, in_channels, size)]
        named = dict(module.named_modules())
        self._targets = [named[n] for n in self.layers]

    def __call__(self, x: torch.Tensor, target: torch.Tensor | None = None):
        store: dict[int, dict] = {i: {} for i in range(len(self._targets))}

        def keeper(i):
            def keep(m, inp, o):
                store[i]["act"] = o
                o.register_hook(lambda g: store[i].__setitem__("grad", g))
            return keep

        hooks = [t.register_forward_hook(keeper(i)) for i, t in enumerate(self._targets)]
        was_training = self.module.training
        self.module.eval()
        try:  # cuDNN has no RNN backward in eval mode: let the hybrids use the native kernels
            with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False):
                x = x.detach().float().requires_grad_(True)
                logits = self.module(x).float()
                target = logits.argmax(1) if target is None else target.to(logits.device)
                logits.gather(1, target[:, None]).sum().backward()
        finally:
            for h in hooks:
                h.remove()
            self.module.train(was_training)
            self.module.zero_grad(set_to_none=True)
        cam = sum(F.interpolate(self._map(st["act"].detach().float(), st["grad"].float()), size=x.shape[-2:],
                                mode="bilinear", align_corners=False)[:, 0] for st in store.values())
        cam = cam / cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        return cam.detach().cpu().numpy(), target.cpu().numpy(), logits.detach()

    def _map(self, act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """(B, 1, h, w) class activation map of one layer's activations and gradients."""
        if self.method == "gradcam":
            weights = grad.mean((2, 3))
        else:
            g2, g3 = grad.pow(2), grad.pow(3)
            alpha = g2 / (2 * g2 + act.sum((2, 3), keepdim=True) * g3).clamp_min(1e-12)
            alpha = torch.where(grad != 0, alpha, torch.zeros_like(alpha))
            weights = (alpha * F.relu(grad)).sum((2, 3))
        return F.relu((weights[:, :, None, None] * act).sum(1, keepdim=True))


def energy_inside(cam: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of the heatmap's total energy inside a boolean mask (resized to the heatmap)."""
    if mask.shape != cam.shape:
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(cam.shape[::-1])) > 127
    total = float(cam.sum())
    return float(cam[mask].sum() / total) if total > 0 else float("nan")


def heatmap_png(cam: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of a [0, 1] heatmap (255 = strongest)."""
    buf = io.BytesIO()
    Image.fromarray(np.rint(np.clip(cam, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def heatmap_from_png(data: bytes) -> np.ndarray:
    """The [0, 1] heatmap of ``heatmap_png`` bytes."""
    return np.asarray(Image.open(io.BytesIO(data)), np.float32) / 255.0


def jet(x: np.ndarray) -> np.ndarray:
    """The jet colour scale (blue -> cyan -> yellow -> red) of values in [0, 1]: (..., 3) floats."""
    x = np.asarray(x, np.float32)[..., None]
    return np.clip(1.5 - np.abs(4 * x - np.array([3.0, 2.0, 1.0], np.float32)), 0, 1)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 overlay of a heatmap (jet colours) on a grayscale uint8 image of any size."""
    h, w = image.shape
    cam = np.asarray(Image.fromarray(np.rint(cam * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR))
    colour = jet(cam / 255.0)
    base = np.repeat(image[..., None] / 255.0, 3, axis=2)
    return np.rint(255 * ((1 - alpha) * base + alpha * colour)).astype(np.uint8)


def triplet(image: np.ndarray, mask: np.ndarray | None = None, cam: np.ndarray | None = None) -> np.ndarray:
    """Side by side RGB: the image, the lung mask outlined over it, the heatmap over it."""
    from cxrscreen.masks import mask_outline

    h, w = image.shape
    panels = [np.repeat(image[..., None], 3, axis=2)]
    if mask is not None:
        m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h))) > 127
        edge = mask_outline(m, h // 128)
        lung = panels[0].copy()
        lung[m] = (0.7 * lung[m] + 0.3 * np.array([0, 200, 0])).astype(np.uint8)
        lung[edge] = (0, 255, 0)
        panels.append(lung)
    if cam is not None:
        panels.append(overlay(image, cam))
    return np.concatenate(panels, axis=1)


def captioned(picture: np.ndarray, text: str, colour_bar: bool = True) -> np.ndarray:
    """``picture`` (RGB) with a white strip below it: ``text`` on the left and, with
    ``colour_bar``, the heatmap's jet scale from 0 (weak) to 1 (strong) on the right."""
    from PIL import ImageDraw

    h, w, _ = picture.shape
    strip = Image.new("RGB", (w, 30), "white")
    draw = ImageDraw.Draw(strip)
    draw.text((4, 9), text, fill=(0, 0, 0))
    if colour_bar and w >= 240:
        bar_w = min(160, w // 4)
        ramp = jet(np.linspace(0, 1, bar_w))
        bar = np.rint(np.repeat(ramp[None], 12, axis=0) * 255).astype(np.uint8)
        x0 = w - bar_w - 18
        strip.paste(Image.fromarray(bar), (x0, 4))
        draw.text((x0 - 10, 17), "0", fill=(0, 0, 0))
        draw.text((x0 + bar_w + 3, 17), "1", fill=(0, 0, 0))
    return np.concatenate([picture, np.asarray(strip)], axis=0)
