"""BatchNorm folding: every pattern folds exactly, every refusal says why."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from normsurgeon import PreconditionError, SkipReason, VerificationError, fold_batchnorm
from tests.helpers import give_realistic_stats
from tests.norm_zoo import FrozenBatchNorm2d


def _folded(model: nn.Module, *inputs: torch.Tensor, **options):
    model = give_realistic_stats(model, *inputs)
    original = copy.deepcopy(model)
    report = fold_batchnorm(model, inputs, **options)
    with torch.no_grad():
        expected, got = original(*inputs), model(*inputs)
    return report, expected, got


def _assert_all_folded(report, expected, got, count):
    assert [s.message for s in report.skipped] == []
    assert len(report.changed("folded")) == count
    assert report.check.passed
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


class Seq(nn.Sequential):
    """nn.Sequential, but named so failures say which pattern."""


PRODUCER_CASES = {
    "conv1d": (lambda: Seq(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6)), (2, 3, 9)),
    "conv2d-nobias": (lambda: Seq(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6)), (2, 3, 7, 7)),
    "conv3d": (lambda: Seq(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4)), (2, 2, 4, 4, 4)),
    "depthwise": (lambda: Seq(nn.Conv2d(6, 6, 3, groups=6, padding=1), nn.BatchNorm2d(6)), (2, 6, 5, 5)),
    "grouped-dilated": (lambda: Seq(nn.Conv2d(4, 8, 3, groups=2, dilation=2, stride=2), nn.BatchNorm2d(8)), (2, 4, 9, 9)),
    "convT1d": (lambda: Seq(nn.ConvTranspose1d(4, 6, 4, stride=2), nn.BatchNorm1d(6)), (2, 4, 5)),
    "convT2d-grouped-nobias": (lambda: Seq(nn.ConvTranspose2d(4, 8, 3, stride=2, groups=4, bias=False), nn.BatchNorm2d(8)), (2, 4, 4, 4)),
    "convT3d": (lambda: Seq(nn.ConvTranspose3d(2, 4, 2, stride=2), nn.BatchNorm3d(4)), (2, 2, 3, 3, 3)),
    "linear": (lambda: Seq(nn.Linear(5, 7), nn.BatchNorm1d(7)), (4, 5)),
    "linear-nobias-bn-noaffine": (lambda: Seq(nn.Linear(5, 7, bias=False), nn.BatchNorm1d(7, affine=False)), (4, 5)),
    "circular-padding": (lambda: Seq(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), nn.BatchNorm2d(4)), (2, 3, 5, 5)),
}


@pytest.mark.parametrize("case", PRODUCER_CASES, ids=list(PRODUCER_CASES))
def test_bn_folds_into_the_layer_before_it(case):
    build, shape = PRODUCER_CASES[case]
    report, expected, got = _folded(build(), torch.randn(shape))
    _assert_all_folded(report, expected, got, 1)
    assert report.changes[0].module == "1" and report.changes[0].into == "0"
    assert "into its producer" in report.changes[0].detail


class LinearTransposeBN(nn.Module):
    """Linear on (B, T, C), BatchNorm1d over C: the transpose sits between them."""

    def __init__(self, permute: bool):
        super().__init__()
        self.linear, self.bn, self.permute = nn.Linear(6, 5), nn.BatchNorm1d(5), permute

    def forward(self, x):
        y = self.linear(x)
        y = y.permute(0, 2, 1) if self.permute else y.transpose(1, 2).contiguous()
        return self.bn(y).transpose(1, 2)


@pytest.mark.parametrize("permute", [False, True], ids=["transpose", "permute"])
def test_bn_folds_through_a_transpose_after_an_nd_linear(permute):
    report, expected, got = _folded(LinearTransposeBN(permute), torch.randn(3, 4, 6))
    _assert_all_folded(report, expected, got, 1)


CONSUMER_CASES = {
    "conv1x1": lambda: Seq(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 1)),
    "conv-replicate-pad": lambda: Seq(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 3, padding=1, padding_mode="replicate")),
    "conv-reflect-grouped": lambda: Seq(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="reflect", bias=False)),
}


@pytest.mark.parametrize("case", CONSUMER_CASES, ids=list(CONSUMER_CASES))
def test_bn_after_an_activation_folds_into_the_layer_after_it(case):
    report, expected, got = _folded(CONSUMER_CASES[case](), torch.randn(2, 3, 8, 8))
    _assert_all_folded(report, expected, got, 1)
    assert report.changes[0].into == "3" and "consumer" in report.changes[0].detail


def test_bn_then_linear_on_flat_features():
    model = Seq(nn.Linear(5, 6), nn.ReLU(), nn.BatchNorm1d(6), nn.Linear(6, 2))
    report, expected, got = _folded(model, torch.randn(8, 5))
    _assert_all_folded(report, expected, got, 1)


def test_bn_before_zero_padded_conv_is_kept_with_the_reason():
    model = Seq(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1))
    report, expected, got = _folded(model, torch.randn(2, 3, 8, 8))
    (skip,) = report.skipped
    assert skip.reason is SkipReason.NO_FOLDABLE_NEIGHBOUR
    assert "its input comes from 1 (ReLU)" in skip.detail
    assert "3 (Conv2d) has zero padding (1, 1)" in skip.detail
    assert isinstance(report.model[2], nn.BatchNorm2d)
    assert torch.allclose(got, expected)


def test_unfoldable_bn_becomes_an_affine_when_asked():
    model = Seq(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1))
    report, expected, got = _folded(model, torch.randn(2, 3, 8, 8), unfoldable="affine")
    assert [c.action for c in report.changes] == ["replaced"]
    assert type(report.model[2]).__name__ == "ChannelAffine"
    assert torch.allclose(got, expected, atol=1e-5)


class ConvToBNAndResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_conv_feeding_bn_and_a_residual_branch_is_not_folded():
    report, expected, got = _folded(ConvToBNAndResidual(), torch.randn(2, 3, 5, 5), reparameterize=False)
    (skip,) = report.skipped
    assert "conv (Conv2d)'s output also goes to add()" in skip.detail
    assert report.changes == [] and torch.equal(got, expected)


class ConvReused(nn.Module):
    """One conv called twice; ``both_bn`` decides whether both calls go to the BN."""

    def __init__(self, both_bn: bool):
        super().__init__()
        self.conv, self.bn, self.both_bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), both_bn

    def forward(self, x):
        a = self.bn(self.conv(x))
        b = self.conv(x.flip(-1))
        return a + (self.bn(b) if self.both_bn else b)


def test_conv_called_twice_but_only_once_before_bn_is_not_folded():
    report, expected, got = _folded(ConvReused(both_bn=False), torch.randn(2, 3, 4, 4))
    (skip,) = report.skipped
    assert "conv is called 2 times, not always before this norm" in skip.detail
    assert torch.equal(got, expected)


def test_conv_and_bn_called_twice_as_a_pair_fold():
    report, expected, got = _folded(ConvReused(both_bn=True), torch.randn(2, 3, 4, 4))
    _assert_all_folded(report, expected, got, 1)


class TwoConvsOneBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))


def test_bn_applied_to_two_different_convs_is_not_folded():
    report, expected, got = _folded(TwoConvsOneBN(), torch.randn(2, 3, 4, 4), reparameterize=False)
    (skip,) = report.skipped
    assert "its calls read different layers" in skip.detail


def _state_skip(mutate) -> SkipReason:
    model = give_realistic_stats(Seq(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), torch.randn(2, 3, 4, 4))
    mutate(model)
    report = fold_batchnorm(model, (torch.randn(2, 3, 4, 4),), raise_on_mismatch=False)
    (skip,) = report.skipped
    assert report.changes == []
    return skip.reason


def test_bn_state_skip_reasons():
    def nan_stats(m):
        m[1].running_var[0] = float("nan")

    def never_updated(m):
        m[1].reset_running_stats()

    assert _state_skip(lambda m: m[1].train()) is SkipReason.TRAINING_MODE
    assert _state_skip(nan_stats) is SkipReason.NONFINITE_STATS
    assert _state_skip(never_updated) is SkipReason.NEVER_UPDATED


def test_never_updated_stats_fold_when_allowed():
    model = Seq(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    report = fold_batchnorm(model, (torch.randn(1, 3, 4, 4),), allow_default_stats=True)
    assert len(report.changed("folded")) == 1


def test_bn_without_running_stats_is_skipped():
    model = Seq(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    report = fold_batchnorm(model, (torch.randn(2, 3, 4, 4),))
    assert [s.reason for s in report.skipped] == [SkipReason.NO_RUNNING_STATS]


def test_bn_that_is_never_called_is_skipped():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.unused = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.conv(x)

    model = Unused().eval()
    report = fold_batchnorm(model, (torch.randn(1, 3, 4, 4),))
    assert [(s.module, s.reason) for s in report.skipped] == [("unused", SkipReason.NOT_CALLED)]


def test_bn_subclass_with_its_own_forward_is_skipped():
    class ScaledBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = give_realistic_stats(Seq(nn.Conv2d(3, 4, 1), ScaledBN(4)), torch.randn(2, 3, 4, 4))
    report = fold_batchnorm(model, (torch.randn(2, 3, 4, 4),))
    assert [s.reason for s in report.skipped] == [SkipReason.UNKNOWN_BEHAVIOUR]


def test_model_in_training_mode_is_refused_with_the_fix():
    with pytest.raises(PreconditionError, match=r"call model.eval\(\) first"):
        fold_batchnorm(Seq(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train(), (torch.randn(2, 3, 4, 4),))


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.b = nn.Conv2d(3, 3, 1)
        self.b.weight = self.a.weight  # tied

    def forward(self, x):
        return self.bn(self.a(x)) + self.b(x)


def test_shared_weight_is_never_folded_in_place():
    report, expected, got = _folded(SharedConv(), torch.randn(2, 3, 4, 4), reparameterize=False)
    assert [s.reason for s in report.skipped] == [SkipReason.SHARED_PARAMETER]
    assert torch.equal(got, expected)


class FunctionalWeightUse(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + nn.functional.conv2d(x, self.conv.weight)


def test_weight_also_used_functionally_is_not_folded():
    report, _, _ = _folded(FunctionalWeightUse(), torch.randn(2, 3, 4, 4))
    assert [s.reason for s in report.skipped] == [SkipReason.FUNCTIONAL_USE]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=["fp64", "fp16", "bf16"])
def test_low_and_high_precision_models_fold(dtype):
    x = torch.randn(2, 3, 8, 8)
    model = give_realistic_stats(Seq(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4)), x)
    model = model.to(dtype)
    report = fold_batchnorm(model, (x.to(dtype),))
    assert len(report.changed("folded")) == 2 and report.check.passed
    assert all(p.dtype == dtype for p in model.parameters())


def test_channels_last_model_folds():
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    model = give_realistic_stats(Seq(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), x).to(memory_format=torch.channels_last)
    report = fold_batchnorm(model, (x,))
    assert report.check.passed and len(report.changed("folded")) == 1
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_copy_option_leaves_the_original_untouched():
    x = torch.randn(2, 3, 4, 4)
    model = give_realistic_stats(Seq(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = fold_batchnorm(model, (x,), inplace=False)
    assert report.model is not model and isinstance(model[1], nn.BatchNorm2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("api", ["parametrizations", "hooks"])
def test_weight_normed_conv_folds_and_keeps_its_weight_norm(api):
    conv = nn.Conv1d(3, 5, 3)
    conv = parametrizations.weight_norm(conv) if api == "parametrizations" else torch.nn.utils.weight_norm(conv)
    report, expected, got = _folded(Seq(conv, nn.BatchNorm1d(5)), torch.randn(2, 3, 10))
    _assert_all_folded(report, expected, got, 1)
    names = {n for n, _ in report.model.named_parameters()}
    assert names & {"0.parametrizations.weight.original0", "0.weight_g"}




class LooksLikeFrozenBN(FrozenBatchNorm2d):
    def forward(self, x):
        return super().forward(x).tanh()


def test_hand_written_frozen_batchnorm_is_recognised_by_behaviour():
    x = torch.randn(2, 3, 6, 6)
    model = Seq(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4)).eval()
    expected = model(x)
    report = fold_batchnorm(model, (x,))
    assert len(report.changed("folded")) == 1
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_module_that_only_looks_like_a_frozen_batchnorm_is_left_alone():
    model = Seq(nn.Conv2d(3, 4, 3), LooksLikeFrozenBN(4)).eval()
    report = fold_batchnorm(model, (torch.randn(2, 3, 6, 6),))
    assert [s.reason for s in report.skipped] == [SkipReason.UNKNOWN_BEHAVIOUR]
    assert report.changes == []


def test_keyword_inputs_are_supported():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, pixel_values):
            return {"out": self.bn(self.conv(pixel_values))}

    x = torch.randn(2, 3, 4, 4)
    model = give_realistic_stats(Keyword(), x)
    report = fold_batchnorm(model, {"pixel_values": x})
    assert report.check.outputs[0].name == "output.out" and len(report.changes) == 1


def test_a_fold_within_the_models_own_rounding_noise_passes_with_a_note(monkeypatch):
    """Deep nets amplify one-ulp weight changes past the default tolerance; that is rounding."""
    import normsurgeon.check as check_module

    monkeypatch.setitem(check_module.TOLERANCES, torch.float32, (1e-12, 0.0))  # any fp32 rounding fails
    x = torch.randn(2, 3, 8, 8)
    model = give_realistic_stats(Seq(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4)), x)
    report = fold_batchnorm(model, (x,))
    assert report.check.passed and "rounding noise" in report.check.label
    assert any("accepted as rounding" in note for note in report.notes)
    with pytest.raises(VerificationError):  # tolerances the user gives are kept as given
        fold_batchnorm(give_realistic_stats(Seq(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), x), (x,), atol=1e-12, rtol=0.0)


def test_a_wrong_fold_is_not_excused_as_rounding_noise(monkeypatch):
    import normsurgeon.passes.fold_batchnorm as fold_module

    real_apply = fold_module._apply

    def off_by_a_percent(plan):
        given_a_bias = real_apply(plan)
        with torch.no_grad():
            for target in plan.targets:
                target.weight.mul_(1.01)
        return given_a_bias

    monkeypatch.setattr(fold_module, "_apply", off_by_a_percent)
    x = torch.randn(2, 3, 8, 8)
    model = give_realistic_stats(Seq(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), x)
    report = fold_batchnorm(model, (x,), raise_on_mismatch=False)
    assert not report.check.passed and report.check.label == "folded vs original"
