"""Hand-written norm layers as they appear in real code bases, shared by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvNeXtLayerNorm(nn.Module):
    """The original ConvNeXt channels-first LayerNorm, written out (no F.layer_norm)."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.randn(c)), eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PlainLayerNorm(nn.Module):
    """An affine-free LayerNorm with F.layer_norm and no eps attribute (eps is F's default 1e-5)."""

    def __init__(self, d: int):
        super().__init__()
        self.d = d

    def forward(self, x):
        return F.layer_norm(x, (self.d,))


class FrozenBatchNorm2d(nn.Module):
    """detectron2 / torchvision FrozenBatchNorm2d: stats and affine as buffers, no parameters."""

    def __init__(self, c: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.rand(c) + 0.5)
        self.register_buffer("bias", torch.randn(c))
        self.register_buffer("running_mean", torch.randn(c))
        self.register_buffer("running_var", torch.rand(c) + 0.1)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


class RMSNorm(nn.Module):
    """Named like a norm, but divides by the mean absolute value."""

    def __init__(self, d: int):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), 1e-6

    def forward(self, x):
        return self.weight * x / (x.abs().mean(-1, keepdim=True) + self.eps)
