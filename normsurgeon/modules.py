"""Small modules normsurgeon puts into users' models."""

from __future__ import annotations

import torch
from torch import nn


class ChannelAffine(nn.Module):
    """y = x * weight + bias per channel along ``channel_dim``: a test-time BatchNorm with no stats."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, channel_dim: int = 1) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        self.channel_dim = channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return x * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, channel_dim={self.channel_dim}"
