"""cxrnet: the efficient default classifier (a compact VGG-style CNN with batch norm and
global average pooling; ~0.85M parameters, fast on CPUs, true 1-channel input)."""

from __future__ import annotations

import torch.nn as nn

from cxrscreen.models.registry import register


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.MaxPool2d(2)]


@register("cxrnet", "classify", 224, "efficient default: 5 conv blocks (16..192) + BN + GAP (~0.85M params)")
def cxrnet(num_classes: int = 4, in_channels: int = 1, widths: tuple[int, ...] = (16, 32, 64, 128, 192),
           dropout: float = 0.3):
    layers, c = [nn.Conv2d(in_channels, widths[0], 5, stride=2, padding=2, bias=False),
                 nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)], widths[0]
    for w in widths:
        layers += _block(c, w)
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c, num_classes))
