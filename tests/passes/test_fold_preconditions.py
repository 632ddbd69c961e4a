"""What the Python API refuses before touching a model, with the fix in one line.

Each case used to run on and either fail deep inside torch, or edit the model in place and only
then fail the check with "please report this model". Refused models are unchanged bit for bit.
Tolerance where a fold happens: the pass's own check (fp32: 1e-5 + 1e-4·max|out|), and fresh
inputs within atol=1e-5, rtol=1e-4.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normsurgeon import PreconditionError, SkipReason, UsageError, convert_norms, fold_batchnorm, fold_norm_affines
from tests.helpers import give_realistic_stats


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _conv_bn() -> nn.Sequential:
    return give_realistic_stats(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()), _x())


def _unchanged(model: nn.Module, before: dict) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("run", [fold_batchnorm, fold_norm_affines, lambda m, x: convert_norms(m, x, to="native")])
def test_a_bare_tensor_as_example_inputs_is_a_usage_error_naming_the_fix(run):
    with pytest.raises(UsageError, match=r"example_inputs is a Tensor: pass a tuple of positional arguments, e.g. \(x,\)"):
        run(_conv_bn(), _x())
    with pytest.raises(UsageError, match="not int"):
        run(_conv_bn(), 3)


@pytest.mark.parametrize(
    "wrap, message",
    [
        (torch.jit.script, "the model is a TorchScript module"),
        (torch.compile, r"wrapped by torch.compile: pass model._orig_mod"),
        (lambda m: nn.DataParallel(m).eval(), r"wrapped in DataParallel: pass model.module"),
        (nn.DataParallel, r"wrapped in DataParallel: pass model.module"),  # the new wrapper is in train mode
    ],
    ids=["script", "compile", "data-parallel", "data-parallel-train-mode"],
)
def test_wrapped_models_are_refused_with_what_to_pass_instead(wrap, message):
    model = _conv_bn()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PreconditionError, match=message):
        fold_batchnorm(wrap(model), (_x(),))
    assert _unchanged(model, before) and isinstance(model[1], nn.BatchNorm2d)


class _StoresItsResult(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _conv_bn()

    def forward(self, x: torch.Tensor) -> None:
        self.result = self.body(x)


def test_a_model_that_returns_no_tensor_is_refused_before_any_edit():
    model = _StoresItsResult().eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PreconditionError, match=r"returned no tensors \(it returned NoneType\).*make forward\(\) return"):
        fold_batchnorm(model, (_x(),))
    assert _unchanged(model, before) and isinstance(model.body[1], nn.BatchNorm2d)


def test_a_bn_that_divides_by_zero_is_skipped_with_the_reason():
    model = _conv_bn()
    model[1].eps = 0.0
    with torch.no_grad():
        model[1].running_var[0] = 0.0
    report = fold_batchnorm(model, (_x(),))
    assert [(s.reason, s.detail) for s in report.skipped] == [
        (SkipReason.NONFINITE_STATS, "running_var + eps is 0: it divides by zero")
    ]


def test_a_copy_is_folded_even_with_the_old_weight_norm_hook():
    model = _conv_bn()
    nn.utils.weight_norm(model[0])
    reference = copy.deepcopy(model.state_dict())
    report = fold_batchnorm(model, (_x(),), inplace=False)
    assert [c.action for c in report.changes] == ["folded"] and report.check.passed
    assert _unchanged(model, reference) and isinstance(model[1], nn.BatchNorm2d)  # the original is untouched
    folded = report.model
    assert folded is not model and isinstance(folded[1], nn.Identity)
    torch.testing.assert_close(folded(_x(1)), model(_x(1)), atol=1e-5, rtol=1e-4)
    assert folded[0].weight_v is not model[0].weight_v


def test_empty_example_inputs_are_refused_rather_than_checked_vacuously():
    model = _conv_bn()
    with pytest.raises(PreconditionError, match="outputs on the example inputs are empty"):
        fold_batchnorm(model, (torch.randn(0, 3, 8, 8),))
    assert isinstance(model[1], nn.BatchNorm2d)
