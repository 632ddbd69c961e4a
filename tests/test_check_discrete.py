"""The check of models whose outputs pass through data-dependent ops (normsurgeon/discrete_ops.py), on small
hand-written detectors: a score threshold, topk and boolean-mask indexing after a conv + BatchNorm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normsurgeon.check as check_module
from normsurgeon import fold_batchnorm
from normsurgeon.check import default_tolerance
from normsurgeon.discrete_ops import Decisions
from normsurgeon.errors import PreconditionError
from normsurgeon.pipeline import Edit, ModulePass, run

from helpers import give_realistic_stats

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class ToyDetector(nn.Module):
    """Scores and boxes per location; per image, those scoring over ``threshold``, at most the top 5."""

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, 5, 1)
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        out = self.head(self.body(x)).flatten(2)
        results = []
        for scores, boxes in zip(out[:, 0].sigmoid(), out[:, 1:].transpose(1, 2)):
            keep = scores > self.threshold
            scores, boxes = scores[keep], boxes[keep]
            top = scores.topk(min(5, scores.numel()))
            results.append({"scores": top.values, "boxes": boxes[top.indices]})
        return results


def _detector(threshold: float = 0.5) -> ToyDetector:
    torch.manual_seed(0)
    return give_realistic_stats(ToyDetector(threshold), X)


class NudgeScores(ModulePass):
    """Adds ``delta`` to the score logit's bias: a change as small (or as large) as a test wants."""

    name = report_name = "nudge"
    check_label, subject = "nudged vs original", "the nudged model"
    needs_flow = False  # the reference is then one forward, not the trace

    def __init__(self, delta: float) -> None:
        self.delta = delta

    def plan(self, ctx):
        yield Edit("head", ctx.model.head)

    def apply(self, ctx, edit):
        with torch.no_grad():
            edit.target.bias[0] += self.delta
        return []


def test_a_fold_is_judged_before_the_first_data_dependent_op_and_with_its_decisions_replayed():
    report = fold_batchnorm(_detector(), (X,))
    judged, shown = report.checks
    assert report.passed and len(report.changes) == 1
    assert (judged.atol, judged.rtol) == default_tolerance(torch.float32)
    assert "first data-dependent op (gt at " in judged.label and "(forward)" in judged.label
    names = [o.name for o in judged.outputs]
    assert names[0] == "gt input[0]" and "output[1].boxes" in names
    assert shown.informational and "final outputs as computed" in shown.label
    assert any("data-dependent ops (gt x2, topk x2)" in note for note in report.notes)


def test_a_score_that_crosses_the_threshold_within_tolerance_passes_and_is_shown():
    """The original keeps a box scoring one float32 step over the threshold; a change of 1e-5 drops it."""
    model = _detector()
    with torch.no_grad():
        logits = model.head(model.body(X))[:, 0].flatten()
    third = logits.sigmoid().sort().values[-3]
    model.threshold = float(torch.nextafter(third, torch.tensor(0.0)))  # keeps the 3 best boxes, the third just
    report = run(NudgeScores(-1e-5), model, (X,))
    judged, shown = report.checks
    assert judged.passed and judged.max_abs_diff < 1e-5
    assert any("shape" in o.detail for o in shown.outputs)  # a box fewer, measured but not judged
    assert shown.passed and shown.max_abs_diff == float("inf")


def test_a_wrong_change_fails_the_check_before_the_first_data_dependent_op():
    report = run(NudgeScores(0.1), _detector(), (X,), raise_on_mismatch=False)
    failed = [o.name for o in report.check.outputs if not o.passed]
    assert not report.passed and "gt input[0]" in failed


def test_a_model_that_detects_nothing_is_checked_on_the_scores_it_thresholded():
    report = fold_batchnorm(_detector(threshold=1.5), (X,))  # a sigmoid is never over 1.5
    assert report.passed and report.check.outputs[0].name == "gt input[0]"
    assert all(o.name.startswith("gt input") or o.max_abs_diff == 0 for o in report.check.outputs)


def test_empty_outputs_without_a_data_dependent_op_are_still_refused():
    model = give_realistic_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), X)
    with pytest.raises(PreconditionError, match="a batch of 0 samples"):
        fold_batchnorm(model, (X[:0],))


def test_within_the_models_rounding_noise_the_replayed_check_passes_with_a_note(monkeypatch):
    monkeypatch.setitem(check_module.TOLERANCES, torch.float32, (1e-12, 0.0))  # any fp32 rounding fails
    report = fold_batchnorm(_detector(), (X,))
    assert report.passed and "rounding noise" in report.check.label
    assert any("accepted as rounding" in note for note in report.notes)


class TopOne(nn.Module):
    def __init__(self, weights: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(weights))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w * x).topk(1)


def test_replayed_topk_reads_its_values_at_the_originals_indices():
    x = torch.ones(2)
    decisions = Decisions()
    with torch.no_grad(), decisions.record(original := TopOne([1.0, 1.0 + 1e-6])):
        original(x)
    changed = TopOne([1.0 + 2e-6, 1.0])
    with torch.no_grad(), decisions.replay(changed) as replay:
        values, indices = changed(x)
    assert indices.tolist() == [1] and values.tolist() == [1.0]  # its own choice would be index 0
    assert not replay.diverged and len(replay.first_inputs) == 1


@pytest.mark.parametrize("forward", [
    pytest.param(lambda x: x.max() + torch.max(x, x.flip(0)).sum(), id="max-of-values"),
    pytest.param(lambda x: x * (torch.arange(4) > 1), id="integer-comparison"),
    pytest.param(lambda x: x.to(torch.float64).relu(), id="float-cast"),
    pytest.param(lambda x: (x.abs() * 4).long(), id="integer-cast"),  # how T5 buckets relative positions
])
def test_continuous_ops_are_not_decisions(forward):
    decisions = Decisions()
    model = nn.Identity()
    with decisions.record(model):
        forward(model(torch.randn(4)))
    assert not decisions


def test_argmax_and_floor_are_decisions():
    decisions = Decisions()
    model = nn.Identity()
    with decisions.record(model):
        x = model(torch.randn(4))
        x.argmax(), x.floor()
    assert [call.name for call in decisions.calls] == ["argmax", "floor"]
