"""MLPs with BatchNorm1d, on 2-D (B, C) and on token (B, T, C) input.

``MLP`` covers Linear→BN1d (bias and no bias) and a BN with ``affine=False``.
``TokenMLP`` applies BatchNorm1d over the channel dim of a (B, T, C) tensor via
``transpose(1, 2)``, the pattern of 3-D Linear→BN that folders must see through.
"""

from __future__ import annotations

import torch
from torch import nn

from models.calibrate import prepare, seeded
from models.inputs import features


class MLP(nn.Module):
    """Linear→BN1d→ReLU, Linear(no bias)→BN1d(affine=False)→ReLU, Linear head."""

    def __init__(self, in_features: int = 32, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, hidden, bias=False)
        self.bn2 = nn.BatchNorm1d(hidden, affine=False)
        self.head = nn.Linear(hidden, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.fc1(x)))
        x = self.relu(self.bn2(self.fc2(x)))
        return self.head(x)


class TokenMLP(nn.Module):
    """On (B, T, C): Linear, then BN1d over C via transpose, ReLU, Linear back to C."""

    def __init__(self, channels: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = self.bn(h.transpose(1, 2)).transpose(1, 2)
        return self.fc2(self.relu(h))


def mlp_inputs(batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor]:
    """A (batch, 32) feature tensor."""
    return features(batch, 32, generator=generator)


def token_mlp_inputs(batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor]:
    """A (batch, 8, 16) token-feature tensor."""
    return features(batch, 8, 16, generator=generator)


def build_mlp(*, seed: int = 0) -> MLP:
    """A deterministic eval-mode MLP with calibrated BN stats and random BN affines."""
    with seeded(seed):
        model = MLP()
    return prepare(model, lambda g: mlp_inputs(32, g), seed=seed)


def build_token_mlp(*, seed: int = 0) -> TokenMLP:
    """A deterministic eval-mode TokenMLP with calibrated BN stats and random BN affines."""
    with seeded(seed):
        model = TokenMLP()
    return prepare(model, lambda g: token_mlp_inputs(8, g), seed=seed)
