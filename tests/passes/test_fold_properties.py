"""Property-based: folding random conv/conv-transpose/linear + BN layers is exact to dtype tolerance."""

from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from normsurgeon import fold_batchnorm
from normsurgeon.check import default_tolerance

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _set_stats(bn: nn.modules.batchnorm._BatchNorm, data) -> None:
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor(data.draw(st.lists(st.floats(-50, 50), min_size=n, max_size=n))))
        bn.running_var.copy_(torch.tensor(data.draw(st.lists(st.floats(1e-4, 100), min_size=n, max_size=n))))
        if bn.affine:
            bn.weight.copy_(torch.tensor(data.draw(st.lists(st.floats(-3, 3), min_size=n, max_size=n))))
            bn.bias.copy_(torch.tensor(data.draw(st.lists(st.floats(-3, 3), min_size=n, max_size=n))))
        bn.num_batches_tracked.fill_(1)


def _assert_folds_exactly(model: nn.Module, x: torch.Tensor, dtype: torch.dtype, channels_last: bool = False) -> None:
    model = model.eval().to(dtype)
    x = x.to(dtype)
    if channels_last and x.dim() == 4:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    unfolded = copy.deepcopy(model)
    reference = copy.deepcopy(model).double()
    report = fold_batchnorm(model, (x,), raise_on_mismatch=False)
    assert len(report.changed("folded")) == 1, [s.message for s in report.skipped]
    with torch.no_grad():
        exact = reference(x.double())
        folded_error = (model(x).double() - exact).abs().max().item()
        unfolded_error = (unfolded(x).double() - exact).abs().max().item()
    # Against the exact float64 result, the folded model may be off by what the unfolded model in
    # the same dtype is (activation rounding), plus the dtype's tolerance for the fold itself.
    atol, rtol = default_tolerance(dtype)
    assert folded_error <= 2 * unfolded_error + atol + rtol * exact.abs().max().item()


@st.composite
def conv_case(draw):
    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2, 3]))
    in_ch = groups * draw(st.integers(1, 3))
    out_ch = groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 2))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    transposed = draw(st.booleans())
    bias = draw(st.booleans())
    size = draw(st.integers(5, 7))
    return dims, groups, in_ch, out_ch, kernel, stride, dilation, padding, padding_mode, transposed, bias, size


@SETTINGS
@given(case=conv_case(), affine=st.booleans(), dtype=st.sampled_from(list(DTYPES)), channels_last=st.booleans(), data=st.data())
def test_conv_bn_fold_property(case, affine, dtype, channels_last, data):
    dims, groups, in_ch, out_ch, kernel, stride, dilation, padding, padding_mode, transposed, bias, size = case
    if transposed:
        conv_cls = [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d][dims - 1]
        conv = conv_cls(in_ch, out_ch, kernel, stride=stride, dilation=dilation, padding=min(padding, dilation * (kernel - 1)),
                        groups=groups, bias=bias)
    else:
        conv_cls = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dims - 1]
        conv = conv_cls(in_ch, out_ch, kernel, stride=stride, dilation=dilation, padding=padding, groups=groups, bias=bias,
                        padding_mode=padding_mode)
    bn = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d][dims - 1](out_ch, affine=affine)
    _set_stats(bn, data)
    x = torch.randn(2, in_ch, *([size] * dims))
    _assert_folds_exactly(nn.Sequential(conv, bn), x, DTYPES[dtype], channels_last)


@SETTINGS
@given(
    in_f=st.integers(1, 8), out_f=st.integers(1, 8), bias=st.booleans(), affine=st.booleans(),
    dtype=st.sampled_from(list(DTYPES)), data=st.data(),
)
def test_linear_bn_fold_property(in_f, out_f, bias, affine, dtype, data):
    bn = nn.BatchNorm1d(out_f, affine=affine)
    _set_stats(bn, data)
    _assert_folds_exactly(nn.Sequential(nn.Linear(in_f, out_f, bias=bias), bn), torch.randn(3, in_f), DTYPES[dtype])
