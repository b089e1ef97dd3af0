"""``cxrscreen explain``: Grad-CAM overlays for the images of an archive (the pipeline's
stages with ``cam``; the maps themselves are computed in ``cxrscreen.cam``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cxrscreen.cam import captioned, heatmap_from_png, triplet
from cxrscreen.io.batch import decode_items
from cxrscreen.masks import decode_mask_png


def explain_items(items, classifier, segmenter=None, work_size: int = 256) -> tuple[dict, np.ndarray]:
    """Decode ``items`` (``InputItem``), segment, classify with Grad-CAM (a ``Classifier`` built
    with ``cam``): the output batch and the decoded uint8 images it was computed from."""
    batch = decode_items(items, work_size)
    if segmenter is not None:
        batch = segmenter(batch)
    images = batch["image"].copy()  # the classifier drops the column
    return classifier(batch), images


def overlays(batch: dict, images: np.ndarray, lung_crop: bool = False) -> list[tuple[int, np.ndarray]]:
    """(row, image | lung mask | heatmap triplet) for the ok rows of an ``explain_items`` batch,
    in the classifier's frame: a lung-crop classifier's heatmap is shown on the crop."""
    from cxrscreen.preprocess import crop_boxes

    masks = batch.get("lung_mask_png")
    out = []
    for i in np.nonzero(batch["status"] == "ok")[0]:
        image = images[i]
        mask = None if masks is None or masks[i] is None else decode_mask_png(masks[i])
        if lung_crop:
            box = batch["lung_bbox"][i:i + 1]
            image = crop_boxes(torch.from_numpy(image[None]), box, image.shape[-1])[0].numpy()
            if mask is not None:
                mask = crop_boxes(torch.from_numpy(mask[None].astype(np.uint8) * 255), box, mask.shape[-1])[0].numpy() > 127
        probs = {k[5:]: batch[k][i] for k in batch if k.startswith("prob_")}
        label = batch["label"][i]
        energy = batch["cam_lung_energy"][i]
        text = (f"{label} {probs.get(label, float('nan')):.2f} | {batch['cam_method'][i]} energy in lungs "
                + ("n/a" if np.isnan(energy) else f"{energy:.0%}")
                + (f" | refer: {', '.join(batch['refer_reason'][i])}" if batch["refer_reason"][i] else ""))
        out.append((int(i), captioned(triplet(image, mask, heatmap_from_png(batch["cam_png"][i])), text)))
    return out


def explain_archive(archive, out_dir, classifier: str = "cxrnet-4class", segmenter: str = "unet-lungs",
                    method: str = "gradcam", limit: int | None = None, batch_size: int = 16):
    """Grad-CAM for the images of ``archive``: ``explanations.parquet`` (one row per input:
    label, probabilities, ``cam_png``, ``cam_lung_energy``) and ``overlays/<key>.png`` triplets
    (image | lung mask | heatmap) in ``out_dir``. Returns the table (polars) without the PNGs."""
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cxrscreen.io.sources import list_inputs
    from cxrscreen.pipeline.config import ScoreConfig
    from cxrscreen.pipeline.output import batch_to_table, output_schema
    from cxrscreen.pipeline.stages import Classifier, Segmenter

    cfg = ScoreConfig(classifier=classifier, segmenter=segmenter, cam=method, batch_size=batch_size)
    seg = Segmenter(cfg.segmenter_options(), cfg.runtime_options()) if segmenter else None
    cls = Classifier(cfg.classifier_options(), cfg.runtime_options())
    out = Path(out_dir)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    items = list(list_inputs(archive))[:limit]
    schema, tables = output_schema(cls.classes), []
    for i in range(0, len(items), batch_size):
        batch, images = explain_items(items[i:i + batch_size], cls, seg, cfg.work_size)
        for j, picture in overlays(batch, images, cls.lung_crop):
            name = str(Path(str(batch["key"][j])).with_suffix("")).replace("/", "__")
            Image.fromarray(picture).save(out / "overlays" / f"{name}.png")
        tables.append(batch_to_table(batch, schema))
    table = pa.concat_tables(tables)
    pq.write_table(table, out / "explanations.parquet")
    return pl.from_arrow(table.drop_columns(["cam_png", "lung_mask_png"]))
