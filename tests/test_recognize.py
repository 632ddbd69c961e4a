"""Norms are recognised by what they compute: torch's layers by class, everything else by a probe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.llama import LlamaRMSNorm
from normsurgeon.errors import UsageError
from normsurgeon.modules import ChannelsFirstLayerNorm, FrozenBatchNorm
from normsurgeon.recognize import NormKind, probe_input, recognize_norms
from normsurgeon.trace import trace
from tests.norm_zoo import ConvNeXtLayerNorm, FrozenBatchNorm2d, PlainLayerNorm


def _recognize(norm: nn.Module, shape: tuple[int, ...], dtype: torch.dtype = torch.float32):
    model = nn.Sequential(norm).eval().to(dtype)
    return recognize_norms(model, trace(model, (torch.randn(shape, dtype=dtype),)))


def _only(norm: nn.Module, shape: tuple[int, ...], dtype: torch.dtype = torch.float32):
    result = _recognize(norm, shape, dtype)
    assert result.unrecognized == [], result.unrecognized
    (info,) = result.norms
    return info


# ------------------------------------------------------------------------------- hand-written norms


class T5StyleRMSNorm(nn.Module):
    """transformers' T5LayerNorm: no mean, no bias, variance in float32."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.rand(d) + 0.5), eps

    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))








class MyGroupNorm(nn.Module):
    """A hand-written GroupNorm with a ``num_groups`` attribute."""

    def __init__(self, groups: int, c: int):
        super().__init__()
        self.num_groups, self.weight, self.bias = groups, nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.randn(c))

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, 1e-5)


def _llama_norm():
    norm = LlamaRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(-1.5, 1.5)
    return norm


HAND_WRITTEN = {
    "llama-rmsnorm": (_llama_norm, (2, 5, 16), NormKind.RMSNORM, 1e-6),
    "t5-rmsnorm": (lambda: T5StyleRMSNorm(16), (2, 5, 16), NormKind.RMSNORM, 1e-6),
    "convnext-channels-first": (lambda: ConvNeXtLayerNorm(8), (2, 8, 5, 5), NormKind.LAYERNORM_CHANNELS_FIRST, 1e-6),
    "f-layer-norm-no-affine": (lambda: PlainLayerNorm(16), (2, 5, 16), NormKind.LAYERNORM, 1e-5),
    "frozen-batchnorm2d": (lambda: FrozenBatchNorm2d(8), (2, 8, 5, 5), NormKind.FROZEN_BATCHNORM, 1e-5),
    "group-norm": (lambda: MyGroupNorm(4, 8), (2, 8, 5, 5), NormKind.GROUPNORM, 1e-5),
}


@pytest.mark.parametrize("case", HAND_WRITTEN, ids=list(HAND_WRITTEN))
def test_hand_written_norms_are_recognised_by_behaviour(case):
    build, shape, kind, eps = HAND_WRITTEN[case]
    info = _only(build(), shape)
    assert info.kind is kind and not info.native
    assert info.eps == pytest.approx(eps)
    assert "behaves as" in info.evidence
    assert info.input_shape == shape


def test_eps_without_an_attribute_is_inferred_from_the_probe():
    info = _only(PlainLayerNorm(16), (2, 5, 16))
    assert info.eps_inferred and info.eps == 1e-5 and info.affine == "none"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_llama_rmsnorm_in_half_precision(dtype):
    info = _only(_llama_norm(), (2, 5, 16), dtype)
    assert info.kind is NormKind.RMSNORM and info.weight.dtype == dtype


TORCH_LAYERS = {
    "batchnorm1d": (lambda: nn.BatchNorm1d(8), (4, 8), NormKind.BATCHNORM),
    "batchnorm3d": (lambda: nn.BatchNorm3d(4), (2, 4, 3, 3, 3), NormKind.BATCHNORM),
    "syncbatchnorm": (lambda: nn.SyncBatchNorm(8), (2, 8, 4, 4), NormKind.SYNC_BATCHNORM),
    "layernorm": (lambda: nn.LayerNorm(16), (2, 5, 16), NormKind.LAYERNORM),
    "rmsnorm": (lambda: nn.RMSNorm(16), (2, 5, 16), NormKind.RMSNORM),
    "groupnorm": (lambda: nn.GroupNorm(2, 8), (2, 8, 4, 4), NormKind.GROUPNORM),
    "instancenorm": (lambda: nn.InstanceNorm2d(8, affine=True), (2, 8, 4, 4), NormKind.INSTANCENORM),
    "normsurgeon-frozen": (lambda: FrozenBatchNorm(8), (2, 8, 4, 4), NormKind.FROZEN_BATCHNORM),
    "normsurgeon-channels-first": (lambda: ChannelsFirstLayerNorm(8), (2, 8, 4, 4), NormKind.LAYERNORM_CHANNELS_FIRST),
}


@pytest.mark.parametrize("case", TORCH_LAYERS, ids=list(TORCH_LAYERS))
def test_torch_layers_are_known_by_class(case):
    build, shape, kind = TORCH_LAYERS[case]
    info = _only(build(), shape)
    assert info.kind is kind and info.native and "torch's own forward" in info.evidence


@pytest.mark.parametrize("data_format,kind", [("channels_first", NormKind.LAYERNORM_CHANNELS_FIRST),
                                              ("channels_last", NormKind.LAYERNORM)])
def test_transformers_convnext_layernorm_is_resolved_by_behaviour_not_by_its_base_class(data_format, kind):
    convnext = pytest.importorskip("transformers.models.convnext.modeling_convnext")
    norm = convnext.ConvNextLayerNorm(8, eps=1e-6, data_format=data_format)
    assert isinstance(norm, nn.LayerNorm)  # the base class would say "LayerNorm over the last dim"
    info = _only(norm, (2, 8, 4, 4) if data_format == "channels_first" else (2, 4, 4, 8))
    assert info.kind is kind and not info.native and info.eps == 1e-6


class OnePlusWeightRMSNorm(nn.Module):
    """Gemma's RMSNorm: scales by (1 + weight), the weight stored as an offset from 1 (zeros at init)."""

    def __init__(self, d: int, eps: float = 1e-6, offset: float = 1.0):
        super().__init__()
        self.weight, self.eps, self.offset = nn.Parameter(torch.zeros(d)), eps, offset

    def forward(self, x):
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (self.offset + self.weight.float())).type_as(x)


class LayerNorm1P(nn.LayerNorm):
    """NeMo's LayerNorm1P: a LayerNorm whose weight is stored as an offset from 1."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


def _randomized(norm: nn.Module) -> nn.Module:
    with torch.no_grad():
        norm.weight.uniform_(-1.5, 1.5)
    return norm


def _gemma_norm() -> nn.Module:
    gemma = pytest.importorskip("transformers.models.gemma.modeling_gemma")
    return gemma.GemmaRMSNorm(16, eps=1e-6)


ONE_PLUS_WEIGHT = {
    "gemma-at-init": (_gemma_norm, NormKind.RMSNORM),
    "gemma-trained": (lambda: _randomized(_gemma_norm()), NormKind.RMSNORM),
    "hand-written-at-init": (lambda: OnePlusWeightRMSNorm(16), NormKind.RMSNORM),
    "layernorm1p": (lambda: _randomized(LayerNorm1P(16)), NormKind.LAYERNORM),
}


@pytest.mark.parametrize("norm, to", [(lambda: OnePlusWeightRMSNorm(16), "layernorm"),
                                       (lambda: LayerNorm1P(16), "rmsnorm")])
def test_an_approximate_conversion_keeps_the_one_plus_weight_scale(norm, to):
    """The new layer's weight is the scale the norm applied (1 + w), as for --to native, not the stored offset."""
    from normsurgeon.passes.convert import convert_norms

    layer = norm()
    with torch.no_grad():
        layer.weight.uniform_(-0.5, 0.5)
    model = nn.Sequential(nn.Linear(16, 16), layer).eval()

    report = convert_norms(model, (torch.randn(4, 16),), to=to, approximate=True, inplace=False)

    torch.testing.assert_close(report.model[1].weight, layer.weight.detach() + 1, rtol=0, atol=1e-7)


@pytest.mark.parametrize("case", ONE_PLUS_WEIGHT, ids=list(ONE_PLUS_WEIGHT))
def test_a_norm_scaling_by_one_plus_its_weight_is_recognised_with_its_offset(case):
    build, kind = ONE_PLUS_WEIGHT[case]
    norm = build()
    info = _only(norm, (2, 5, 16))
    assert info.kind is kind and info.scale_offset == 1.0 and not info.native
    assert "with scale (1 + weight)" in info.evidence
    assert torch.equal(info.scale(), norm.weight.detach().double() + 1)


def test_a_plain_weight_keeps_offset_zero():
    info = _only(_llama_norm(), (2, 5, 16))
    assert info.scale_offset == 0.0 and torch.equal(info.scale(), info.weight.detach().double())


def test_a_miss_is_reported_as_a_share_of_the_output_not_a_huge_number():
    # Scales by (2 + w), w = 0: the w·n(x) formula gives 0 (once reported as off by 3.3e+30), the
    # (1 + w)·n(x) one gives half of the output.
    result = _recognize(OnePlusWeightRMSNorm(16, offset=2.0), (2, 5, 16))
    (item,) = result.unrecognized
    assert result.norms == []
    assert ("closest formula is RMSNorm with scale (1 + weight) with eps=1e-06: off by 50% at most, 50% on average, "
            "of the larger output's scale") in item.detail


# ------------------------------------------------------------------------------- look-alikes


class RMSNorm(nn.Module):
    """Named like a norm, with weight and eps, but divides by the mean absolute value."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return self.weight * x / (x.abs().mean(-1, keepdim=True) + self.eps)


class EpsOutsideSqrtLayerNorm(nn.Module):
    """Almost a LayerNorm: eps added after the square root, which tiny-variance rows expose."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        return (x - mean) / (x.var(-1, unbiased=False, keepdim=True).sqrt() + self.eps)


class WrongEpsLayerNorm(nn.Module):
    """Says eps=1e-5 but computes with 1e-3: a conversion keeping eps=1e-5 would not be exact."""

    eps = 1e-5

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], eps=1e-3)


class CondLayerNorm(nn.Module):
    """An adaptive (conditional) LayerNorm: it needs a second input."""

    def __init__(self, d: int):
        super().__init__()
        self.eps = 1e-5

    def forward(self, x, scale):
        return F.layer_norm(x, x.shape[-1:]) * scale


LOOK_ALIKES = {
    "mean-abs-rmsnorm": (lambda: RMSNorm(16), "closest formula is RMSNorm"),
    "eps-outside-sqrt": (lambda: EpsOutsideSqrtLayerNorm(16), "closest formula is LayerNorm"),
    "wrong-eps": (lambda: WrongEpsLayerNorm(), "closest formula is LayerNorm"),
}


@pytest.mark.parametrize("case", LOOK_ALIKES, ids=list(LOOK_ALIKES))
def test_a_module_that_only_looks_like_a_norm_is_not_recognised(case):
    build, closest = LOOK_ALIKES[case]
    result = _recognize(build(), (2, 5, 16))
    assert result.norms == []
    (item,) = result.unrecognized
    assert "computes no known norm formula" in item.detail and closest in item.detail


def test_a_conditional_norm_is_not_recognised_with_the_reason():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = CondLayerNorm(16)

        def forward(self, x):
            return self.norm(x, x.sigmoid())

    model = Model()
    result = recognize_norms(model, trace(model, (torch.randn(2, 16),)))
    (item,) = result.unrecognized
    assert item.path == "norm" and "more than one tensor" in item.detail


def test_a_class_named_layernorm_that_computes_rmsnorm_is_an_rmsnorm():
    class LayerNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.rand(16) + 0.5), 1e-6

        def forward(self, x):
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    assert _only(LayerNorm(), (2, 5, 16)).kind is NormKind.RMSNORM


def test_plain_layers_are_not_candidates():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Dropout()).eval()
    result = recognize_norms(model, trace(model, (torch.randn(2, 4),)))
    assert result.norms == [] and result.unrecognized == []


def test_probe_rows_differ_in_scale_and_offset():
    x = probe_input((8, 5, 16), torch.float64)
    assert x.shape == (3, 5, 16)
    stds = x.std(dim=(1, 2))
    assert stds[1] < 0.05 < 0.5 < stds[0] < stds[2]


# ------------------------------------------------------------------------------- kinds at the edge


def test_kind_names_parse_and_an_unknown_name_lists_the_valid_ones():
    assert NormKind.parse("RMSNorm") is NormKind.RMSNORM
    assert NormKind.parse("frozen_batchnorm") is NormKind.FROZEN_BATCHNORM
    with pytest.raises(UsageError) as error:
        NormKind.parse("rms")
    message = str(error.value)
    assert "unknown kind 'rms'" in message
    assert all(name in message for name in NormKind.names())


def test_a_one_plus_weight_norm_converts_to_torchs_layer_with_that_scale():
    from normsurgeon.passes.convert import convert_norms

    norm = _randomized(OnePlusWeightRMSNorm(16))
    model = nn.Sequential(norm).eval()
    report = convert_norms(model, (torch.randn(2, 5, 16),), to="native")
    assert isinstance(model[0], nn.RMSNorm) and report.check.passed
    assert torch.equal(model[0].weight, norm.weight.detach() + 1)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), norm(x), rtol=1e-5, atol=1e-6)  # the replaced module, untouched
