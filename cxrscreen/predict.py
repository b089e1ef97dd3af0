"""One inference path: work images (``cxrscreen.io.batch``) -> model input
(``cxrscreen.preprocess``) -> runtime -> outputs, for every consumer.

``ModelRunner`` loads a checkpoint once and runs it on the chosen runtime; the pipeline's
``Segmenter`` / ``Classifier`` stages, ``evaluate``, ``calibrate``, training's lung crops and
distillation, the report and the benchmarks all call it, so the model that is evaluated is,
arithmetic for arithmetic, the model that scores. A classifier's runtime returns its logits
and its penultimate embedding in one forward pass (``cxrscreen.models.ood``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from cxrscreen.io.batch import WORK_SIZE, decode_items
from cxrscreen.io.sources import InputItem
from cxrscreen.masks import lung_regions_batch
from cxrscreen.models import load_model
from cxrscreen.models.ood import OODReference, appearance_features, with_embedding
from cxrscreen.preprocess import crop_boxes, to_model_input


@dataclass
class Outputs:
    """A classifier's outputs for a batch: logits (B, C), embeddings (B, D) or None, the work
    images' ``appearance`` features, and ``ood_score`` (B,) or None (no reference saved with
    the checkpoint)."""

    logits: np.ndarray
    embeddings: np.ndarray | None = None
    ood_score: np.ndarray | None = None
    appearance: np.ndarray | None = None


CPU_FORWARD_BATCH = 16  # images per forward on a CPU: 64 at once ran 22% slower (benchmarks/README.md)


class ModelRunner:
    """A checkpoint loaded once on a runtime (``cxrscreen.runtime.make_runtime``).

    ``segment(images)``: lung probability maps; ``classify(images, boxes)``: ``Outputs``.
    Images are uint8 work images (B, H, W), numpy or torch; ``boxes`` are normalised lung
    boxes, used when the checkpoint was trained on lung crops (or ``lung_crop``). On a CPU a
    batch runs through the model ``CPU_FORWARD_BATCH`` images at a time (``forward``).
    """

    def __init__(self, spec: str, task: str, device: str = "auto", precision: str = "auto",
                 threads: int | None = None, runtime: str = "auto", allow_untrained: bool = False,
                 int8_calibration: str | None = None, **runtime_options):
        from cxrscreen.runtime import make_runtime

        self.task = task
        self._crop_segmenter: ModelRunner | None = None  # loaded on first use by lung_boxes
        self.loaded = load_model(spec, task, allow_untrained=allow_untrained)
        self.info = self.loaded.info
        module, self.embedding_size = self.loaded.module, 0
        if task == "classify":
            wrapped = with_embedding(module, self.info.in_channels, self.info.input_size)
            if wrapped is not None:
                module, self.embedding_size = wrapped, wrapped.embedding_size
            ood = self.loaded.ood
            if ood is not None and ood.means.shape[1] != self.embedding_size:
                raise ValueError(f"{spec}: ood.safetensors has embedding size {ood.means.shape[1]}, the model "
                                 f"{self.embedding_size}: fitted for other weights (run cxrscreen evaluate again)")
        if int8_calibration:
            runtime_options["calibration"] = self._calibration_batches(int8_calibration)
        self.runtime = make_runtime(module, device, precision, threads, runtime,
                                    self.info.in_channels, self.info.input_size, **runtime_options)

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The runtime's output for model input ``x``: on a CPU ``CPU_FORWARD_BATCH`` images at a
        time (its caches hold their activations), elsewhere the whole batch in one call."""
        if self.device.type != "cpu" or len(x) <= CPU_FORWARD_BATCH:
            return self.runtime(x)
        return torch.cat([self.runtime(part) for part in x.split(CPU_FORWARD_BATCH)])

    def to_device(self, images) -> torch.Tensor:
        """Host array -> tensor on the runtime's device (pinned memory, non-blocking on CUDA)."""
        if isinstance(images, torch.Tensor):
            return images.to(self.device, non_blocking=True)
        x = torch.from_numpy(np.ascontiguousarray(images))
        if self.device.type == "cuda":
            x = x.pin_memory()
        return x.to(self.device, non_blocking=True)

    def model_input(self, images, boxes: np.ndarray | None = None, lung_crop: bool = False) -> torch.Tensor:
        """uint8 work images -> the checkpoint's model input on the runtime's device."""
        x = self.to_device(images)
        if lung_crop or self.info.lung_crop:
            if boxes is None:
                raise ValueError("lung crop asked for (or the model was trained on lung crops) "
                                 "but no segmenter ran: give a segmenter")
            x = crop_boxes(x, boxes, x.shape[-1])
        return to_model_input(x, self.info.input_size, self.info.in_channels, self.info.intensity)

    def lung_boxes(self, images: np.ndarray) -> np.ndarray:
        """Lung boxes from the segmenter this crop-trained classifier was trained with (loaded once)."""
        if self._crop_segmenter is None:
            self._crop_segmenter = ModelRunner(self.info.lung_crop, "segment", device=str(self.device))
        return lung_boxes(self._crop_segmenter, images)

    def segment_probs(self, images) -> torch.Tensor:
        """Lung probability maps (B, size, size) of a segmenter, on the runtime's device."""
        return torch.sigmoid(self.forward(self.model_input(images))[:, 0]).float()

    def segment(self, images) -> np.ndarray:
        """``segment_probs`` as a host array."""
        return self.segment_probs(images).cpu().numpy()

    def classify(self, images, boxes: np.ndarray | None = None, lung_crop: bool = False) -> Outputs:
        """Logits, penultimate embeddings and ``ood_score`` of a classifier (raw logits:
        temperature scaling is the caller's, from the checkpoint or a site profile)."""
        return self.classify_input(self.model_input(images, boxes, lung_crop), appearance_features(images))

    def classify_input(self, x: torch.Tensor, appearance: np.ndarray, reference: OODReference | None = None) -> Outputs:
        """``classify`` from model input and the work images' ``appearance_features``;
        ``ood_score`` against ``reference`` (default: the checkpoint's)."""
        out = self.forward(x).float().cpu().numpy()
        n = len(self.info.classes)
        if not self.embedding_size:
            return Outputs(out[:, :n], appearance=appearance)
        emb = out[:, n:]
        reference = reference if reference is not None else self.loaded.ood
        return Outputs(out[:, :n], emb, reference.score(emb, appearance) if reference is not None else None, appearance)

    def _calibration_batches(self, archive: str, n: int = 256, batch: int = 32) -> list[np.ndarray]:
        """Model inputs of the first ``n`` decodable images of ``archive`` (INT8 calibration)."""
        from cxrscreen.io.sources import list_inputs

        b = decode_items(list(list_inputs(archive))[:n])  # paths or Parquet bytes alike
        images, ok = b["image"], b["status"] == "ok"
        return [to_model_input(torch.from_numpy(images[ok][i:i + batch]), self.info.input_size,
                               self.info.in_channels, self.info.intensity).numpy()
                for i in range(0, int(ok.sum()), batch)]


def decode_files(files: Sequence[str], work_size: int = WORK_SIZE, batch: int = 64,
                 **decode_options) -> tuple[np.ndarray, np.ndarray]:
    """uint8 work images of image files (the pipeline's decode) and the mask of those that decoded."""
    images, ok, _ = decode_files_polarity(files, work_size, batch, **decode_options)
    return images, ok


def decode_files_polarity(files: Sequence[str], work_size: int = WORK_SIZE, batch: int = 64,
                          **decode_options) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``decode_files`` plus each image's ``polarity`` (``cxrscreen.io.batch.polarity``)."""
    images = np.zeros((len(files), work_size, work_size), np.uint8)
    ok = np.zeros(len(files), bool)
    pol = np.full(len(files), np.nan, np.float32)
    for i in range(0, len(files), batch):
        b = decode_items([InputItem(str(f), str(f)) for f in files[i:i + batch]], work_size, **decode_options)
        images[i:i + batch], ok[i:i + batch], pol[i:i + batch] = b["image"], b["status"] == "ok", b["polarity"]
    return images, ok, pol


def segment_images(runner: ModelRunner, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """``runner.segment`` (lung probability maps) over many uint8 work images, in batches."""
    parts = [runner.segment(images[i:i + batch]) for i in range(0, len(images), batch)]
    size = runner.info.input_size
    return np.concatenate(parts) if parts else np.zeros((0, size, size), np.float32)


def module_logits(module: torch.nn.Module, images: np.ndarray, size: int, channels: int = 1,
                  intensity: str = "raw", device: str | torch.device = "cpu", batch: int = 64) -> np.ndarray:
    """Outputs of an in-memory module (a model being trained or adapted, not yet a checkpoint)
    for uint8 work images: the model input ``ModelRunner.model_input`` makes
    (``preprocess.to_model_input``), in batches, without gradients."""
    module.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = to_model_input(torch.from_numpy(images[i:i + batch]).to(device), size, channels, intensity)
            out.append(module(x.contiguous(memory_format=torch.channels_last)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def lung_boxes(segmenter: ModelRunner, images: np.ndarray, threshold: float = 0.5, batch: int = 32) -> np.ndarray:
    """Normalised lung boxes [x0, y0, x1, y1] of uint8 work images (NaN where no lung was found),
    from the cleaned mask exactly as the pipeline's ``Segmenter`` finds them."""
    boxes = np.full((len(images), 4), np.nan, np.float32)
    for i in range(0, len(images), batch):
        boxes[i:i + batch] = lung_regions_batch(segmenter.segment_probs(images[i:i + batch]) > threshold).box
    return boxes


def classify_images(runner: ModelRunner, images: np.ndarray, boxes: np.ndarray | None = None,
                    batch: int = 64) -> Outputs:
    """``runner.classify`` over many uint8 work images, in batches (lung boxes from
    ``lung_boxes`` when the checkpoint was trained on lung crops)."""
    if runner.info.lung_crop and boxes is None:
        boxes = runner.lung_boxes(images)
    parts = [runner.classify(images[i:i + batch], None if boxes is None else boxes[i:i + batch])
             for i in range(0, len(images), batch)]
    if not parts:
        n = len(runner.info.classes)
        return Outputs(np.zeros((0, n), np.float32), np.zeros((0, runner.embedding_size), np.float32)
                       if runner.embedding_size else None, appearance=appearance_features(images))
    cat = (lambda xs: None if xs[0] is None else np.concatenate(xs))
    return Outputs(cat([p.logits for p in parts]), cat([p.embeddings for p in parts]),
                   cat([p.ood_score for p in parts]), cat([p.appearance for p in parts]))


def classify_files(runner: ModelRunner, files: Sequence[str]) -> tuple[Outputs, np.ndarray]:
    """Outputs for image files (rows of the files that decoded) and the decoded mask."""
    images, ok = decode_files(files)
    return classify_images(runner, images[ok]), ok
