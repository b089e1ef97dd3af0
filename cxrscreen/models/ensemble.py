"""ensemble: several classifiers of one architecture behind one checkpoint; the output is the
mean of the members' log-probabilities (a geometric mean of their probabilities).

``combine_checkpoints`` builds one from separately trained checkpoints (``cxrscreen
ensemble``); the result is an ordinary registry model, so scoring, every runtime, evaluation
and calibration treat it like any other classifier. Trained directly with ``cxrscreen train``
the members learn jointly through the averaged output instead.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn

from cxrscreen.models.registry import build_model, register


class Ensemble(nn.Module):
    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        return torch.stack([m(x).log_softmax(1) for m in self.members]).mean(0)


@register("ensemble", "classify", 224, "mean log-probability of N members of one architecture (cxrscreen ensemble)")
def ensemble(num_classes: int = 4, in_channels: int = 1, member: str = "cxrnet", n: int = 3,
             member_kwargs: dict | None = None):
    return Ensemble([build_model(member, num_classes, in_channels, **(member_kwargs or {})) for _ in range(n)])


def combine_checkpoints(member_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """One ``ensemble`` checkpoint from trained classifier folders (same architecture, classes,
    input size and lung crop). ``train_config.yaml`` is the first member's with the ensemble
    as model; ``model.json`` lists every member's seed, best epoch and validation metrics."""
    from safetensors.torch import load_file, save_file

    from cxrscreen.models.checkpoint import read_info, read_train_config, write_info, write_train_config

    dirs = [Path(d) for d in member_dirs]
    if len(dirs) < 2:
        raise ValueError("an ensemble needs at least two members")
    infos = [read_info(d) for d in dirs]
    first = infos[0]
    same = ("name", "task", "classes", "input_size", "in_channels", "kwargs", "lung_crop", "intensity")
    for d, info in zip(dirs[1:], infos[1:]):
        differs = [k for k in same if getattr(info, k) != getattr(first, k)]
        if differs:
            raise ValueError(f"{d} differs from {dirs[0]} in {', '.join(differs)}: members must match")
    if first.task != "classify" or first.name == "ensemble":
        raise ValueError(f"{dirs[0]}: members must be single classifiers, not {first.task} / {first.name}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {f"members.{i}.{k}": v for i, d in enumerate(dirs) for k, v in load_file(d / "model.safetensors").items()}
    save_file(state, out / "model.safetensors")
    (out / "ood.safetensors").unlink(missing_ok=True)
    configs = [read_train_config(d) for d in dirs]
    members = [{"dir": str(d), "seed": c.get("seed"), "best_epoch": i.metrics.get("best_epoch"),
                "epochs_run": i.metrics.get("epochs_run"), "train_seconds": i.metrics.get("train_seconds"),
                "val": i.metrics.get("val")} for d, c, i in zip(dirs, configs, infos)]
    kwargs = {"member": first.name, "n": len(dirs), "member_kwargs": first.kwargs}
    info = dataclasses.replace(first, name="ensemble", kwargs=kwargs, temperature=1.0, refer_threshold=None,
                               ood_threshold=None, ood_refer_rate=None,
                               evaluation={}, metrics={"members": members, "workers": first.metrics.get("workers"),
                                                       "train_seconds": sum(m["train_seconds"] or 0 for m in members)})
    write_info(out, info)
    write_train_config(out, {**configs[0], "model": "ensemble", "model_kwargs": kwargs, "out": str(out)})
    return out
