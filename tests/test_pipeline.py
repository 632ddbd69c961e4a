"""The pass runner: one trace per run, each pass checked against the original, one place that raises."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normsurgeon.pipeline as pipeline
from normsurgeon.errors import PreconditionError, VerificationError
from normsurgeon.pipeline import Edit, ModulePass, Sequential, run
from normsurgeon.report import Change, Skip, SkipReason


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.conv = nn.Linear(4, 4), nn.Linear(4, 4), nn.Conv1d(1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) + self.conv(x.unsqueeze(1)).squeeze(1)


class DoubleThenHalve(ModulePass):
    """Exact: scales a's output by 2 and b's input by 1/2 (b is linear, so the output is unchanged)."""

    name, check_label, subject = "rescale", "rescaled vs original", "the rescaled model"

    def plan(self, ctx):
        assert ctx.flow.calls_of(ctx.model.a)  # the shared trace is there
        yield Edit("a", ctx.model.a)
        yield Skip("conv", SkipReason.NO_FOLDABLE_NEIGHBOUR, "not a linear pair")

    def apply(self, ctx, edit):
        with torch.no_grad():
            ctx.model.a.weight.mul_(2)
            ctx.model.a.bias.mul_(2)
            ctx.model.b.weight.mul_(0.5)
        return [Change("folded", edit.path, "b")]  # a's scale is folded into b


class Break(ModulePass):
    name, check_label, subject = "break", "broken vs original", "the broken model"

    def plan(self, ctx):
        yield Edit("b", ctx.model.b)

    def apply(self, ctx, edit):
        with torch.no_grad():
            ctx.model.b.bias.add_(1)
        return [Change("replaced", edit.path)]


def test_a_pass_is_planned_applied_and_checked_against_the_original() -> None:
    model, x = Net().eval(), torch.randn(3, 4)
    want = model(x)

    report = run(DoubleThenHalve(), model, (x,))

    assert [c.action for c in report.changes] == ["folded"] and report.skipped[0].module == "conv"
    assert report.check.label == "rescaled vs original" and report.passed
    torch.testing.assert_close(model(x), want, rtol=1e-6, atol=1e-6)


def test_a_sequential_traces_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = pipeline.trace
    monkeypatch.setattr(pipeline, "trace", lambda *a, **k: calls.append(1) or real(*a, **k))

    report = run(Sequential(DoubleThenHalve(), DoubleThenHalve()), Net().eval(), (torch.randn(2, 4),))

    assert len(calls) == 1 and len(report.checks) == 2 and report.passed


def test_the_first_failed_check_stops_the_run_and_the_error_carries_the_report() -> None:
    with pytest.raises(VerificationError) as info:
        run(Sequential(Break(), DoubleThenHalve()), Net().eval(), (torch.randn(2, 4),))

    report = info.value.report
    assert "the broken model differs from the original" in str(info.value)
    assert [r.label for r in report.checks] == ["broken vs original"]  # the second pass never ran


def test_inplace_false_leaves_the_original_untouched() -> None:
    model = Net().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    report = run(DoubleThenHalve(), model, (torch.randn(2, 4),), inplace=False)

    assert report.model is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_mode_is_refused_before_anything_runs() -> None:
    with pytest.raises(PreconditionError):
        run(DoubleThenHalve(), Net(), (torch.randn(2, 4),))
