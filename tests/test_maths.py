"""The folding maths alone, against torch's own reference layers."""

import pytest
import torch
from torch import nn

from normsurgeon.maths import batchnorm_scale_shift, input_shift_contribution, scale_channels_


def _bn(channels: int, affine: bool = True) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, affine=affine).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-2, 2)
        bn.running_var.uniform_(0.1, 3)
        if affine:
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
    return bn


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_scale_shift_reproduces_eval_batchnorm(affine):
    bn = _bn(6, affine)
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    s, t = batchnorm_scale_shift(bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    expected = bn.double()(x)
    assert torch.allclose(x * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1), expected, atol=1e-12)
    assert s.dtype == torch.float64


@pytest.mark.parametrize("groups", [1, 2, 4], ids=lambda g: f"groups{g}")
def test_conv_transpose_output_scaling_matches_per_channel_scale(groups):
    conv = nn.ConvTranspose2d(8, 12, 3, groups=groups).double()
    scale = torch.randn(12, dtype=torch.float64)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    expected = (conv(x) - conv.bias.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1)
    with torch.no_grad():
        scale_channels_(conv.weight, scale, channel_dim=1, groups=groups)
        conv.bias.zero_()
    assert torch.allclose(conv(x), expected, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 2, 4], ids=lambda g: f"groups{g}")
def test_conv_input_affine_becomes_weight_scale_and_bias(groups):
    conv = nn.Conv2d(8, 12, 3, groups=groups).double()
    scale, shift = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    expected = conv(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    with torch.no_grad():
        conv.bias += input_shift_contribution(conv.weight, shift, groups=groups)
        scale_channels_(conv.weight, scale, channel_dim=1, groups=groups)
    assert torch.allclose(conv(x), expected, atol=1e-10)


def test_linear_input_affine():
    linear = nn.Linear(5, 3).double()
    scale, shift = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64)
    expected = linear(x * scale + shift)
    with torch.no_grad():
        linear.bias += input_shift_contribution(linear.weight, shift)
        scale_channels_(linear.weight, scale, channel_dim=1)
    assert torch.allclose(linear(x), expected, atol=1e-12)


def test_scaling_is_chunked_and_exact_for_large_weights(monkeypatch):
    import normsurgeon.maths as maths

    monkeypatch.setattr(maths, "_CHUNK_ELEMENTS", 7)  # forces many uneven chunks
    weight = torch.randn(13, 4, 3)
    scale = torch.randn(13, dtype=torch.float64)
    expected = (weight.double() * scale.view(-1, 1, 1)).float()
    scale_channels_(weight, scale, channel_dim=0)
    assert torch.equal(weight, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_weights_are_rounded_once(dtype):
    weight = torch.randn(8, 3, 3, 3).to(dtype)
    scale = torch.rand(8, dtype=torch.float64) + 0.5
    expected = (weight.double() * scale.view(-1, 1, 1, 1)).to(dtype)
    scale_channels_(weight, scale, channel_dim=0)
    assert weight.dtype == dtype
    assert torch.equal(weight, expected)
