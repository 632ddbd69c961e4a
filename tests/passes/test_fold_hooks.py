"""Hooks and parametrizations the fold cannot see through are refused before any edit, not caught by the check.

A fold changes what the producer conv returns (and what a consumer conv receives) and drops the
BN module; hooks on them would see different values or be lost, and a pre-hook such as the old
``spectral_norm`` recomputes the weight and would undo the edit. Tolerance for the folds that do
happen: the pass's own check (fp32: 1e-5 + 1e-4·max|out|); refused models are unchanged bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from normsurgeon import SkipReason, convert_norms, fold_batchnorm, fold_norm_affines
from tests.helpers import give_realistic_stats


def _conv_bn(bias: bool = True) -> nn.Sequential:
    return give_realistic_stats(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=bias), nn.BatchNorm2d(4), nn.ReLU()), _x())


def _x() -> torch.Tensor:
    return torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _assert_refused_untouched(model: nn.Module, reason: SkipReason, detail: str) -> None:
    before = copy.deepcopy(model.state_dict())
    report = fold_batchnorm(model, (_x(),))
    assert [(s.reason, s.detail) for s in report.skipped] == [(reason, detail)]
    assert not report.changes and isinstance(model[1], nn.BatchNorm2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _double(module, args, output):
    return output * 2


def _shift_input(module, args):
    return (args[0] + 1,)


@pytest.mark.parametrize(
    "where, register, detail",
    [
        ("bn", lambda m: m[1].register_forward_hook(_double), "its forward hooks (_double) would be dropped with it"),
        ("bn", lambda m: m[1].register_forward_pre_hook(_shift_input),
         "its forward hooks (_shift_input) would be dropped with it"),
        ("conv", lambda m: m[0].register_forward_hook(_double),
         "0 has forward hooks (_double) that would see different values"),
        ("conv", lambda m: m[0].register_forward_pre_hook(_shift_input),
         "0 has forward hooks (_shift_input) that would see different values"),
    ],
)
def test_a_hooked_bn_or_producer_is_refused_before_any_edit(where, register, detail):
    model = _conv_bn()
    register(model)
    _assert_refused_untouched(model, SkipReason.HOOKED, detail)


def test_a_feature_hook_on_the_producer_would_have_seen_post_bn_values():
    model, seen = _conv_bn(), []
    model[0].register_forward_hook(lambda module, args, output: seen.append(output.detach().clone()))
    model(_x())
    fold_batchnorm(model, (_x(),))
    model(_x())
    assert torch.equal(seen[0], seen[-1])  # refused, so the hook still sees the conv's own output


def test_old_spectral_norm_hook_on_the_producer_is_refused():
    model = _conv_bn()
    nn.utils.spectral_norm(model[0])
    model(_x())  # the hook computes the weight from weight_orig on each call
    model.eval()
    _assert_refused_untouched(model, SkipReason.HOOKED, "0 has forward hooks (SpectralNorm) that would see different values")


class _Twice(nn.Module):
    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value * 2


def test_a_parametrized_bias_is_refused():
    model = _conv_bn()
    parametrize.register_parametrization(model[0], "bias", _Twice())
    _assert_refused_untouched(model, SkipReason.PARAMETRIZED_WEIGHT, "0: bias is parametrized by _Twice")


def test_a_forward_hook_on_a_consumer_is_fine_but_its_pre_hook_is_not():
    def model_with(hook_kind: str) -> nn.Sequential:
        model = give_realistic_stats(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)), _x())
        getattr(model[1], hook_kind)(_double if hook_kind == "register_forward_hook" else _shift_input)
        return model

    model = model_with("register_forward_hook")
    reference = copy.deepcopy(model)
    report = fold_batchnorm(model, (_x(),))
    assert [c.action for c in report.changes] == ["folded"] and report.check.passed
    torch.testing.assert_close(model(_x() + 0.5), reference(_x() + 0.5), atol=1e-5, rtol=1e-4)

    report = fold_batchnorm(model_with("register_forward_pre_hook"), (_x(),))
    assert [s.reason for s in report.skipped] == [SkipReason.HOOKED]


def test_convert_and_fold_affine_refuse_a_hooked_norm():
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 2)
    model[0].register_forward_hook(_double)
    x = torch.randn(2, 8)
    report = fold_norm_affines(model, (x,))
    assert [s.reason for s in report.skipped] == [SkipReason.HOOKED]
    report = convert_norms(model, (x,), to="rmsnorm", approximate=True)
    assert [s.reason for s in report.skipped] == [SkipReason.HOOKED] and isinstance(model[0], nn.LayerNorm)


def test_a_bias_the_fold_creates_trains_like_the_layer_and_is_no_inference_tensor():
    model = _conv_bn(bias=False)
    with torch.inference_mode():
        fold_batchnorm(model, (_x(),))
    assert model[0].bias.requires_grad and not model[0].bias.is_inference()
    model(_x()).sum().backward()
    assert model[0].bias.grad is not None

    frozen = _conv_bn(bias=False).requires_grad_(False)
    fold_batchnorm(frozen, (_x(),))
    assert not frozen[0].bias.requires_grad
