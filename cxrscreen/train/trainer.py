"""Ray Train loop: DDP over ``num_workers`` (CPU here, GPUs on a cluster), early stopping on
the validation score (macro-F1 for classifiers, Dice for the U-Net), safetensors checkpoints,
resume, per-epoch history and train time."""

from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from cxrscreen.config import to_dict
from cxrscreen.metrics import classification_metrics, fit_temperature, softmax
from cxrscreen.masks import dice_scores
from cxrscreen.models import build_model, check_input_size, get_entry
from cxrscreen.models.checkpoint import ModelInfo, read_info, save_checkpoint, update_info, write_train_config
from cxrscreen.models.ood import last_linear
from cxrscreen.train.config import TrainConfig
from cxrscreen.train.data import ArrayDataset, labeled_splits, load_images, segmentation_splits


def make_loader(images, targets, cfg: TrainConfig, train: bool, sampler_weights=None):
    from torch.utils.data import DataLoader, WeightedRandomSampler

    ds = ArrayDataset(images, targets, input_size(cfg), cfg.in_channels, cfg.augment if train else None,
                      cfg.intensity)
    if train and sampler_weights is not None:
        sampler = WeightedRandomSampler(torch.as_tensor(sampler_weights, dtype=torch.double), len(ds),
                                        generator=torch.Generator().manual_seed(cfg.seed))
        return DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler)
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=train,
                      generator=torch.Generator().manual_seed(cfg.seed))


def predict_logits(model, images: np.ndarray, cfg: TrainConfig, device) -> np.ndarray:
    """Outputs of a model being trained for uint8 work images (``cxrscreen.predict.module_logits``
    at the recipe's input size, channels and intensity)."""
    from cxrscreen.predict import module_logits

    return module_logits(model, images, input_size(cfg), cfg.in_channels, cfg.intensity, device, cfg.batch_size)


class ClassifyTask:
    """Images + class indices; cross-entropy (class-weighted, optionally label-smoothed);
    score = validation macro-F1."""

    kind = "classify"

    def __init__(self, cfg: TrainConfig, size: int):
        self.cfg, self.size = cfg, size
        self.df, self.classes = labeled_splits(cfg)
        self.outputs = len(self.classes)
        self.decoded: dict[str, np.ndarray] = {}  # split -> mask of the images that decoded

    def arrays(self, split: str):
        part = self.df.filter(pl.col("split") == split)
        images, ok = load_images(part["file"].to_list(), self.cfg.lung_crop)
        self.decoded[split] = ok
        index = {c: i for i, c in enumerate(self.classes)}
        return images[ok], np.array([index[t] for t in part["target"]], np.int64)[ok]

    def source_weights(self, split: str = "train") -> np.ndarray:
        """Sampling weight per decoded image: each (source, class) cell drawn equally often."""
        part = self.df.filter(pl.col("split") == split).filter(pl.Series(self.decoded[split]))
        sources = part["source"].fill_null("").to_list() if "source" in part.columns else [""] * len(part)
        keys = list(zip(sources, part["target"].to_list()))
        counts: dict = {}
        for k in keys:
            counts[k] = counts.get(k, 0) + 1
        return np.array([1.0 / counts[k] for k in keys])

    def distilled_targets(self, split: str, targets: np.ndarray) -> np.ndarray:
        """Probability targets: ``1 - distill`` of the true class plus ``distill`` times the
        teachers' mean prediction (geometric mean at ``distill_temperature``), each teacher
        preparing the images as it was trained."""
        from cxrscreen.predict import ModelRunner, classify_files

        if not 0 <= self.cfg.distill <= 1 or self.cfg.distill_temperature <= 0:
            raise ValueError(f"distill must be in [0, 1] and distill_temperature > 0, not "
                             f"{self.cfg.distill} and {self.cfg.distill_temperature}")
        files = self.df.filter(pl.col("split") == split)["file"].to_list()
        logp = []
        for t in self.cfg.teachers:
            try:
                teacher = ModelRunner(t, "classify", device="cpu")
            except ValueError as e:
                raise ValueError(f"teacher {t!r} is not a trained checkpoint: {e}") from None
            if teacher.info.classes != self.classes:
                raise ValueError(f"teacher {t} has classes {teacher.info.classes}, not {self.classes}")
            out, ok = classify_files(teacher, files)
            logits = out.logits
            if len(logits) != len(targets):
                raise ValueError(f"teacher {t} decoded {int(ok.sum())} of the {len(targets)} {split} images")
            logp.append(torch.from_numpy(logits / self.cfg.distill_temperature).log_softmax(1))
        soft = torch.stack(logp).mean(0).softmax(1).numpy()
        return (1 - self.cfg.distill) * np.eye(self.outputs, dtype=np.float32)[targets] + self.cfg.distill * soft

    def class_weights(self, targets) -> np.ndarray:
        counts = np.bincount(targets, minlength=self.outputs).astype(float)
        return counts.sum() / (self.outputs * np.maximum(counts, 1))

    def loss_fn(self, targets, device):
        w = self.class_weights(targets) if self.cfg.balance == "weights" else None
        weight = None if w is None else torch.tensor(w, dtype=torch.float32, device=device)
        return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=self.cfg.label_smoothing)

    def evaluate(self, logits, targets) -> tuple[dict, dict]:
        m = classification_metrics(targets, softmax(logits), self.classes)
        loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets)).item()
        return {"val_loss": loss, "val_accuracy": m["accuracy"], "val_macro_f1": m["macro_f1"],
                "val_score": m["macro_f1"]}, m

    def info(self, logits, targets, metrics) -> ModelInfo:
        return ModelInfo(self.cfg.model, "classify", self.classes, self.size, self.cfg.in_channels,
                         self.cfg.model_kwargs, temperature=fit_temperature(logits, targets), metrics={"val": metrics},
                         lung_crop=self.cfg.lung_crop, intensity=self.cfg.intensity)


def bce_dice_loss(logits, masks):
    """Segmentation loss: binary cross-entropy + soft Dice."""
    p = torch.sigmoid(logits)
    inter = (p * masks).sum((1, 2, 3))
    dice = 1 - (2 * inter + 1) / (p.sum((1, 2, 3)) + masks.sum((1, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, masks) + dice.mean()


class SegmentTask:
    """Images + lung masks; BCE + soft Dice; score = validation Dice."""

    kind = "segment"
    outputs = 1
    classes = ["lung"]

    def __init__(self, cfg: TrainConfig, size: int):
        self.cfg, self.size = cfg, size
        self.df = segmentation_splits(cfg)

    def arrays(self, split: str):
        part = self.df.filter(pl.col("split") == split)
        images, ok = load_images(part["file"].to_list())
        masks, ok_m = load_images(part["mask_file"].to_list())
        keep = ok & ok_m
        masks = torch.from_numpy(masks[keep] > 127)[:, None].float()
        if masks.shape[-1] != self.size:  # masks at the model's size, images at the work size
            masks = F.interpolate(masks, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return images[keep], (masks[:, 0] > 0.5).numpy().astype(np.uint8)

    def loss_fn(self, targets, device):
        return bce_dice_loss

    def evaluate(self, logits, targets) -> tuple[dict, dict]:
        d = dice_scores(logits[:, 0] > 0, targets > 0)
        loss = F.binary_cross_entropy_with_logits(torch.from_numpy(logits[:, 0]),
                                                  torch.from_numpy(targets.astype(np.float32))).item()
        m = {"dice": float(d.mean()), "n": int(len(d))}
        return {"val_loss": loss, "val_dice": m["dice"], "val_score": m["dice"]}, m

    def info(self, logits, targets, metrics) -> ModelInfo:
        return ModelInfo(self.cfg.model, "segment", self.classes, self.size, self.cfg.in_channels,
                         self.cfg.model_kwargs, metrics={"val_pseudo_masks": metrics}, intensity=self.cfg.intensity)


def input_size(cfg: TrainConfig) -> int:
    """The config's input size, else the registry's size for the model."""
    return cfg.input_size or get_entry(cfg.model).input_size


def make_task(cfg: TrainConfig):
    return (SegmentTask if get_entry(cfg.model).task == "segment" else ClassifyTask)(cfg, input_size(cfg))


def _optimizer(cfg: TrainConfig, params):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer in ("adam", "adamw"):
        cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def prepare_model(model, cfg: TrainConfig):
    """channels_last weights (faster convolutions on CPUs and GPUs) and, with ``ema_decay``,
    the moving average that is validated and saved: returns (model, ema or None)."""
    from torch.optim.swa_utils import AveragedModel

    def ema_update(averaged, current, steps):
        # warm-up (decay (1 + t) / (10 + t) until it reaches ema_decay): a batch-norm network
        # averaged with even 10% of its random initialisation predicts one class
        decay = min(cfg.ema_decay, (1 + steps.item()) / (10 + steps.item()))
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1 - decay)
        else:  # counters (num_batches_tracked) follow the model
            torch._foreach_copy_(averaged, current)

    model = model.to(memory_format=torch.channels_last)
    ema = AveragedModel(model, multi_avg_fn=ema_update, use_buffers=True) if cfg.ema_decay > 0 else None
    return model, ema


def mix_batch(x, alpha: float):
    """Mixup: each image blended with another of the batch, weight ``lam`` ~ Beta(alpha, alpha)
    (kept >= 0.5, so the first image dominates); returns (mixed x, partner's index, lam)."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    lam = max(lam, 1 - lam)
    partner = torch.randperm(len(x), device=x.device)
    return lam * x + (1 - lam) * x[partner], partner, lam


def compactness_loss(embedding: torch.Tensor, y: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Within-class share of the batch's embedding variance (0: every class one point, 1: class
    means all alike); scale-free, so it cannot be lowered by shrinking the embedding. Tight
    classes let the class-conditional Mahalanobis ``ood_score`` tell new images from known ones."""
    e = embedding.float().flatten(1)
    onehot = torch.nn.functional.one_hot(y, num_classes or int(y.max()) + 1).to(e.dtype)
    means = (onehot.T @ e) / onehot.sum(0).clamp_min(1)[:, None]
    within = (e - means[y]).pow(2).sum()
    return within / (e - e.mean(0)).pow(2).sum().clamp_min(1e-6)


def train_step(model, x, y, loss_fn, opt, cfg: TrainConfig, ema=None) -> float:
    """One optimisation step (bf16 autocast when ``cfg.precision`` says so, mixup when
    ``cfg.mixup`` > 0 and the targets are classes: indices or probabilities, ``cfg.compactness``
    times ``compactness_loss`` on the input of the last linear layer - in training, after any
    dropout before it - when the targets are class indices and not mixed: ``TrainConfig``
    refuses compactness with mixup or teachers); returns the loss."""
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {cfg.precision!r}; choose fp32 or bf16")
    mixed = cfg.mixup > 0 and y.ndim <= 2
    if mixed:
        x, partner, lam = mix_batch(x, cfg.mixup)
    x = x.contiguous(memory_format=torch.channels_last)
    captured = []
    compact = cfg.compactness > 0 and y.ndim == 1 and not mixed
    hook = None
    if compact:
        found = last_linear(_unwrap(model))
        if found is None:
            raise ValueError("compactness needs a model whose last layer is a torch.nn.Linear")
        hook = found[1].register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    try:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            out = model(x).float()
    finally:
        if hook is not None:
            hook.remove()
    loss = lam * loss_fn(out, y) + (1 - lam) * loss_fn(out, y[partner]) if mixed else loss_fn(out, y)
    if compact:
        loss = loss + cfg.compactness * compactness_loss(captured[-1], y, out.shape[1])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if ema is not None:
        ema.update_parameters(_unwrap(model))
    return loss.item()


def load_training_state(folder: Path, model, ema, opt, device, steps_per_epoch: int) -> dict:
    """Restore a checkpoint folder for resuming: raw weights into ``model``, their moving
    average into ``ema`` (with its step count, so it keeps averaging instead of restarting
    from a copy), optimizer state; returns train_state.json."""
    from safetensors.torch import load_file

    saved = load_file(folder / "model.safetensors")  # the averaged weights when ema_decay > 0
    raw = folder / "train_model.safetensors"
    model.load_state_dict(load_file(raw) if ema is not None and raw.exists() else saved)
    state = json.loads((folder / "train_state.json").read_text())
    if ema is not None:
        ema.module.load_state_dict(saved)
        ema.n_averaged.fill_((state["epoch"] + 1) * steps_per_epoch)
    if (folder / "optimizer.pt").exists():  # tensors and numbers only: weights_only is safe
        opt.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True, map_location=device))
    return state


def train_loop_per_worker(config: dict) -> None:
    """Runs in every Ray Train worker: data, model (DDP), epochs, reports + checkpoints."""
    import ray.train
    import ray.train.torch as rtt
    from safetensors.torch import save_file

    from cxrscreen.config import from_dict

    cfg = from_dict(TrainConfig, config["cfg"])
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.threads_per_worker:
        torch.set_num_threads(cfg.threads_per_worker)
    task = make_task(cfg)
    train_x, train_y = task.arrays("train")
    val_x, val_y = task.arrays("val")
    sampler_w = None
    if task.kind == "classify" and cfg.balance == "sampler":
        sampler_w = task.class_weights(train_y)[train_y]
    elif task.kind == "classify" and cfg.balance == "source":
        sampler_w = task.source_weights()
    fit_y = task.distilled_targets("train", train_y) if task.kind == "classify" and cfg.teachers else train_y
    loader = rtt.prepare_data_loader(make_loader(train_x, fit_y, cfg, True, sampler_w),
                                     add_dist_sampler=sampler_w is None)
    model, ema = prepare_model(build_model(cfg.model, task.outputs, cfg.in_channels, **cfg.model_kwargs), cfg)
    model = rtt.prepare_model(model)
    device = rtt.get_device()
    ema = ema.to(device) if ema is not None else None
    opt = _optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    loss_fn = task.loss_fn(train_y, device)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs) if cfg.scheduler == "cosine" else None
    start, best, stale, history = 0, -1.0, 0, []
    resume = ray.train.get_checkpoint()
    if resume is not None or cfg.resume_from:
        with resume.as_directory() if resume is not None else nullcontext(cfg.resume_from) as d:
            state = load_training_state(Path(d), _unwrap(model), ema, opt, device, len(loader))
        start, best, stale, history = state["epoch"] + 1, state["best"], state["stale"], state["history"]
        for _ in range(start if sched else 0):
            sched.step()
    for epoch in range(start, cfg.epochs):
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        model.train()
        t0, total, seen = time.perf_counter(), 0.0, 0
        for x, y in loader:
            total, seen = total + train_step(model, x, y, loss_fn, opt, cfg, ema) * len(y), seen + len(y)
        epoch_s = time.perf_counter() - t0
        if sched is not None:
            sched.step()
        evaluated = ema.module if ema is not None else _unwrap(model)
        logits = predict_logits(evaluated, val_x, cfg, device)
        row_metrics, full = task.evaluate(logits, val_y)
        improved = row_metrics["val_score"] > best
        best, stale = (row_metrics["val_score"], 0) if improved else (best, stale + 1)
        row = {"epoch": epoch, "train_loss": total / max(seen, 1), **row_metrics, "epoch_seconds": epoch_s,
               "improved": improved}
        history.append(row)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if ray.train.get_context().get_world_rank() == 0:  # every epoch; Ray keeps the best
                save_checkpoint(tmp, evaluated, task.info(logits, val_y, full))
                if ema is not None:  # resuming continues from the raw weights, not their average
                    save_file({k: v.detach().cpu().contiguous() for k, v in _unwrap(model).state_dict().items()},
                              Path(tmp) / "train_model.safetensors")
                torch.save(opt.state_dict(), Path(tmp) / "optimizer.pt")
                (Path(tmp) / "train_state.json").write_text(json.dumps(
                    {"epoch": epoch, "best": best, "stale": stale, "history": history}))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            last = stale >= cfg.early_stopping_patience or epoch == cfg.epochs - 1
            # the whole history rides on the last report only (Ray logs every report)
            ray.train.report(dict(row, history=json.dumps(history) if last else ""), checkpoint=checkpoint)
        if last:
            break


def _resolve_model(spec: str) -> str:
    """A checkpoint path made absolute (Ray workers run elsewhere); bundled names unchanged."""
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def train(cfg: TrainConfig, progress=print) -> Path:
    """Train ``cfg.model`` with Ray Train; returns the output folder holding the best
    checkpoint (model.safetensors + model.json), train_config.yaml and history.parquet."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from cxrscreen.cluster import init_ray

    check_input_size(cfg.model, input_size(cfg), cfg.in_channels, **cfg.model_kwargs)
    init_ray()
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cpus = ray.cluster_resources().get("CPU", 1.0)
    threads = cfg.threads_per_worker or max(1, int(cpus // max(cfg.num_workers, 1)))
    saved = dataclasses.replace(cfg, threads_per_worker=threads)  # as the user wrote it
    # Ray workers run in their own working directory: hand them absolute paths
    cfg = dataclasses.replace(cfg, threads_per_worker=threads, data=str(Path(cfg.data).resolve()),
                              resume_from=str(Path(cfg.resume_from).resolve()) if cfg.resume_from else None,
                              teachers=[_resolve_model(t) for t in cfg.teachers] if cfg.teachers else None)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"cfg": to_dict(cfg)},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": min(1.0, threads)}),
        run_config=ray.train.RunConfig(
            name=f"cxrscreen-{out.name}", storage_path=str(out / "ray"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_score",
                                                         checkpoint_score_order="max")),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    if not result.best_checkpoints:
        raise RuntimeError("training produced no checkpoint")
    best = max(result.best_checkpoints, key=lambda cm: cm[1]["val_score"])[0]
    (out / "ood.safetensors").unlink(missing_ok=True)  # a reference of earlier weights: `evaluate` refits it
    with best.as_directory() as d:
        for name in ("model.safetensors", "model.json", "train_state.json", "optimizer.pt",
                     "train_model.safetensors"):
            if (Path(d) / name).exists():
                shutil.copy(Path(d) / name, out / name)
    state = json.loads((out / "train_state.json").read_text())
    hist = pl.DataFrame(json.loads(result.metrics["history"]))  # the last report holds every epoch
    hist.write_parquet(out / "history.parquet")
    metrics = read_info(out).metrics
    info = update_info(out, metrics={**metrics, "train_seconds": time.perf_counter() - t0, "epochs_run": len(hist),
                                     "best_epoch": state["epoch"], "workers": cfg.num_workers})
    write_train_config(out, to_dict(saved))
    progress(f"best validation score {state['best']:.4f} at epoch {state['epoch']}; "
             f"{info.metrics['train_seconds']:.0f} s; checkpoint in {out}")
    return out
