"""Structural reparameterization: summed linear branches merged into one conv, proven by the trace."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normsurgeon.maths import pad_kernel, regroup_kernel
from normsurgeon.passes.reparameterize import reparameterize
from normsurgeon.report import SkipReason
from tests.helpers import count_batchnorm_like, give_realistic_stats

TOLERANCE = 1e-4  # max |new - original| relative to the output's scale, on inputs the pass never saw


def _conv_bn(cin: int, cout: int, kernel: int, *, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, dilation=dilation, groups=groups, bias=False),
                         nn.BatchNorm2d(cout))


class RepBlock(nn.Module):
    """RepVGG's training-time block: 3x3 conv+BN + 1x1 conv+BN (+ identity BN when shapes allow), then ReLU."""

    def __init__(self, cin: int, cout: int, *, stride: int = 1, groups: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.kxk = _conv_bn(cin, cout, 3, stride=stride, groups=groups, dilation=dilation)
        self.one = _conv_bn(cin, cout, 1, stride=stride, groups=groups)
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kxk(x) + self.one(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)


class PoolBlock(nn.Module):
    """A 3x3 conv+BN beside an average pool+BN (a pool that counts padded zeros is a depthwise conv)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv_bn(channels, channels, 3)
        self.pool = nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=True), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.pool(x)


class NonLinearBranch(nn.Module):
    """Not one conv: one branch has a ReLU between its BN and the sum."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.kxk, self.one = _conv_bn(channels, channels, 3), _conv_bn(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kxk(x) + torch.relu(self.one(x))


class SumThenBatchNormAct(nn.Module):
    """Two bare convs summed, then a BatchNorm with its activation inside: the norm merges, the act stays."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        from timm.layers import BatchNormAct2d

        self.a, self.b = nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, channels, 1)
        self.bn = BatchNormAct2d(channels, act_layer=nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x) + self.b(x))


class Flat(nn.Module):
    """A RepVGG sum written in the model's own forward(): there is no submodule to replace."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.kxk, self.one = _conv_bn(channels, channels, 3), _conv_bn(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kxk(x) + self.one(x)


def _assert_matches(original: nn.Module, changed: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        want, got = original(x), changed(x)
    assert (got - want).abs().max().item() <= TOLERANCE * want.abs().max().item()


def _prepared(model: nn.Module, shape=(2, 8, 12, 12)) -> tuple[nn.Module, tuple]:
    x = torch.randn(shape)
    return give_realistic_stats(model, x), (x,)


# ------------------------------------------------------------------------------- small blocks


@pytest.mark.parametrize("kwargs, branches", [
    ({}, "conv 3x3, conv 1x1, identity"),
    ({"groups": 8}, "conv 3x3, conv 1x1, identity"),  # depthwise: the identity is a depthwise kernel too
    ({"groups": 2}, "conv 3x3, conv 1x1, identity"),
    ({"stride": 2}, "conv 3x3, conv 1x1"),
    ({"dilation": 2}, "conv 3x3, conv 1x1, identity"),  # a 1x1 kernel lines up with a dilated 3x3
], ids=["dense", "depthwise", "grouped", "stride2", "dilated"])
def test_a_repvgg_block_becomes_one_conv_and_its_act(kwargs, branches):
    model, inputs = _prepared(nn.Sequential(RepBlock(8, 8, **kwargs), nn.Conv2d(8, 4, 1)))

    report = reparameterize(model, inputs)

    (change,) = report.changes
    assert change.module == "0" and f"({branches})" in change.detail and report.passed
    merged = report.model[0]
    assert isinstance(merged, nn.Sequential) and isinstance(merged[1], nn.ReLU) and count_batchnorm_like(report.model) == 0
    assert merged[0].groups == kwargs.get("groups", 1) and merged[0].kernel_size == (3, 3)
    _assert_matches(model, report.model, torch.randn(3, 8, 12, 12))


def test_an_average_pool_branch_is_a_depthwise_conv():
    model, inputs = _prepared(nn.Sequential(PoolBlock(8)))

    report = reparameterize(model, inputs)

    assert "avg-pool 3x3" in report.changes[0].detail and count_batchnorm_like(report.model) == 0
    assert isinstance(report.model[0], nn.Conv2d)
    _assert_matches(model, report.model, torch.randn(1, 8, 10, 10))


def test_timm_conditional_position_encoding_is_conv_plus_identity():
    from timm.models.fastvit import RepConditionalPosEnc

    model, inputs = _prepared(nn.Sequential(RepConditionalPosEnc(8, spatial_shape=(7, 7))))

    report = reparameterize(model, inputs)

    assert "(conv 7x7, identity)" in report.changes[0].detail
    assert isinstance(report.model[0], nn.Conv2d) and report.model[0].kernel_size == (7, 7)
    _assert_matches(model, report.model, torch.randn(1, 8, 9, 9))


def test_a_sum_then_batchnorm_act_merges_the_norm_and_keeps_the_act():
    model, inputs = _prepared(nn.Sequential(SumThenBatchNormAct(8)))

    report = reparameterize(model, inputs)

    assert report.changes[0].detail.endswith("then its SiLU")
    conv, act = report.model[0]
    assert isinstance(conv, nn.Conv2d) and isinstance(act, nn.SiLU) and count_batchnorm_like(report.model) == 0
    _assert_matches(model, report.model, torch.randn(2, 8, 12, 12))


def test_a_branch_through_a_non_linear_op_is_skipped_with_the_reason():
    model, inputs = _prepared(nn.Sequential(NonLinearBranch(8)))
    before = copy.deepcopy(model.state_dict())

    report = reparameterize(model, inputs, inplace=True)

    assert report.changes == []
    (skip,) = report.skipped
    assert (skip.module, skip.reason) == ("0", SkipReason.BRANCHES_NOT_MERGEABLE)
    assert skip.detail == "one branch goes through relu(): it is not linear"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_branches_whose_kernels_do_not_line_up_are_skipped_with_the_reason():
    block = Flat(8)
    block.one = _conv_bn(8, 8, 3, dilation=2)  # same output size as the 3x3, but its taps are spread apart
    model, inputs = _prepared(nn.Sequential(block))

    report = reparameterize(model, inputs)

    assert report.changes == []
    assert [(s.module, s.reason, s.detail) for s in report.skipped] == [
        ("0", SkipReason.BRANCHES_NOT_MERGEABLE, "dilations differ ((1, 1) and (2, 2))")]


def test_a_sum_in_the_models_own_forward_is_skipped():
    model, inputs = _prepared(Flat(8))

    report = reparameterize(model, inputs)

    assert report.changes == [] and [s.reason for s in report.skipped] == [SkipReason.UNSUPPORTED_STRUCTURE]


def test_a_hooked_branch_is_left_as_it_was():
    model, inputs = _prepared(nn.Sequential(RepBlock(8, 8)))
    model[0].one[0].register_forward_hook(lambda module, args, output: None)

    report = reparameterize(model, inputs)

    assert report.changes == [] and [s.reason for s in report.skipped] == [SkipReason.HOOKED]


def test_the_merged_kernel_maths_is_exact():
    x = torch.randn(2, 12, 7, 7, dtype=torch.float64)
    grouped = torch.randn(12, 3, 3, 3, dtype=torch.float64)
    for groups in (1, 2, 4):
        regrouped = regroup_kernel(grouped, 4, groups)
        torch.testing.assert_close(F.conv2d(x, regrouped, groups=groups, padding=1),
                                   F.conv2d(x, grouped, groups=4, padding=1), rtol=0, atol=1e-12)
    one = torch.randn(12, 12, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(F.conv2d(x, pad_kernel(one, (1, 1)), padding=1), F.conv2d(x, one), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------- timm models


@pytest.mark.slow
@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "fastvit_t8"])
def test_timm_reparameterizable_models_keep_no_more_batchnorms_than_timm(name):
    timm = pytest.importorskip("timm")
    from timm.utils.model import reparameterize_model

    x = torch.randn(1, 3, 64, 64)
    model = give_realistic_stats(timm.create_model(name, pretrained=False), x)
    by_timm = reparameterize_model(copy.deepcopy(model))

    report = reparameterize(model, (x,))

    assert report.passed and report.changes and report.skipped == []
    assert count_batchnorm_like(report.model) <= count_batchnorm_like(by_timm) < count_batchnorm_like(model)
    _assert_matches(model, report.model, torch.randn(2, 3, 64, 64))
