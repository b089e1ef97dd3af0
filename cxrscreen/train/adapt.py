"""Few-shot adaptation of a trained U-Net to a handful of ground-truth masks (the expert set),
with a leave-one-out estimate: each expert image is scored by a copy fine-tuned on all the
others, so every reported Dice comes from a model that never saw that mask. The shipped
adapted model is fine-tuned on all of them (its own expert Dice would be a training score
and is never reported as held out).
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import torch

from cxrscreen.models import load_model, save_checkpoint
from cxrscreen.train.config import AugmentConfig, TrainConfig, checkpoint_config
from cxrscreen.train.data import ArrayDataset
from cxrscreen.train.trainer import (bce_dice_loss, dice_scores, make_task, predict_logits, prepare_model,
                                     train_step)

ADAPT_AUGMENT = AugmentConfig(zoom=0.1, shift=0.06, rotate=7.0, intensity=0.1)


def finetune(module, images: np.ndarray, masks: np.ndarray, cfg: TrainConfig, steps: int, lr: float,
             batch_size: int, seed: int):
    """A fine-tuned copy of ``module``: ``steps`` Adam steps on random augmented batches."""
    torch.manual_seed(seed)
    model, _ = prepare_model(copy.deepcopy(module), dataclasses.replace(cfg, ema_decay=0.0))
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr)
    data = ArrayDataset(images, masks, masks.shape[-1], cfg.in_channels, ADAPT_AUGMENT, cfg.intensity)
    for _ in range(steps):
        xs, ys = zip(*(data[int(i)] for i in torch.randperm(len(data))[:batch_size]))
        train_step(model, torch.stack(xs), torch.stack(ys), bce_dice_loss, opt, cfg)
    return model.eval()


def mask_logits(module, images: np.ndarray, cfg: TrainConfig) -> np.ndarray:
    return predict_logits(module, images, cfg, torch.device("cpu"))[:, 0]


def adapt_segmenter(model_dir: str | Path, out_dir: str | Path, steps: int = 40, lr: float = 1e-4,
                    batch_size: int = 8, seed: int = 0, data: str | None = None, progress=print) -> dict:
    """Leave-one-out Dice of adapting ``model_dir`` to the expert masks, then the model adapted
    on all of them in ``out_dir`` (model.json holds both, and the base model's held-out scores)."""
    from cxrscreen.metrics import mask_metrics

    model_dir, out = Path(model_dir), Path(out_dir)
    base = load_model(str(model_dir), "segment")
    cfg = checkpoint_config(model_dir)
    if data:
        cfg.data = data
    task = make_task(cfg)
    images, masks = task.arrays("test")
    if len(images) < 3:
        raise ValueError(f"{cfg.data}: {len(images)} expert masks; adaptation needs at least 3")
    truth = masks > 0
    held_out = []
    for k in range(len(images)):
        rest = np.arange(len(images)) != k
        model = finetune(base.module, images[rest], masks[rest], cfg, steps, lr, batch_size, seed + k)
        held_out.append(mask_logits(model, images[k:k + 1], cfg)[0])
        progress(f"expert image {k + 1}/{len(images)}: leave-one-out Dice "
                 f"{dice_scores(held_out[-1][None] > 0, truth[k:k + 1])[0]:.4f}")
    loo = mask_metrics(np.stack(held_out) > 0, truth)
    before = mask_metrics(mask_logits(base.module, images, cfg) > 0, truth)
    final = finetune(base.module, images, masks, cfg, steps, lr, batch_size, seed)
    val_x, val_y = task.arrays("val")
    after_val = mask_metrics(mask_logits(final, val_x, cfg) > 0, val_y > 0) if len(val_x) else {}
    metrics = {**{f"expert_masks_loo_{v}": m for v, m in loo.items()},
               **{f"base_expert_masks_{v}": m for v, m in before.items()},
               **{f"base_{k}": v for k, v in base.info.metrics.items() if k.startswith("pseudo_masks_val_")},
               **{f"pseudo_masks_val_{v}": m for v, m in after_val.items()},
               "adaptation": {"base": str(model_dir), "base_sha256": base.weights_sha256, "steps": steps,
                              "lr": lr, "batch_size": batch_size, "seed": seed, "images": int(len(images)),
                              "augment": dataclasses.asdict(ADAPT_AUGMENT)},
               **{k: base.info.metrics[k] for k in ("train_seconds", "epochs_run", "best_epoch")
                  if k in base.info.metrics}}
    save_checkpoint(out, final, dataclasses.replace(base.info, metrics=metrics))
    for name in ("train_config.yaml", "history.parquet"):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, out / name)
    progress(f"expert masks, leave-one-out: Dice {loo['raw']['dice']:.4f} (base model {before['raw']['dice']:.4f}); "
             f"adapted model in {out}")
    return metrics
