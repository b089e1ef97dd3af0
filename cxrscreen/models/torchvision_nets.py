"""torchvision classifiers (ResNet, VGG, DenseNet, AlexNet, GoogLeNet, MobileNet), weights=None,
with the first convolution rebuilt for ``in_channels`` (1 = true grayscale, no 3x copy)."""

from __future__ import annotations

import torch.nn as nn

from cxrscreen.models.registry import register


def _first_conv(module: nn.Module, path: str, in_channels: int) -> None:
    parent = module
    *parents, last = path.split(".")
    for p in parents:
        parent = parent[int(p)] if p.isdigit() else getattr(parent, p)
    old = parent[int(last)] if last.isdigit() else getattr(parent, last)
    if old.in_channels == in_channels:
        return
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    bias=old.bias is not None)
    if last.isdigit():
        parent[int(last)] = new
    else:
        setattr(parent, last, new)


def _make(name: str, conv_path: str, **extra):
    def build(num_classes: int, in_channels: int = 1, **kwargs):
        import torchvision.models as tvm  # imported on first use: 1.5 s that scoring cxrnet / U-Nets never needs

        model = getattr(tvm, name)(weights=None, num_classes=num_classes, **extra, **kwargs)
        _first_conv(model, conv_path, in_channels)
        return model
    return build


for _name, _conv, _size, _extra in [
    ("resnet18", "conv1", 224, {}),
    ("resnet50", "conv1", 224, {}),
    ("resnet101", "conv1", 224, {}),
    ("vgg19", "features.0", 224, {}),
    ("densenet121", "features.conv0", 224, {}),
    ("alexnet", "features.0", 227, {}),
    ("googlenet", "conv1.conv", 299, {"aux_logits": False, "init_weights": True}),
    ("mobilenet_v3_small", "features.0.0", 224, {}),
]:
    register(_name, "classify", _size, f"torchvision {_name} (weights=None)")(_make(_name, _conv, **_extra))
