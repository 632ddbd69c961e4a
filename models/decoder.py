"""ConvTranspose decoders: ConvTranspose→BN in 2-D and 1-D, grouped and bias-free.

A transposed conv's weight is (in, out/groups, k...), so folding BN scales the *second*
axis, per group; ``torch.nn.utils.fusion.fuse_conv_bn_weights(transpose=True)`` gets the
grouped case wrong, which ``Decoder2d.up2`` (groups=4, no bias) and ``up3`` (groups=2) test.
"""

from __future__ import annotations

import torch
from torch import nn

from models.calibrate import prepare, seeded
from models.inputs import features


def _up(
    conv: nn.ConvTranspose1d | nn.ConvTranspose2d, bn: nn.BatchNorm1d | nn.BatchNorm2d
) -> nn.Sequential:
    return nn.Sequential(conv, bn, nn.ReLU())


class Decoder2d(nn.Module):
    """(B, 16, 4, 4) → (B, 3, 16, 16): three ConvTranspose2d→BN2d→ReLU, then Conv2d."""

    def __init__(self, in_ch: int = 16, ch: int = 32, out_ch: int = 3) -> None:
        super().__init__()
        self.up1 = _up(nn.ConvTranspose2d(in_ch, ch, 4, 2, 1), nn.BatchNorm2d(ch))
        self.up2 = _up(
            nn.ConvTranspose2d(ch, ch, 4, 2, 1, groups=4, bias=False), nn.BatchNorm2d(ch)
        )
        self.up3 = _up(nn.ConvTranspose2d(ch, ch // 2, 3, 1, 1, groups=2), nn.BatchNorm2d(ch // 2))
        self.out = nn.Conv2d(ch // 2, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.up3(self.up2(self.up1(x))))


class Decoder1d(nn.Module):
    """(B, 16, L) → (B, 4, 4L): ConvTranspose1d→BN1d→ReLU twice (one grouped), then Conv1d."""

    def __init__(self, in_ch: int = 16, ch: int = 16, out_ch: int = 4) -> None:
        super().__init__()
        self.up1 = _up(nn.ConvTranspose1d(in_ch, ch, 4, 2, 1, bias=False), nn.BatchNorm1d(ch))
        self.up2 = _up(nn.ConvTranspose1d(ch, ch, 4, 2, 1, groups=4), nn.BatchNorm1d(ch))
        self.out = nn.Conv1d(ch, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.up2(self.up1(x)))


def decoder_inputs(batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor]:
    """A (batch, 16, 4, 4) latent."""
    return features(batch, 16, 4, 4, generator=generator)


def decoder1d_inputs(batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor]:
    """A (batch, 16, 8) latent sequence."""
    return features(batch, 16, 8, generator=generator)


def build_decoder(*, seed: int = 0) -> Decoder2d:
    """A deterministic eval-mode Decoder2d with calibrated BN stats and random BN affines."""
    with seeded(seed):
        model = Decoder2d()
    return prepare(model, lambda g: decoder_inputs(8, g), seed=seed)


def build_decoder1d(*, seed: int = 0) -> Decoder1d:
    """A deterministic eval-mode Decoder1d with calibrated BN stats and random BN affines."""
    with seeded(seed):
        model = Decoder1d()
    return prepare(model, lambda g: decoder1d_inputs(8, g), seed=seed)
