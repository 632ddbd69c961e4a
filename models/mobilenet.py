"""MobileNetV2 (Sandler et al. 2018), narrowed for 32x32 input.

Inverted residuals: 1x1 expand Conv→BN→ReLU6, 3x3 depthwise Conv (groups=channels)→BN→ReLU6,
1x1 linear projection Conv→BN. BN after every conv, including depthwise ones, is where
unfolded BatchNorm costs the most at inference.
"""

from __future__ import annotations

import torch
from torch import nn

from models.calibrate import prepare, seeded
from models.inputs import images

# (expansion t, output channels c, repeats n, first stride s), as in the paper's table 2.
_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 8, 1, 1),
    (6, 12, 2, 2),
    (6, 16, 2, 2),
    (6, 24, 2, 2),
)


def conv_bn_act(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """Conv→BN→ReLU6 with 'same' zero padding and no conv bias."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (3x3), project (1x1, no activation); residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_bn_act(in_ch, hidden, 1))
        layers += [
            conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """Stem, inverted residual stages, 1x1 head Conv→BN→ReLU6, pool, Linear classifier."""

    def __init__(self, num_classes: int = 10, stem: int = 8, head: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn_act(3, stem, 3)]
        in_ch = stem
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(in_ch, c, s if i == 0 else 1, t))
                in_ch = c
        layers.append(conv_bn_act(in_ch, head, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def build_mobilenetv2(*, seed: int = 0) -> MobileNetV2:
    """A deterministic eval-mode MobileNetV2 with calibrated BN stats and random BN affines."""
    with seeded(seed):
        model = MobileNetV2()
    return prepare(model, lambda g: images(8, g), seed=seed)
