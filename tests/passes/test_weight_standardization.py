"""Weight standardization baked into plain convs: recognised by behaviour, exact, refused with the reason."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normsurgeon.dataflow import Refusal, check_editable
from normsurgeon.passes.bake_weight_standardization import bake_weight_standardization
from normsurgeon.passes.fold_batchnorm import fold_batchnorm
from normsurgeon.passes.inspect import inspect_norms
from normsurgeon.report import SkipReason
from normsurgeon.surgery import shared_parameter_ids
from normsurgeon.trace import trace
from normsurgeon.weight_standardization import find_standardization
from tests.helpers import give_realistic_stats

timm = pytest.importorskip("timm")
from timm.layers import ScaledStdConv2d, StdConv2d, StdConv2dSame  # noqa: E402

TOLERANCE = 1e-6  # max |baked - original| relative to the output's largest magnitude (observed: 0, bit-identical)


class PaperWSConv1d(nn.Conv1d):
    """The Weight Standardization paper's own code (unbiased std + 1e-5, no batch_norm), as a Conv1d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight - self.weight.mean(dim=(1, 2), keepdim=True)
        w = w / (w.flatten(1).std(dim=1).view(-1, 1, 1) + 1e-5)
        return F.conv1d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class GainWSConv3d(nn.Conv3d):
    """Standardized with a learned per-channel gain, grouped, 3-d."""

    def __init__(self) -> None:
        super().__init__(4, 6, 3, padding=1, groups=2)
        self.gain = nn.Parameter(torch.rand(6, 1, 1, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(self.weight.reshape(1, 6, -1), None, None, training=True, eps=1e-4).reshape_as(self.weight)
        return F.conv3d(x, w * self.gain, self.bias, self.stride, self.padding, self.dilation, self.groups)


class DoubledConv2d(nn.Conv2d):
    """A forward of its own with a computed weight that is not standardized (not centred)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * 2, self.bias)


class InputScaledWSConv2d(nn.Conv2d):
    """Standardized, then scaled by the input's mean: a weight that no constant can replace."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return self._conv_forward(x, w * x.mean(), self.bias)


def _scaled_std_conv() -> ScaledStdConv2d:
    conv = ScaledStdConv2d(3, 8, 3, gamma=1.7)
    with torch.no_grad():
        conv.gain.uniform_(-2, 2)
    return conv


LAYERS = {  # name: (layer, input shape)
    "timm-StdConv2d": (lambda: StdConv2d(3, 8, 3, stride=2, bias=True), (2, 3, 9, 9)),
    "timm-ScaledStdConv2d-gain": (_scaled_std_conv, (2, 3, 9, 9)),
    "timm-StdConv2dSame-static": (lambda: StdConv2dSame(3, 8, 3), (2, 3, 9, 9)),
    "paper-code-conv1d": (lambda: PaperWSConv1d(3, 5, 3, dilation=2), (2, 3, 11)),
    "gain-grouped-conv3d": (GainWSConv3d, (2, 4, 5, 5, 5)),
}


def _max_rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("name", list(LAYERS))
def test_a_weight_standardized_conv_becomes_a_plain_conv_with_the_same_outputs(name: str) -> None:
    build, shape = LAYERS[name]
    torch.manual_seed(0)
    model = nn.Sequential(build(), nn.ReLU()).eval()
    x = torch.randn(shape)

    report = bake_weight_standardization(model, (x,))

    assert type(report.model[0]) in (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # torch's own class, not a subclass
    assert type(model[0]) is not type(report.model[0])  # inplace=False: the original keeps its layer
    assert [(c.action, c.module) for c in report.changes] == [("replaced", "0")] and report.passed
    fresh = torch.randn(shape) * 3 + 1
    with torch.no_grad():
        assert _max_rel_diff(report.model(fresh), model(fresh)) <= TOLERANCE


@pytest.mark.parametrize(("layer", "why"), [
    (nn.Conv2d(3, 4, 3), "torch's own conv"),
    (DoubledConv2d(3, 4, 3), "its computed weight is not centred"),
    (nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3)), "weight norm is another pass's"),
    (nn.ConvTranspose2d(3, 4, 3), "a transposed conv"),
], ids=["plain", "not-centred", "weight-norm", "transposed"])
def test_other_convs_are_not_weight_standardized(layer: nn.Module, why: str) -> None:
    assert find_standardization(layer) is None, why


@pytest.mark.parametrize(("layer", "reason", "detail"), [
    (StdConv2dSame(3, 8, 3, stride=2), SkipReason.UNSUPPORTED_STRUCTURE, "it changes its input before the convolution"),
    (InputScaledWSConv2d(3, 8, 3), SkipReason.UNSUPPORTED_STRUCTURE, "the weight it convolves with depends on its input"),
], ids=["dynamic-same-padding", "input-dependent-weight"])
def test_a_weight_standardized_conv_no_plain_conv_can_replace_is_kept_with_the_reason(layer, reason, detail) -> None:
    model = nn.Sequential(layer).eval()
    report = bake_weight_standardization(model, (torch.randn(2, 3, 9, 9),))
    (skip,) = report.skipped
    assert (skip.module, skip.reason) == ("0", reason) and detail in skip.detail
    assert not report.changes and type(report.model[0]) is type(layer)


def test_a_model_that_is_itself_a_standardized_conv_is_kept_with_the_reason() -> None:
    layer = StdConv2d(3, 4, 3).eval()

    report = bake_weight_standardization(layer, (torch.randn(1, 3, 8, 8),), inplace=True)

    assert report.changes == [] and report.model is layer
    assert [(s.module, s.reason) for s in report.skipped] == [("", SkipReason.UNSUPPORTED_STRUCTURE)]
    assert "nn.Sequential(model)" in report.skipped[0].detail


def test_a_hooked_layer_is_kept_because_replacing_it_would_drop_the_hook() -> None:
    model = nn.Sequential(StdConv2d(3, 4, 3)).eval()
    model[0].register_forward_hook(lambda module, args, output: None)
    (skip,) = bake_weight_standardization(model, (torch.randn(1, 3, 8, 8),)).skipped
    assert skip.reason is SkipReason.HOOKED


def test_without_example_inputs_each_plain_conv_is_checked_against_the_layer_it_replaced() -> None:
    model = nn.Sequential(StdConv2d(3, 4, 3), nn.ReLU(), _scaled_std_conv().requires_grad_(False))
    report = bake_weight_standardization(model, None, inplace=True)
    (check,) = report.checks
    assert check.label == "plain convs vs weight-standardized convs (no example inputs)" and check.passed
    assert [d.name for d in check.outputs] == ["output.0", "output.2"] and all(d.max_abs_diff == 0 for d in check.outputs)
    assert model[2].weight.requires_grad is False and model[0].weight.requires_grad  # trainable as before


def test_a_batchnorm_after_a_standardized_conv_folds_only_once_it_is_baked() -> None:
    x = torch.randn(2, 3, 8, 8)
    model = give_realistic_stats(nn.Sequential(StdConv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()), x)
    flow = trace(model, (x,))
    with pytest.raises(Refusal) as refused:  # a scale folded into w would be standardized away
        check_editable(flow, model[0], shared_parameter_ids(model))
    assert refused.value.reason is SkipReason.PARAMETRIZED_WEIGHT
    assert "bake it first" in refused.value.detail

    baked = bake_weight_standardization(model, (x,)).model
    folded = fold_batchnorm(baked, (x,))
    assert [c.module for c in folded.changes if c.action == "folded"] == ["1"] and isinstance(folded.model[1], nn.Identity)
    fresh = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert _max_rel_diff(folded.model(fresh), model(fresh)) <= 1e-5


def test_fold_bakes_weight_standardization_first_and_folds_the_batchnorm_after_it_in_one_run() -> None:
    x = torch.randn(2, 3, 8, 8)
    model = give_realistic_stats(nn.Sequential(StdConv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()), x)

    report = fold_batchnorm(model, (x,))

    assert [(c.action, c.module) for c in report.changes] == [("replaced", "0"), ("folded", "1")]
    assert type(report.model[0]) is nn.Conv2d and isinstance(report.model[1], nn.Identity)
    assert report.facts["weight-standardized convs baked"] == 1 and report.pass_name == "fold"
    fresh = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert _max_rel_diff(report.model(fresh), model(fresh)) <= 1e-5


def test_inspect_names_weight_standardized_convs_instead_of_look_alikes() -> None:
    model = nn.Sequential(StdConv2d(3, 4, 3), nn.ReLU(), StdConv2dSame(4, 4, 3, stride=2)).eval()
    report = inspect_norms(model, (torch.randn(1, 3, 9, 9),))
    assert report.unrecognized == [] and report.facts["weight-standardized convs"] == 2
    assert [(r["path"], r["bake"].split(":")[0]) for r in report.weight_standardized] == [
        ("0", "bake into a plain Conv2d (exact)"), ("2", "cannot be baked")]
    assert "weight_standardized" in report.to_dict()
    assert any("standardize their weight at every forward" in note for note in report.notes)


# ------------------------------------------------------------------------------- timm models


def _bit() -> nn.Module:
    """resnetv2_50x1_bit's architecture (StdConv2d + GroupNormAct) with one block per stage: 10M parameters, not 25M."""
    from functools import partial

    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(layers=[1, 1, 1, 1], stem_type="fixed", conv_layer=partial(StdConv2d, eps=1e-8))


@pytest.fixture(scope="module", params=["nf_regnet_b0", "bit"])
def timm_model(request) -> tuple[str, nn.Module]:
    """NF-RegNet (ScaledStdConv2d with gains, no norm layer at all) and BiT (StdConv2d + GroupNorm), random weights."""
    torch.manual_seed(0)
    model = (_bit() if request.param == "bit" else timm.create_model(request.param, pretrained=False)).eval()
    for module in model.modules():  # gains away from their initial 1, so the scaled standardization shows
        if isinstance(module, ScaledStdConv2d):
            with torch.no_grad():
                module.gain.uniform_(0.5, 1.5)
    return request.param, model


def test_timm_models_keep_no_weight_standardized_conv_and_match_the_original(timm_model) -> None:
    name, model = timm_model
    x = torch.randn(1, 3, 64, 64)
    standardized = [p for p, m in model.named_modules() if isinstance(m, (StdConv2d, ScaledStdConv2d))]

    report = bake_weight_standardization(model, (x,))

    assert len(report.changes) == len(standardized) > 10 and not report.skipped, name
    assert not any(find_standardization(m) for m in report.model.modules())
    assert {type(report.model.get_submodule(p)) for p in standardized} == {nn.Conv2d}
    fresh = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _max_rel_diff(report.model(fresh), model(fresh)) <= TOLERANCE


@pytest.mark.slow
def test_the_export_of_a_baked_nfnet_carries_plain_convs_and_no_standardization_ops(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    from normsurgeon.onnx.export import export_onnx

    torch.manual_seed(0)
    model = timm.create_model("nf_regnet_b0", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    ops = {}
    exported = export_onnx(model, (x,), tmp_path / "exported.onnx", fold=False)  # export bakes on its own
    assert exported.passed and sum(c.action == "replaced" for c in exported.changes) == 54
    ops["exported"] = collections.Counter(node.op_type for node in onnx.load(tmp_path / "exported.onnx").graph.node)
    unbaked = torch.onnx.export(model, (x,), dynamo=True, optimize=True, verbose=False)  # what torch alone ships
    ops["torch"] = collections.Counter(node.op_type for node in unbaked.model_proto.graph.node)
    assert ops["exported"]["Conv"] == ops["torch"]["Conv"]
    assert ops["torch"]["BatchNormalization"] > 0 and ops["exported"]["BatchNormalization"] == 0
    assert sum(ops["exported"].values()) < sum(ops["torch"].values()) * 0.6  # measured: 318 nodes vs 678
