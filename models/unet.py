"""A small U-Net with GroupNorm (Conv→GroupNorm→SiLU), as in diffusion-model backbones.

GroupNorm normalizes per sample, so it cannot be folded into a conv; it is the target of
norm conversion (InstanceNorm ↔ GroupNorm) and of inspection.
"""

from __future__ import annotations

import torch
from torch import nn

from models.calibrate import prepare, seeded
from models.inputs import images


class ConvBlock(nn.Module):
    """Two Conv3x3→GroupNorm→SiLU."""

    def __init__(self, in_ch: int, out_ch: int, groups: int = 4) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1),
            nn.GroupNorm(groups, out_ch),
            nn.SiLU(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
            nn.GroupNorm(groups, out_ch),
            nn.SiLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class UNet(nn.Module):
    """Two strided-conv downsamplings, a bottleneck, two ConvTranspose upsamplings with skips."""

    def __init__(self, in_ch: int = 3, width: int = 16, out_ch: int = 3) -> None:
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.enc1 = ConvBlock(in_ch, w1)
        self.down1 = nn.Conv2d(w1, w1, 3, stride=2, padding=1)
        self.enc2 = ConvBlock(w1, w2)
        self.down2 = nn.Conv2d(w2, w2, 3, stride=2, padding=1)
        self.mid = ConvBlock(w2, w3)
        self.up2 = nn.ConvTranspose2d(w3, w2, 2, stride=2)
        self.dec2 = ConvBlock(2 * w2, w2)
        self.up1 = nn.ConvTranspose2d(w2, w1, 2, stride=2)
        self.dec1 = ConvBlock(2 * w1, w1)
        self.out = nn.Conv2d(w1, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.enc1(x)
        s2 = self.enc2(self.down1(s1))
        h = self.mid(self.down2(s2))
        h = self.dec2(torch.cat((self.up2(h), s2), dim=1))
        h = self.dec1(torch.cat((self.up1(h), s1), dim=1))
        return self.out(h)


def build_unet(*, seed: int = 0) -> UNet:
    """A deterministic eval-mode GroupNorm U-Net with random GroupNorm affines."""
    with seeded(seed):
        model = UNet()
    return prepare(model, lambda g: images(2, g), seed=seed)
