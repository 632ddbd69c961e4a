"""fold_norm_affines scales a float32 weight by a float32-exact scale in float32: bit for bit the float64 product
rounded once (what ``maths.scale_channels_`` computes), over the whole exponent range, signs, subnormal and
overflowing products. Tolerance: none (torch.equal)."""

from __future__ import annotations

import pytest
import torch

from normsurgeon.maths import scale_channels_
from normsurgeon.passes.fold_norm_affine import scale_inputs_


def _wide(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """float32 values with random signs, mantissas and exponents in [-140, 120] (subnormals and near-overflow)."""
    mantissa = torch.rand(shape, generator=generator, dtype=torch.float64) + 1
    exponent = torch.randint(-140, 121, shape, generator=generator).double()
    sign = torch.randint(0, 2, shape, generator=generator).double() * 2 - 1
    return (sign * mantissa * torch.exp2(exponent)).float()


@pytest.mark.parametrize("in_dim", [1, 0])  # nn.Linear (out, in); transformers' Conv1D (in, out)
def test_float32_scaling_is_the_float64_product_rounded_once(in_dim: int) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = _wide((300, 200) if in_dim else (200, 300), generator)
    gamma = _wide((200,), generator).double()
    want = weight.clone()
    scale_channels_(want, gamma, channel_dim=in_dim)

    scale_inputs_(weight, gamma, in_dim)

    assert torch.equal(weight, want)
    assert weight.isinf().any() and (weight.abs() < torch.finfo(torch.float32).tiny).any()  # the edges were hit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_scale_float32_cannot_hold_or_a_narrow_weight_rounds_once_from_float64(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 5, generator=generator).to(dtype)
    gamma = 1 + torch.randn(5, generator=generator, dtype=torch.float64) * 1e-3  # Gemma's 1 + w, in float64
    want = (weight.double() * gamma).to(dtype)

    scale_inputs_(weight, gamma, 1)

    assert torch.equal(weight, want)
