"""The custom architectures of the source papers (see ../shared/SEEDS.md), in PyTorch."""

from __future__ import annotations

import torch
import torch.nn as nn

from cxrscreen.models.registry import register


@register("p2_small_cnn", "classify", 224, "P2: 3-conv CNN, flatten 54x54x128 -> dense 64 (~23.98M params)")
def p2_small_cnn(num_classes: int = 2, in_channels: int = 1):
    """Conv32-Conv64-Pool-Drop.25-Conv128-Pool-Drop.25-Flatten-Dense64-Drop.5-Dense (valid padding,
    as Keras). The paper's single sigmoid unit is ``num_classes=2`` logits here (softmax)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout(0.25), nn.Conv2d(64, 128, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25),
        nn.Flatten(), nn.Linear(54 * 54 * 128, 64), nn.ReLU(),
        nn.Dropout(0.5), nn.Linear(64, num_classes))


@register("p3_deep_cnn", "classify", 299, "P3: six conv+ReLU blocks (32..1024), 3x3/2 max-pool each, one FC")
def p3_deep_cnn(num_classes: int = 4, in_channels: int = 1):
    layers, c = [], in_channels
    for width in (32, 64, 128, 256, 512, 1024):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, stride=2)]
        c = width
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(1024 * 3 * 3, num_classes))


class CNNLSTM(nn.Module):
    """P0: conv+pool features; rows of the feature map are time steps, (width x channels) the
    features; an LSTM reads them; dense layers classify. ~638k parameters at 128x128, 3 classes."""

    def __init__(self, num_classes: int = 3, in_channels: int = 1, input_size: int = 128, hidden: int = 77):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2))
        side = ((input_size - 2) // 2 - 2) // 2
        self.lstm = nn.LSTM(64 * side, hidden, batch_first=True)
        self.head = nn.Sequential(nn.Linear(hidden, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, num_classes))

    def forward(self, x):
        f = self.features(x)  # B, C, H, W
        seq = f.permute(0, 2, 3, 1).flatten(2)  # B, H (time), W*C
        _, (h, _) = self.lstm(seq)
        return self.head(h[-1])


@register("p0_cnn_lstm", "classify", 128, "P0: CNN + LSTM over feature-map rows (~638k params)")
def p0_cnn_lstm(num_classes: int = 3, in_channels: int = 1, **kwargs):
    return CNNLSTM(num_classes, in_channels, **kwargs)


class BackboneRNN(nn.Module):
    """P4: a torchvision CNN's last feature map (7x7xC at 224) as a 49-step sequence of C
    features -> LSTM or GRU -> dropout -> dense."""

    def __init__(self, num_classes: int = 2, in_channels: int = 1, backbone: str = "densenet121",
                 rnn: str = "lstm", hidden: int = 256, dropout: float = 0.5):
        super().__init__()
        from cxrscreen.models.registry import build_model

        net = build_model(backbone, num_classes=1, in_channels=in_channels)
        self.features = _feature_extractor(net, backbone)
        with torch.no_grad():
            channels = self.features(torch.zeros(1, in_channels, 64, 64)).shape[1]
        cell = {"lstm": nn.LSTM, "gru": nn.GRU}[rnn]
        self.rnn = cell(channels, hidden, batch_first=True)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def forward(self, x):
        f = self.features(x)  # B, C, 7, 7
        out, _ = self.rnn(f.flatten(2).transpose(1, 2))  # B, 49, C
        return self.head(out[:, -1])


def _feature_extractor(net: nn.Module, name: str) -> nn.Module:
    if name.startswith("resnet"):
        return nn.Sequential(*list(net.children())[:-2])
    if name.startswith("densenet"):
        return nn.Sequential(net.features, nn.ReLU())
    if hasattr(net, "features"):  # vgg, alexnet, mobilenet
        return net.features
    raise ValueError(f"no feature extractor rule for backbone {name!r}")


@register("p4_backbone_rnn", "classify", 224, "P4: torchvision backbone feature grid -> LSTM/GRU")
def p4_backbone_rnn(num_classes: int = 2, in_channels: int = 1, **kwargs):
    return BackboneRNN(num_classes, in_channels, **kwargs)
