"""Training throughput per precision: the trainer's own ``prepare_model`` + ``train_step``
(channels_last, fp32 or bf16 autocast) for the default classifier and the default U-Net,
on random inputs of the shipped sizes. Best of 3 timings of ``--steps`` steps after 2 warm-up
steps; all settings in one process, one after another.
Usage: python benchmarks/train_step.py [--device cpu|cuda] [--steps 6]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import polars as pl
import torch

from cxrscreen.bench import machine_info
from cxrscreen.config import load_config
from cxrscreen.models import build_model, get_entry
from cxrscreen.train import TrainConfig
from cxrscreen.train.trainer import _optimizer, bce_dice_loss, prepare_model, train_step

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "train"


def images_per_s(cfg: TrainConfig, device: torch.device, steps: int) -> float:
    torch.manual_seed(0)
    size, seg = cfg.input_size, get_entry(cfg.model).task == "segment"
    model, ema = prepare_model(build_model(cfg.model, 1 if seg else 4, cfg.in_channels, **cfg.model_kwargs), cfg)
    model, ema = model.to(device), ema.to(device) if ema is not None else None
    opt = _optimizer(cfg, model.parameters())
    x = torch.randn(cfg.batch_size, cfg.in_channels, size, size, device=device)
    y = (torch.rand(cfg.batch_size, 1, size, size, device=device) > 0.5).float() if seg else \
        torch.randint(0, 4, (cfg.batch_size,), device=device)
    loss_fn = bce_dice_loss if seg else torch.nn.CrossEntropyLoss()
    best = float("inf")
    for rep in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(2 if rep == 0 else steps):
            train_step(model, x, y, loss_fn, opt, cfg, ema)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if rep:
            best = min(best, time.perf_counter() - t0)
    return steps * cfg.batch_size / best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.parquet"))
    a = p.parse_args()
    device = torch.device(a.device)
    rows = []
    for name in ("default.yaml", "unet.yaml"):
        base = load_config(TrainConfig, CONFIGS / name)
        for precision in ("fp32", "bf16"):
            cfg = dataclasses.replace(base, precision=precision)
            ips = images_per_s(cfg, device, a.steps)
            rows.append({"model": cfg.model, "config": name, "input_size": cfg.input_size,
                         "batch_size": cfg.batch_size, "precision": precision, "ema": cfg.ema_decay > 0,
                         "device": a.device, "train_images_per_s": ips, **machine_info()})
            print(f"{name:14s} {precision}: {ips:7.1f} train images/s", flush=True)
    df = pl.DataFrame(rows)
    df.write_parquet(a.out)
    print(df.select("config", "precision", "train_images_per_s"))


if __name__ == "__main__":
    main()
