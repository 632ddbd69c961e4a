"""Deterministic example inputs shared by the reference models.

Each function takes a batch size and an optional generator: without one it uses a fixed
seed, so ``example_inputs(1)`` is the first row of ``example_inputs(4)``; calibration passes
its own generator to draw fresh batches from the same distribution.
"""

from __future__ import annotations

import torch

SEED = 1234


def _gen(generator: torch.Generator | None) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(SEED)


def images(
    batch: int, generator: torch.Generator | None = None, *, channels: int = 3, size: int = 32
) -> tuple[torch.Tensor]:
    """A (batch, channels, size, size) image-like tensor, offset from zero like raw pixels."""
    return (torch.randn(batch, channels, size, size, generator=_gen(generator)) * 0.8 + 0.3,)


def features(
    batch: int, *shape: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor]:
    """A (batch, *shape) float tensor ~ N(0.2, 1)."""
    return (torch.randn(batch, *shape, generator=_gen(generator)) + 0.2,)


def tokens(
    batch: int, generator: torch.Generator | None = None, *, length: int = 16, vocab: int = 100
) -> tuple[torch.Tensor]:
    """A (batch, length) int64 tensor of token ids in [0, vocab)."""
    return (torch.randint(0, vocab, (batch, length), generator=_gen(generator)),)
