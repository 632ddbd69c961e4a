"""Give freshly built reference models the state of a trained one.

A model straight from its constructor has BatchNorm running stats of 0 and 1 and norm
affines of 1 and 0, so folding it is the identity and a wrong fold goes unnoticed. The
functions here give every norm layer non-trivial values: random affines (some negative
scales), and running stats recomputed from real forward passes, so they are non-zero means
and non-unit variances that match what each layer actually sees.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

Inputs = tuple[torch.Tensor, ...]
M = TypeVar("M", bound=nn.Module)

_NORM_TYPES = (_BatchNorm, _InstanceNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG for the block and restore it afterwards.

    Module constructors draw their initial weights from the global RNG; forking it keeps
    model building deterministic without disturbing the caller's random state.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def is_norm(module: nn.Module) -> bool:
    """True for torch norm layers and hand-written ones (a class named ``...Norm``)."""
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


def randomize_affine(model: M, generator: torch.Generator) -> M:
    """Give every norm layer's ``weight``/``bias`` random non-trivial values, in place.

    weight ~ U(0.5, 1.5) with roughly one entry in five (and at least one) negated, so sign
    handling is exercised; bias ~ N(0, 0.2). Layers without an affine are left alone.
    """
    with torch.no_grad():
        for module in model.modules():
            if not is_norm(module):
                continue
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor):
                w = torch.rand(weight.shape, generator=generator) + 0.5
                flip = torch.rand(weight.shape, generator=generator)
                negate = flip < 0.2
                negate.view(-1)[flip.view(-1).argmin()] = True
                weight.copy_(torch.where(negate, -w, w).to(weight.dtype))
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                b = torch.randn(bias.shape, generator=generator) * 0.2
                bias.copy_(b.to(bias.dtype))
    return model


def calibrate_batchnorm(
    model: M, make_batch: Callable[[], Inputs], *, steps: int = 4
) -> M:
    """Recompute BatchNorm running stats from ``steps`` batches, then switch to eval mode.

    Stats are reset and accumulated as an exact average over the batches (momentum=None),
    in train mode under no_grad, so they describe the activations each BN layer really
    receives. Each layer's momentum is restored afterwards.
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if bns:
        momenta = [bn.momentum for bn in bns]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        model.train()
        with torch.no_grad():
            for _ in range(steps):
                model(*make_batch())
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
    return model.eval()


def prepare(
    model: M,
    make_batch: Callable[[torch.Generator], Inputs],
    *,
    seed: int,
    steps: int = 4,
) -> M:
    """Randomize norm affines, calibrate BN stats on batches from ``make_batch``; eval mode.

    The affines are randomized first so that the calibrated stats match the activations the
    eval-mode model produces (as after training), keeping deep models' outputs well scaled.
    """
    generator = torch.Generator().manual_seed(seed)
    randomize_affine(model, generator)
    return calibrate_batchnorm(model, lambda: make_batch(generator), steps=steps)
