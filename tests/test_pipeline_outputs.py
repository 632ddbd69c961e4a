"""The runner takes the model's outputs for a check only when a pass changed it since they were last taken: a pass
with nothing to do (fold's BatchNorm step on an LLM, its norm-affine step on a CNN) costs no forward pass, and
every check still compares the model as it is with the original's outputs.

Tolerance: the default check (fp32: |diff| <= 1e-5 + 1e-4·max|out|).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normsurgeon.errors import VerificationError
from normsurgeon.pipeline import Edit, ModulePass, Sequential, run
from normsurgeon.report import Change


class Nothing(ModulePass):
    """Plans nothing, yet is checked (as fold's steps are)."""

    name, report_name = "nothing", "nothing"
    check_label, subject = "nothing vs original", "the model"
    needs_flow = False

    def plan(self, ctx):
        return iter(())


class Scale(ModulePass):
    """Scales the first layer by ``factor`` and the second by its inverse (exact for 2, wrong for -1: ReLU between)."""

    name, report_name = "scale", "scale"
    check_label, subject = "scaled vs original", "the scaled model"
    needs_flow = False

    def __init__(self, factor: float, second: float) -> None:
        self.factor, self.second = factor, second

    def plan(self, ctx):
        yield Edit("0", ctx.model[0])

    def apply(self, ctx, edit):
        with torch.no_grad():
            ctx.model[0].weight.mul_(self.factor)
            ctx.model[0].bias.mul_(self.factor)
            ctx.model[2].weight.mul_(self.second)
        return [Change("folded", "0", "2")]


@pytest.fixture
def model_and_forwards() -> tuple[nn.Module, list[int]]:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    forwards: list[int] = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    return model, forwards


@pytest.mark.parametrize("order", ["nothing first", "nothing last"])
def test_a_pass_that_changed_nothing_reuses_the_outputs_last_taken(model_and_forwards, order: str) -> None:
    model, forwards = model_and_forwards
    x = torch.randn(5, 4)
    want = model(x)
    forwards.clear()
    passes = (Nothing(), Scale(2.0, 0.5)) if order == "nothing first" else (Scale(2.0, 0.5), Nothing())

    report = run(Sequential(*passes), model, (x,))

    assert report.passed and {c.label for c in report.checks} == {"nothing vs original", "scaled vs original"}
    assert len(forwards) == 2  # the original's outputs and the scaled model's, not a third for Nothing
    torch.testing.assert_close(model(x), want)


def test_a_wrong_edit_after_a_pass_that_changed_nothing_is_caught(model_and_forwards) -> None:
    model, _ = model_and_forwards
    with pytest.raises(VerificationError):
        run(Sequential(Nothing(), Scale(-1.0, -1.0)), model, (torch.randn(5, 4),))  # sign flip through a ReLU


def test_a_run_that_changes_nothing_runs_the_model_once(model_and_forwards) -> None:
    model, forwards = model_and_forwards

    report = run(Sequential(Nothing(), Nothing()), model, (torch.randn(5, 4),))

    assert report.passed and len(report.checks) == 2 and len(forwards) == 1
    assert all(c.max_abs_diff == 0 for c in report.checks)
