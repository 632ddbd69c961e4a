"""Pre-activation ResNet (He et al. 2016b) plus blocks that exercise every BN fold direction.

Where each BatchNorm sits, and what a folder may do with it:

- ``PreActBlock.bn1`` and the head ``bn``: after a residual add, before ReLU: no conv
  neighbour to fold into, so at most a per-channel affine.
- ``PreActBlock.bn2``: Conv→BN→ReLU: folds backward into ``conv1``.
- ``ReluBnConv1x1Block.bn``: Conv→ReLU→BN→Conv1x1 (padding 0): the ReLU blocks a backward
  fold, but it folds *forward* into the 1x1 conv exactly.
- ``ReplicatePadBlock.bn``: ReLU→BN→Conv3x3 with ``padding_mode='replicate'``: padding
  copies normalized values, so the forward fold is exact.
- ``ZeroPadBlock.bn``: ReLU→BN→Conv3x3 with zero padding: the padded zeros are not
  normalized, so a forward fold changes the border outputs; this BN must stay.
"""

from __future__ import annotations

import torch
from torch import nn

from models.calibrate import prepare, seeded
from models.inputs import images


class PreActBlock(nn.Module):
    """BN→ReLU→Conv3x3→BN→ReLU→Conv3x3 plus identity (or 1x1 conv) shortcut."""

    def __init__(self, in_ch: int, ch: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_ch != ch:
            self.shortcut = nn.Conv2d(in_ch, ch, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


class ReluBnConv1x1Block(nn.Module):
    """x + Conv1x1(BN(ReLU(Conv3x3(x)))): BN foldable only forward, into the 1x1 conv."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        self.relu = nn.ReLU()
        self.bn = nn.BatchNorm2d(ch)
        self.proj = nn.Conv2d(ch, ch, 1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(self.bn(self.relu(self.conv(x))))


class _ReluBnConvBlock(nn.Module):
    """x + Conv3x3(BN(ReLU(x))) with the given padding mode."""

    padding_mode = "zeros"

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.bn = nn.BatchNorm2d(ch)
        self.conv = nn.Conv2d(ch, ch, 3, padding=1, padding_mode=self.padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(self.bn(self.relu(x)))


class ReplicatePadBlock(_ReluBnConvBlock):
    """BN before a replicate-padded 3x3 conv: exactly foldable forward."""

    padding_mode = "replicate"


class ZeroPadBlock(_ReluBnConvBlock):
    """BN before a zero-padded 3x3 conv: not exactly foldable, must stay."""

    padding_mode = "zeros"


class PreActResNet(nn.Module):
    """Stem conv, two pre-activation stages, the fold-direction blocks, BN→ReLU→pool→Linear."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.layer1 = PreActBlock(width, width)
        self.layer2 = PreActBlock(width, 2 * width, stride=2)
        self.relu_bn_conv1x1 = ReluBnConv1x1Block(2 * width)
        self.replicate_pad = ReplicatePadBlock(2 * width)
        self.zero_pad = ZeroPadBlock(2 * width)
        self.bn = nn.BatchNorm2d(2 * width)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        x = self.zero_pad(self.replicate_pad(self.relu_bn_conv1x1(x)))
        x = self.pool(self.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))


def build_preact_resnet(*, seed: int = 0) -> PreActResNet:
    """A deterministic eval-mode PreActResNet with calibrated BN stats and random affines."""
    with seeded(seed):
        model = PreActResNet()
    return prepare(model, lambda g: images(8, g), seed=seed)
