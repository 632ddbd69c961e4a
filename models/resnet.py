"""ResNet (He et al. 2016) with BasicBlock and Bottleneck, CIFAR-style stem for 32x32 input.

The classic Conv→BN→ReLU pattern with bias-free convs and 1x1 downsample shortcuts
(Conv→BN), the most common BatchNorm-folding target.
"""

from __future__ import annotations

import torch
from torch import nn

from models.calibrate import prepare, seeded
from models.inputs import images

_STAGES: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
    )


class BasicBlock(nn.Module):
    """Two 3x3 Conv→BN with a residual connection."""

    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.relu = nn.ReLU()
        self.shortcut = _shortcut(in_ch, ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), each Conv→BN, with a residual connection."""

    expansion = 4

    def __init__(self, in_ch: int, ch: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = ch * self.expansion
        self.conv1 = nn.Conv2d(in_ch, ch, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.conv3 = nn.Conv2d(ch, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem Conv→BN→ReLU, four stages (width, 2w, 4w, 8w), global pool, Linear head."""

    def __init__(self, depth: int = 18, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        if depth not in _STAGES:
            raise ValueError(f"depth must be one of {sorted(_STAGES)}, got {depth}")
        kind, blocks = _STAGES[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        layers: list[nn.Module] = []
        in_ch = width
        for i, n in enumerate(blocks):
            ch = width * 2**i
            for j in range(n):
                layers.append(block(in_ch, ch, stride=2 if (i > 0 and j == 0) else 1))
                in_ch = ch * block.expansion
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.layers(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def resnet(depth: int = 18, width: int = 16, num_classes: int = 10) -> ResNet:
    """An untrained ResNet in train mode, like torchvision's constructors."""
    return ResNet(depth=depth, width=width, num_classes=num_classes)


def build_resnet(
    depth: int = 18, width: int = 16, num_classes: int = 10, *, seed: int = 0
) -> ResNet:
    """A deterministic eval-mode ResNet with calibrated BN stats and random BN affines."""
    with seeded(seed):
        model = resnet(depth, width, num_classes)
    return prepare(model, lambda g: images(8, g), seed=seed)
