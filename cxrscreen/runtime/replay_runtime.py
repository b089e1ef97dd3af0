"""A zero-cost stand-in for a model, for the ceiling benchmark (``cxrscreen bench --ceiling``).

``ReplayRuntime`` runs the real model once, on the first image it is given, and from then on
returns that output for every image of every batch without computing anything: the stages
around it (decode, mask post-processing, crops, referral, Arrow, writing) do all their usual
work on realistic outputs (two lungs, real probabilities), so the pipeline's speed with an
infinitely fast model can be measured. Never used for scoring.
"""

from __future__ import annotations

import torch


class ReplayRuntime:
    name = "replay"
    precision = "fp32"

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.module, self.device = module.eval().to(device), device
        self.template: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.template is None:
            with torch.inference_mode():
                self.template = self.module(x[:1].to(self.device)).float()
        return self.template.expand(len(x), *self.template.shape[1:])
