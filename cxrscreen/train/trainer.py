"""Ray Train loop: DDP over ``num_workers`` (CPU here, GPUs on a cluster), early stopping on
validation macro-F1, safetensors checkpoints, resume, per-epoch history and train time."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
import yaml

from cxrscreen.config import to_dict
from cxrscreen.evaluate.metrics import classification_metrics, fit_temperature, softmax
from cxrscreen.models import build_model, get_entry
from cxrscreen.models.checkpoint import ModelInfo, save_checkpoint
from cxrscreen.train.config import AugmentConfig, TrainConfig
from cxrscreen.train.data import ArrayDataset, labeled_splits, load_images


def _loader(images, targets, cfg: TrainConfig, train: bool, sampler_weights=None):
    from torch.utils.data import DataLoader, WeightedRandomSampler

    ds = ArrayDataset(images, targets, cfg.in_channels, cfg.augment if train else None)
    if train and sampler_weights is not None:
        sampler = WeightedRandomSampler(torch.as_tensor(sampler_weights, dtype=torch.double), len(ds),
                                        generator=torch.Generator().manual_seed(cfg.seed))
        return DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler)
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=train,
                      generator=torch.Generator().manual_seed(cfg.seed))


def predict_logits(model, images: np.ndarray, cfg: TrainConfig, device) -> np.ndarray:
    model.eval()
    out = []
    with torch.inference_mode():
        for x, _ in _loader(images, np.zeros(len(images)), cfg, train=False):
            out.append(model(x.to(device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def train_loop_per_worker(config: dict) -> None:
    """Runs in every Ray Train worker: data, model (DDP), epochs, reports + checkpoints."""
    import ray.train
    import ray.train.torch as rtt

    from cxrscreen.config import from_dict

    cfg = from_dict(TrainConfig, config["cfg"])
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    ctx = ray.train.get_context()
    if cfg.threads_per_worker:
        torch.set_num_threads(cfg.threads_per_worker)
    size = cfg.input_size or get_entry(cfg.model).input_size
    df, classes = labeled_splits(cfg)
    index = {c: i for i, c in enumerate(classes)}
    data = {}
    for split in ("train", "val"):
        part = df.filter(pl.col("split") == split)
        images, ok = load_images(part["file"].to_list(), size)
        data[split] = (images[ok], np.array([index[t] for t in part["target"]])[ok])
    counts = np.bincount(data["train"][1], minlength=len(classes)).astype(float)
    class_weights = counts.sum() / (len(classes) * np.maximum(counts, 1))
    sampler_w = class_weights[data["train"][1]] if cfg.balance == "sampler" else None
    train_loader = rtt.prepare_data_loader(_loader(*data["train"], cfg, True, sampler_w),
                                           add_dist_sampler=sampler_w is None)
    model = rtt.prepare_model(build_model(cfg.model, len(classes), cfg.in_channels, **cfg.model_kwargs))
    device = rtt.get_device()
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    elif cfg.optimizer in ("adam", "adamw"):
        cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        opt = cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    weight = torch.tensor(class_weights, dtype=torch.float32, device=device) if cfg.balance == "weights" else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    start_epoch, best_f1, stale, history = 0, -1.0, 0, []
    resume = ray.train.get_checkpoint()
    resume_dir = Path(cfg.resume_from) if cfg.resume_from else None
    if resume is not None or resume_dir is not None:
        from safetensors.torch import load_file

        with (resume.as_directory() if resume is not None else _nullpath(resume_dir)) as d:
            _unwrap(model).load_state_dict(load_file(Path(d) / "model.safetensors"))
            state = json.loads((Path(d) / "train_state.json").read_text())
        start_epoch, best_f1, stale, history = state["epoch"] + 1, state["best_f1"], state["stale"], state["history"]
    for epoch in range(start_epoch, cfg.epochs):
        if hasattr(train_loader, "sampler") and hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        model.train()
        t0, total, seen = time.perf_counter(), 0.0, 0
        for x, y in train_loader:
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, seen = total + loss.item() * len(y), seen + len(y)
        epoch_s = time.perf_counter() - t0
        logits = predict_logits(_unwrap(model), data["val"][0], cfg, device)
        m = classification_metrics(data["val"][1], softmax(logits), classes)
        val_loss = float(torch.nn.functional.cross_entropy(torch.from_numpy(logits),
                                                           torch.from_numpy(data["val"][1])).item())
        improved = m["macro_f1"] > best_f1
        best_f1, stale = (m["macro_f1"], 0) if improved else (best_f1, stale + 1)
        row = {"epoch": epoch, "train_loss": total / max(seen, 1), "val_loss": val_loss,
               "val_accuracy": m["accuracy"], "val_macro_f1": m["macro_f1"], "epoch_seconds": epoch_s,
               "improved": improved}
        history.append(row)
        stop = stale >= cfg.early_stopping_patience or epoch == cfg.epochs - 1
        checkpoint = None
        with tempfile.TemporaryDirectory() as tmp:
            if ctx.get_world_rank() == 0:  # every epoch; Ray keeps the best by val_macro_f1
                info = ModelInfo(cfg.model, "classify", classes, size, cfg.in_channels, cfg.model_kwargs,
                                 temperature=fit_temperature(logits, data["val"][1]), metrics={"val": m})
                save_checkpoint(tmp, _unwrap(model), info)
                (Path(tmp) / "train_state.json").write_text(json.dumps(
                    {"epoch": epoch, "best_f1": best_f1, "stale": stale, "history": history}))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(dict(row, stop=stop, history=json.dumps(history)), checkpoint=checkpoint)
        if stale >= cfg.early_stopping_patience:
            break


class _nullpath:
    def __init__(self, p):
        self.p = p

    def __enter__(self):
        return str(self.p)

    def __exit__(self, *exc):
        return False


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def train(cfg: TrainConfig, progress=print) -> Path:
    """Train ``cfg.model`` with Ray Train; returns the output folder holding the best
    checkpoint (model.safetensors + model.json), train_config.yaml and history.parquet."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from cxrscreen.pipeline.score import init_ray

    init_ray()
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    threads = cfg.threads_per_worker or max(1, int(ray_cpus() // max(cfg.num_workers, 1)))
    cfg = dataclasses.replace(cfg, threads_per_worker=threads)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"cfg": to_dict(cfg)},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": min(1.0, threads)}),
        run_config=ray.train.RunConfig(
            name=f"cxrscreen-{out.name}", storage_path=str(out / "ray"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_macro_f1",
                                                         checkpoint_score_order="max")),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    if not result.best_checkpoints:
        raise RuntimeError("training produced no checkpoint")
    best = max(result.best_checkpoints, key=lambda cm: cm[1]["val_macro_f1"])[0]
    with best.as_directory() as d:
        for name in ("model.safetensors", "model.json", "train_state.json"):
            shutil.copy(Path(d) / name, out / name)
    state = json.loads((out / "train_state.json").read_text())
    hist = pl.DataFrame(json.loads(result.metrics["history"]))  # the last report holds every epoch
    hist.write_parquet(out / "history.parquet")
    info = json.loads((out / "model.json").read_text())
    info["metrics"]["train_seconds"] = time.perf_counter() - t0
    info["metrics"]["epochs_run"] = len(hist)
    (out / "model.json").write_text(json.dumps(info, indent=2))
    (out / "train_config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    progress(f"best val macro-F1 {state['best_f1']:.3f} at epoch {state['epoch']}; "
             f"{info['metrics']['train_seconds']:.0f} s; checkpoint in {out}")
    return out


def ray_cpus() -> float:
    import ray

    return ray.cluster_resources().get("CPU", 1.0)


__all__ = ["train", "train_loop_per_worker", "AugmentConfig"]
