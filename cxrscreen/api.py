"""The Python API: score a folder, list or Parquet archive into a DataFrame, or images in memory.

    import cxrscreen
    df = cxrscreen.score("archive/")                                   # every input, one row each
    screen = cxrscreen.Screener("cxrnet-4class", segmenter="unet-lungs-fast")
    df = screen(["a.png", "b.dcm", numpy_image])                       # paths, bytes or arrays

Both return the columns of ``cxrscreen score``'s Parquet output (``pipeline.output.output_schema``)
as a polars DataFrame, computed by the same stages.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from cxrscreen.io.batch import WORK_SIZE, decode_items, polarity, resize_uint8
from cxrscreen.io.sources import InputItem, safe_text
from cxrscreen.pipeline.config import ScoreConfig
from cxrscreen.pipeline.output import batch_to_table, output_schema


class Screener:
    """Models loaded once; call it on a list of image paths, encoded bytes or numpy arrays
    (2-D grayscale: uint8, uint16 or float in [0, 1]). Options are ``ScoreConfig`` keys."""

    def __init__(self, classifier: str = "cxrnet-4class", segmenter: str = "unet-lungs-fast", **options):
        from cxrscreen.config import from_dict
        from cxrscreen.pipeline.score import check_models
        from cxrscreen.pipeline.stages import Classifier, Segmenter

        self.cfg = from_dict(ScoreConfig, dict(options, classifier=classifier, segmenter=segmenter))
        check_models(self.cfg)
        runtime = self.cfg.runtime_options()
        self.segmenter = Segmenter(self.cfg.segmenter_options(), runtime) if segmenter else None
        self.classifier = Classifier(self.cfg.classifier_options(), runtime)
        self.schema = output_schema(self.classifier.classes, self.cfg.include_phi)

    def __call__(self, images: Sequence) -> pl.DataFrame:
        tables = [batch_to_table(self._run(list(images[i:i + self.cfg.batch_size]), i), self.schema)
                  for i in range(0, len(images), self.cfg.batch_size)]
        if not tables:
            return pl.from_arrow(self.schema.empty_table())
        return pl.concat([pl.from_arrow(t) for t in tables])

    def _run(self, chunk: list, offset: int) -> dict:
        items = [InputItem(safe_text(str(x)), str(x)) if isinstance(x, (str, Path)) else
                 InputItem(f"bytes:{offset + j}", data=bytes(x)) if isinstance(x, (bytes, bytearray)) else None
                 for j, x in enumerate(chunk)]
        batch = decode_items([it or InputItem(f"array:{offset + j}", data=b"-") for j, it in enumerate(items)],
                             self.cfg.work_size, **self.cfg.decode_options())
        for j, x in enumerate(chunk):
            if items[j] is None:  # an array: decoded already, only the work-size resize applies
                batch["sha256"][j], batch["format"][j] = "", "array"
                try:
                    img = _array_image(np.asarray(x), self.cfg.work_size)
                except (ValueError, TypeError) as e:
                    batch["error_type"][j], batch["error_message"][j] = "not_image", str(e)
                    continue
                batch["image"][j], batch["polarity"][j] = img, polarity(img)
                batch["status"][j], batch["error_type"][j], batch["error_message"][j] = "ok", None, None
                batch["height"][j], batch["width"][j] = img_shape(x)
        if self.segmenter is not None:
            batch = self.segmenter(batch)
        return self.classifier(batch)


def img_shape(x) -> tuple[int, int]:
    shape = np.shape(x)
    return int(shape[0]), int(shape[1])


def _array_image(x: np.ndarray, size: int = WORK_SIZE) -> np.ndarray:
    if x.ndim != 2:
        raise ValueError(f"arrays must be 2-D grayscale images, not shape {x.shape}")
    if x.dtype == np.uint8:
        return resize_uint8(x, size)
    if np.issubdtype(x.dtype, np.floating) and x.size and 0 <= x.min() and x.max() <= 1:
        return resize_uint8(x.astype(np.float32), size)
    x = x.astype(np.float64)  # other integer or float ranges: the data's own range
    return resize_uint8(((x - x.min()) / max(float(x.max() - x.min()), 1e-12)).astype(np.float32), size)


def score(archive: str | Path, out: str | Path | None = None, **options) -> pl.DataFrame:
    """Score every input of ``archive`` (folder tree, list file or Parquet) with the Ray
    pipeline; rows are written to ``out`` (resumable) or a temporary folder, and returned."""
    from cxrscreen.config import from_dict
    from cxrscreen.pipeline.score import score_archive

    cfg = from_dict(ScoreConfig, options)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out) if out is not None else Path(tmp)
        summary = score_archive(archive, folder, cfg, progress=False)
        if out is not None and cfg.worklist and summary.rows:
            from cxrscreen.results import write_worklist

            write_worklist(folder)
        from cxrscreen.results import read_output

        return read_output(folder) if summary.rows else pl.DataFrame()


__all__ = ["Screener", "score"]
