"""Training settings (mapped from configs/train/*.yaml and configs/papers/*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

# task -> raw manifest label -> class (labels not listed are left out of that task)
TASKS = {
    "4class": {"covid": "covid", "normal": "normal", "viral_pneumonia": "viral_pneumonia",
               "bacterial_pneumonia": "bacterial_pneumonia"},
    "3class": {"covid": "covid", "normal": "normal", "viral_pneumonia": "viral_pneumonia"},
    "binary": {"covid": "covid", "normal": "non_covid", "viral_pneumonia": "non_covid",
               "bacterial_pneumonia": "non_covid", "lung_opacity": "non_covid", "pneumonia": "non_covid"},
}


@dataclass
class AugmentConfig:
    zoom: float = 0.05  # random scale in [1 - zoom, 1 + zoom]
    shift: float = 0.05  # random translation, fraction of the side
    rotate: float = 5.0  # degrees
    hflip: bool = False  # chest radiographs are not left-right symmetric: off by default
    intensity: float = 0.1  # random brightness/contrast jitter
    gamma: float = 0.0  # random gamma x ** exp(u * gamma), u ~ U(-1, 1): sources differ in windowing
    erase: float = 0.0  # chance of greying out one random rectangle (2-20% of the image; random erasing)
    opacity: float = 0.0  # segmentation only: chance of painting a patchy opacity inside the lungs,
    #                       so that consolidated (white) lung is still segmented as lung
    # acquisition style (each a chance per image): sources differ in processing, not disease
    blur: float = 0.0  # Gaussian blur, sigma 0.3-1.5 px
    noise: float = 0.0  # Gaussian noise, sd 0.01-0.05
    jpeg: float = 0.0  # JPEG re-compression at quality 15-90
    resample: float = 0.0  # down to 30-80% of the size and back up
    border: float = 0.0  # black or white bars (2-10% of the side) on 1-2 edges
    text: float = 0.0  # 1-3 burned-in bright marker blocks (letters, arrows) near the edges

    NON_NEGATIVE: ClassVar[tuple] = ("zoom", "shift", "rotate", "intensity", "gamma", "erase", "opacity", "blur",
                                     "noise", "jpeg", "resample", "border", "text")


@dataclass
class TrainConfig:
    CHOICES: ClassVar[dict] = {"optimizer": ("adam", "adamw", "sgd"), "scheduler": ("none", "cosine"),
                               "precision": ("fp32", "bf16"), "balance": ("weights", "sampler", "source", "none"),
                               "intensity": ("raw", "equalize"), "in_channels": (1, 3)}
    POSITIVE: ClassVar[tuple] = ("input_size", "epochs", "batch_size", "lr", "num_workers", "threads_per_worker",
                                 "max_images_per_split", "cap_per_class", "distill_temperature")
    NON_NEGATIVE: ClassVar[tuple] = ("weight_decay", "momentum", "ema_decay", "label_smoothing", "mixup", "compactness", "distill",
                                     "early_stopping_patience")

    model: str = "resnet18"
    model_kwargs: dict = field(default_factory=dict)
    task: str = "4class"  # 4class | 3class | binary (see TASKS) ...
    class_map: dict | None = None  # ... or an explicit raw label -> class map
    data: str = "../shared/data/cxr/manifest.csv"  # manifest (CSV/Parquet) or labeled folder
    input_size: int | None = None  # default: the registry's size for the model
    in_channels: int = 1
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0  # L2 penalty (P1 uses 0.06 with SGD)
    scheduler: str = "none"  # none | cosine (learning rate annealed to 0 over ``epochs``)
    precision: str = "fp32"  # fp32 | bf16 (autocast; GPUs, CPUs with AVX512-BF16/AMX: benchmarks/train_step.py)
    ema_decay: float = 0.0  # > 0 (e.g. 0.998): validate and save an exponential moving average of the weights
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    label_smoothing: float = 0.0  # classifiers: share of each target spread evenly over the classes
    mixup: float = 0.0  # classifiers: > 0 (e.g. 0.2) trains on mixup pairs, weight ~ Beta(mixup, mixup)
    compactness: float = 0.0  # classifiers: weight of ``trainer.compactness_loss`` on the penultimate embedding
    teachers: list[str] | None = None  # classifier checkpoints: distil their mean prediction ...
    distill: float = 0.5  # ... as the share of each training target (the rest: the true label) ...
    distill_temperature: float = 2.0  # ... softened by this temperature
    balance: str = "weights"  # weights (class-weighted loss) | sampler (class-balanced sampling) |
    #                           source (each source x class cell drawn equally often) | none
    intensity: str = "raw"  # raw | equalize (per-image histogram equalisation, also at scoring: in model.json)
    early_stopping_patience: int = 5  # epochs without a better validation macro-F1
    cap_per_class: int | None = None  # P0 balances to 170 per class
    sources: list[str] | None = None  # keep only images of these manifest sources ...
    exclude_sources: list[str] | None = None  # ... and/or leave these out (leave-one-source-out)
    lung_crop: str | None = None  # segmenter (e.g. unet-lungs): train and score on the lung box
    split_seed: int = 0  # used only when the manifest has no split column
    max_images_per_split: int | None = None  # quick runs: cap each split (seeded subset)
    num_workers: int = 1  # Ray Train workers (DDP)
    use_gpu: bool = False
    threads_per_worker: int | None = None
    seed: int = 0
    out: str = "runs/model"
    resume_from: str | None = None  # a checkpoint folder written by a previous run

    def __post_init__(self):
        if self.compactness > 0 and (self.mixup > 0 or self.teachers):
            raise ValueError("compactness needs hard class targets: it cannot be combined with mixup or teachers")


def class_map_for(cfg: TrainConfig) -> dict:
    if cfg.class_map:
        return dict(cfg.class_map)
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; choose from {sorted(TASKS)} or give class_map")
    return TASKS[cfg.task]


def checkpoint_config(folder) -> TrainConfig:
    """The ``TrainConfig`` a checkpoint folder was trained with (its ``train_config.yaml``, validated)."""
    from cxrscreen.config import from_dict
    from cxrscreen.models.checkpoint import read_train_config

    return from_dict(TrainConfig, read_train_config(folder))
