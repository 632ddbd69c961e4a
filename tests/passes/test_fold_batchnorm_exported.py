"""BatchNorm folding inside a torch.export ExportedProgram (.pt2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normsurgeon.check as check_module
import normsurgeon.passes.fold_batchnorm_exported as exported_module
from normsurgeon import PreconditionError
from normsurgeon.passes.fold_batchnorm_exported import fold_batchnorm_exported
from tests.helpers import give_realistic_stats


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4),
        nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2), nn.BatchNorm2d(4),
        nn.Flatten(), nn.Linear(4 * 12 * 12, 5), nn.BatchNorm1d(5, affine=False),
    )


@pytest.mark.parametrize("decomposed", [False, True], ids=["export-ir", "core-aten"])
def test_exported_program_folds_and_roundtrips(decomposed, tmp_path):
    x = torch.randn(2, 3, 8, 8)
    model = give_realistic_stats(_model(), x)
    with torch.no_grad():
        expected = model(x)
    program = torch.export.export(model, (x,))
    if decomposed:
        program = program.run_decompositions()
    report = fold_batchnorm_exported(program)
    folded_into = [(c.module, c.into) for c in report.changes]
    if decomposed:  # the linear became addmm after a view: that BN is reported, not folded
        assert folded_into == [("1", "0"), ("3", "2")]
        assert "its input comes from addmm" in report.skipped[0].detail
    else:
        assert folded_into == [("1", "0"), ("3", "2"), ("6", "5")] and report.skipped == []
    assert report.check.passed
    torch.export.save(program, tmp_path / "f.pt2")
    reloaded = torch.export.load(tmp_path / "f.pt2")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.module()(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # the user's module is untouched


class Branch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_conv_output_with_another_user_is_not_folded():
    x = torch.randn(2, 3, 4, 4)
    program = torch.export.export(give_realistic_stats(Branch(), x), (x,))
    report = fold_batchnorm_exported(program)
    assert report.changes == []
    assert "conv2d's output also goes to add" in report.skipped[0].detail


def test_inputs_the_program_was_not_exported_for_are_a_clear_error_not_a_guard_traceback():
    model = give_realistic_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), torch.randn(4, 3, 8, 8))
    program = torch.export.export(model, (torch.randn(1, 3, 8, 8),))  # static shapes: batch 1, 8x8
    with pytest.raises(PreconditionError, match=r"does not run on the example inputs .*exported for inputs of shape "
                       r"\(1, 3, 8, 8\); pass --input-shape/--inputs it accepts, or re-export it with dynamic shapes"):
        fold_batchnorm_exported(program, (torch.randn(2, 3, 8, 8),))


def _exported_conv_stack() -> torch.export.ExportedProgram:
    x = torch.randn(2, 3, 8, 8)
    model = give_realistic_stats(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                               nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4)), x)
    return torch.export.export(model, (x,))


def test_a_pt2_fold_within_the_programs_own_rounding_noise_passes_with_a_note(monkeypatch):
    """As on the module path: a fold exact in float64 rounds each weight once; that is not a wrong fold."""
    monkeypatch.setitem(check_module.TOLERANCES, torch.float32, (1e-12, 0.0))  # any fp32 rounding fails
    report = fold_batchnorm_exported(_exported_conv_stack())
    assert report.check.passed and "rounding noise" in report.check.label
    assert 0 < report.check.max_abs_diff < 1e-5 and len(report.changes) == 2
    assert any("accepted as rounding" in note for note in report.notes)


def test_a_wrong_pt2_fold_or_a_users_tolerance_is_not_excused_as_rounding_noise(monkeypatch):
    monkeypatch.setitem(check_module.TOLERANCES, torch.float32, (1e-12, 0.0))
    tight = fold_batchnorm_exported(_exported_conv_stack(), atol=1e-12, rtol=0.0)
    assert not tight.check.passed and tight.check.label == "folded vs original" and tight.notes == []

    real = exported_module.scale_channels_

    def off_by_a_percent(w, s, **kwargs):
        real(w, s * 1.01, **kwargs)

    monkeypatch.setattr(exported_module, "scale_channels_", off_by_a_percent)
    wrong = fold_batchnorm_exported(_exported_conv_stack())
    assert not wrong.check.passed and wrong.check.label == "folded vs original" and wrong.notes == []
