"""Property-based: every exact norm conversion, and folding norm affines into linears, is exact to dtype tolerance.

Random shapes, dtypes (fp32, fp64, fp16, bf16), affine on/off and eps, for the exact conversions of
:mod:`normsurgeon.passes.convert` (BatchNorm <-> FrozenBatchNorm <-> SyncBatchNorm, InstanceNorm <->
GroupNorm(C), hand-written RMSNorm/LayerNorm -> torch's layer) and for :func:`fold_norm_affines`.

As in ``test_fold_properties.py``, the converted model is compared with the exact result (the
original model run in float64): it may be off by what the original model in the same dtype is
(activation rounding, counted twice), plus the dtype's tolerance (``default_tolerance``) for the
conversion itself. The pass's own check (converted vs original in the model's dtype) must pass too:
it raises ``VerificationError`` otherwise.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from normsurgeon import (
    FrozenBatchNorm,
    SkipReason,
    VerificationError,
    convert_norms,
    fold_norm_affines,
)
from normsurgeon.check import default_tolerance, flatten_outputs
from normsurgeon.modules import ChannelsFirstLayerNorm
from normsurgeon.recognize import NormKind

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EPS = st.sampled_from([1e-12, 1e-6, 1e-5, 1e-3, 0.1])
dtypes = st.sampled_from(list(DTYPES))


def _vector(data, n: int, low: float, high: float) -> torch.Tensor:
    return torch.tensor(data.draw(st.lists(st.floats(low, high), min_size=n, max_size=n)))


def _input(data, shape: tuple[int, ...]) -> torch.Tensor:
    """Random data with a drawn scale and offset (the offset at most a few times the spread)."""
    seed = data.draw(st.integers(0, 2**16))
    scale = data.draw(st.sampled_from([0.1, 1.0, 10.0]))
    offset = data.draw(st.floats(-2, 2))
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) + offset) * scale


def _outputs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    with torch.no_grad():
        return [(name, t.detach().double()) for name, t in flatten_outputs(model(x))]


def _assert_exact(model: nn.Module, x: torch.Tensor, dtype: torch.dtype, transform) -> object:
    """Run ``transform(model, (x,))`` in ``dtype``; the result must be as close to the float64 truth
    as the original is, plus the dtype's tolerance. Returns the pass's report."""
    model, x = model.eval().to(dtype), x.to(dtype)
    original = copy.deepcopy(model)
    truth = _outputs(copy.deepcopy(model).double(), x.double())
    report = transform(model, (x,))
    assert report.check.passed
    atol, rtol = default_tolerance(dtype)
    for (name, exact), (_, before), (_, after) in zip(truth, _outputs(original, x), _outputs(model, x)):
        original_error = (before - exact).abs().max().item()
        converted_error = (after - exact).abs().max().item()
        bound = 2 * original_error + atol + rtol * exact.abs().max().item()
        assert converted_error <= bound, (name, converted_error, original_error, bound)
    return report


def _converted(report, count: int = 1) -> None:
    assert [s.message for s in report.skipped] == []
    assert len(report.changed("converted")) == count
    assert all(c.detail.endswith("exact") for c in report.changed("converted"))


# ------------------------------------------------------------------------------- BatchNorm family


class HandFrozenBatchNorm(nn.Module):
    """torchvision / detectron2 FrozenBatchNorm2d, written out (any rank >= 2)."""

    def __init__(self, c: int, eps: float):
        super().__init__()
        self.eps = eps
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, torch.zeros(c))

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        view = (1, -1, *([1] * (x.dim() - 2)))
        return x * scale.reshape(view) + (self.bias - self.running_mean * scale).reshape(view)


BN_SOURCES = ("batchnorm", "sync-batchnorm", "frozen", "hand-frozen")
BN_TARGETS = {"batchnorm": NormKind.BATCHNORM, "sync-batchnorm": NormKind.SYNC_BATCHNORM,
              "frozen": NormKind.FROZEN_BATCHNORM, "hand-frozen": NormKind.FROZEN_BATCHNORM}
BN_CLASSES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _batchnorm(source: str, c: int, rank: int, affine: bool, eps: float, data) -> nn.Module:
    if source == "frozen":
        norm = FrozenBatchNorm(c, eps=eps)
    elif source == "hand-frozen":
        norm = HandFrozenBatchNorm(c, eps)
    else:
        norm = BN_CLASSES[rank](c, eps=eps, affine=affine)
        if source == "sync-batchnorm":
            norm = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(norm))[0]
        norm.num_batches_tracked.fill_(3)
    with torch.no_grad():
        norm.running_mean.copy_(_vector(data, c, -5, 5))
        norm.running_var.copy_(_vector(data, c, 1e-3, 20))
        if isinstance(norm.weight, torch.Tensor):  # buffers (frozen) or parameters (affine BN)
            norm.weight.copy_(_vector(data, c, -3, 3))
            norm.bias.copy_(_vector(data, c, -3, 3))
    return norm


@SETTINGS
@given(source=st.sampled_from(BN_SOURCES), target=st.sampled_from(BN_SOURCES[:3]), rank=st.integers(2, 5),
       c=st.integers(1, 6), affine=st.booleans(), eps=EPS, dtype=dtypes, data=st.data())
def test_batchnorm_family_conversion_property(source, target, rank, c, affine, eps, dtype, data):
    if source == target:  # already that class; a hand-written frozen BN -> FrozenBatchNorm is a conversion
        target = "frozen" if source == "batchnorm" else "batchnorm"
    norm = _batchnorm(source, c, rank, affine, eps, data)
    model = nn.Sequential(norm)
    x = _input(data, (3, c, *([data.draw(st.integers(1, 4))] * (rank - 2))))
    report = _assert_exact(model, x, DTYPES[dtype], lambda m, i: convert_norms(m, i, to=BN_TARGETS[target]))
    _converted(report)
    new = model[0]
    if target == "frozen":
        assert type(new) is FrozenBatchNorm and list(new.parameters()) == []
    elif target == "sync-batchnorm":
        assert type(new) is nn.SyncBatchNorm and not new.training
    else:
        assert type(new) is BN_CLASSES[rank] and not new.training
    assert new.eps == eps and new.running_mean.dtype == DTYPES[dtype]


# ------------------------------------------------------------------------------- InstanceNorm <-> GroupNorm(C)


@SETTINGS
@given(rank=st.integers(3, 5), c=st.integers(1, 6), affine=st.booleans(), eps=EPS, to_group=st.booleans(),
       size=st.integers(2, 4), dtype=dtypes, data=st.data())
def test_instancenorm_groupnorm_conversion_property(rank, c, affine, eps, to_group, size, dtype, data):
    if to_group:
        norm = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}[rank](c, eps=eps, affine=affine)
    else:
        norm = nn.GroupNorm(c, c, eps=eps, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(_vector(data, c, -3, 3))
            norm.bias.copy_(_vector(data, c, -3, 3))
    if dtype in ("fp16", "bf16"):  # torch's CPU InstanceNorm is imprecise on small half-precision planes:
        size = max(size, 8 if rank == 3 else 3)  # see test_instancenorm_in_half_precision_loses_precision_on_small_planes
    model = nn.Sequential(norm)
    x = _input(data, (2, c, *([size] * (rank - 2))))
    report = _assert_exact(model, x, DTYPES[dtype], lambda m, i: convert_norms(m, i, to="groupnorm" if to_group else "instancenorm"))
    _converted(report)
    new = model[0]
    if to_group:
        assert type(new) is nn.GroupNorm and new.num_groups == new.num_channels == c
    else:
        assert isinstance(new, nn.modules.instancenorm._InstanceNorm) and not new.track_running_stats
    assert new.eps == eps and new.affine == affine


# ------------------------------------------------------------------------------- hand-written -> native


class LlamaRMSNorm(nn.Module):
    """transformers' LlamaRMSNorm: computed in float32, cast back, then scaled."""

    def __init__(self, d: int, eps: float, affine: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d)) if affine else None
        self.variance_epsilon = eps

    def forward(self, h):
        dtype = h.dtype
        h = h.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        h = h.to(dtype)
        return h if self.weight is None else self.weight * h


class PlainRMSNorm(nn.Module):
    """An RMSNorm computed in the input's dtype."""

    def __init__(self, d: int, eps: float, affine: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d)) if affine else None
        self.eps = eps

    def forward(self, x):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return y if self.weight is None else y * self.weight


class WrittenLayerNorm(nn.Module):
    """LayerNorm written out, over the last dim."""

    def __init__(self, d: int, eps: float, affine: bool, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d)) if affine else None
        self.bias = nn.Parameter(torch.zeros(d)) if affine and bias else None
        self.eps = eps

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        y = (x - mean) / torch.sqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight
        return y if self.bias is None else y + self.bias


class FunctionalLayerNorm(WrittenLayerNorm):
    """A module around ``F.layer_norm``."""

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class ChannelsFirstWritten(nn.Module):
    """The original ConvNeXt channels-first LayerNorm (over dim 1 of (N, C, ...))."""

    def __init__(self, c: int, eps: float, affine: bool):
        super().__init__()
        self.weight, self.bias = (nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))) if affine else (None, None)
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        y = (x - u) / torch.sqrt(s + self.eps)
        if self.weight is None:
            return y
        view = (-1, *([1] * (x.dim() - 2)))
        return self.weight.view(view) * y + self.bias.view(view)


# A LayerNorm written out in half precision over 2-3 values rounds more than the recognition probe
# allows (x - mean loses the digits): it is refused as NOT_A_NORM, with the miss, conservatively.
HALF_LAYERNORM_MIN = 4

HAND_WRITTEN = {
    # name -> (class, the torch layer it becomes, channels-first)
    "llama-rmsnorm": (LlamaRMSNorm, nn.RMSNorm, False),
    "plain-rmsnorm": (PlainRMSNorm, nn.RMSNorm, False),
    "written-layernorm": (WrittenLayerNorm, nn.LayerNorm, False),
    "f-layer-norm": (FunctionalLayerNorm, nn.LayerNorm, False),
    "channels-first-layernorm": (ChannelsFirstWritten, ChannelsFirstLayerNorm, True),
}


def _randomize(module: nn.Module, data) -> None:
    """Random parameters; gains not all zero (a zero gain makes a norm's output constant, which every
    norm formula fits: recognition may then name another kind, exactly but uselessly) nor all tiny."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            values = _vector(data, p.numel(), -3, 3)
            if name.endswith("weight") and values.abs().max() < 0.1:
                values[0] = 1.0  # tiny gains: see test_a_tiny_gain_does_not_make_an_rmsnorm_a_layernorm
            p.copy_(values.view(p.shape))


@SETTINGS
@given(name=st.sampled_from(list(HAND_WRITTEN)), d=st.integers(2, 12), rank=st.integers(2, 4), affine=st.booleans(),
       eps=st.sampled_from([1e-6, 1e-5, 1e-3, 0.1]), dtype=dtypes, data=st.data())
def test_hand_written_norm_to_native_property(name, d, rank, affine, eps, dtype, data):
    cls, native, channels_first = HAND_WRITTEN[name]
    if name == "llama-rmsnorm" and dtype == "fp64":
        dtype = "fp32"  # computed in float32: see test_llama_rmsnorm_in_float64_is_not_a_norm_to_fp64_precision
    if dtype in ("fp16", "bf16") and cls in (WrittenLayerNorm, FunctionalLayerNorm, ChannelsFirstWritten):
        d = max(d, HALF_LAYERNORM_MIN)
    norm = cls(d, eps, affine)
    _randomize(norm, data)
    rank = max(rank, 3) if channels_first else rank
    shape = (2, d, *([3] * (rank - 2))) if channels_first else (*(2, 3, 2)[: rank - 1], d)
    model = nn.Sequential(norm)
    report = _assert_exact(model, _input(data, shape), DTYPES[dtype], lambda m, i: convert_norms(m, i, to="native"))
    _converted(report)
    new = model[0]
    assert type(new) is native and new.eps == eps
    if affine:
        assert torch.equal(new.weight, norm.weight.to(new.weight.dtype))
    else:
        assert new.weight is None


def test_llama_rmsnorm_in_float64_is_not_a_norm_to_fp64_precision():
    """A Llama-style RMSNorm in a float64 model still computes in float32 (relative error ~1e-7), so
    it does not match the RMSNorm formula to fp64 tolerance: converting it would change the outputs."""
    model = nn.Sequential(LlamaRMSNorm(8, 1e-6, True)).double().eval()
    report = convert_norms(model, (torch.randn(3, 8, dtype=torch.float64),), to="native")
    (skip,) = report.skipped
    assert skip.reason is SkipReason.NOT_A_NORM and "closest formula is RMSNorm with eps=1e-06" in skip.detail
    assert report.changes == [] and type(model[0]) is LlamaRMSNorm


# ------------------------------------------------------------------------------- norm affines -> linears


class NormThenLinears(nn.Module):
    """A norm read only by a few linear layers (q/k/v-style), each an output."""

    def __init__(self, norm: nn.Module, linears: list[nn.Linear]):
        super().__init__()
        self.norm, self.linears = norm, nn.ModuleList(linears)

    def forward(self, x):
        h = self.norm(x)
        return tuple(linear(h) for linear in self.linears)


AFFINE_NORMS = {
    "layernorm": lambda d, eps, bias: nn.LayerNorm(d, eps=eps, bias=bias),
    "rmsnorm": lambda d, eps, bias: nn.RMSNorm(d, eps=eps),
    "llama-rmsnorm": lambda d, eps, bias: LlamaRMSNorm(d, eps, True),
    "written-layernorm": lambda d, eps, bias: WrittenLayerNorm(d, eps, True, bias),
}


@SETTINGS
@given(name=st.sampled_from(list(AFFINE_NORMS)), d=st.integers(1, 12), outs=st.lists(st.integers(1, 8), min_size=1, max_size=3),
       linear_bias=st.booleans(), norm_bias=st.booleans(), rank=st.integers(2, 3), eps=st.sampled_from([1e-6, 1e-5, 1e-3]),
       dtype=dtypes, data=st.data())
def test_fold_norm_affines_property(name, d, outs, linear_bias, norm_bias, rank, eps, dtype, data):
    if name == "llama-rmsnorm" and dtype == "fp64":
        dtype = "fp32"  # computed in float32: not an RMSNorm to fp64 precision (see above)
    if dtype in ("fp16", "bf16") and name == "written-layernorm":
        d = max(d, HALF_LAYERNORM_MIN)
    norm = AFFINE_NORMS[name](d, eps, norm_bias)
    _randomize(norm, data)
    linears = [nn.Linear(d, out, bias=linear_bias) for out in outs]
    for linear in linears:
        _randomize(linear, data)
    model = NormThenLinears(norm, linears)
    shape = (3, d) if rank == 2 else (2, 3, d)
    report = _assert_exact(model, _input(data, shape), DTYPES[dtype], lambda m, i: fold_norm_affines(m, i))
    assert [s.message for s in report.skipped] == []
    assert [c.into for c in report.changed("folded-affine")] == [f"linears.{i}" for i in range(len(outs))]
    if isinstance(model.norm, (nn.LayerNorm, nn.RMSNorm)):
        assert model.norm.weight is None and not model.norm.elementwise_affine
    else:  # a hand-written norm keeps its class with a frozen unit weight (and zero bias)
        assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight)) and not model.norm.weight.requires_grad


@given(gain=st.sampled_from([1e-3, 1e-5, 1e-7]), dtype=st.sampled_from(["fp32", "fp64"]), d=st.integers(4, 12))
@settings(max_examples=10, deadline=None)
def test_a_tiny_gain_does_not_make_an_rmsnorm_a_layernorm(gain, dtype, d):
    """Recognition compares a probe with each formula relative to the output's scale. Before the fix the
    absolute part of its tolerance (fp32: 1e-5) swallowed a small-gain norm's whole output, so a
    hand-written RMSNorm with gain 1e-5 was taken for a LayerNorm (tried first) and "exactly" converted
    to nn.LayerNorm: the norm's output changed by 44% of its scale and the model check still passed."""
    norm = PlainRMSNorm(d, 1e-6, True)
    with torch.no_grad():
        norm.weight.fill_(gain)
    model = nn.Sequential(nn.Linear(3, d), norm, nn.Linear(d, 2)).eval().to(DTYPES[dtype])
    x = torch.randn(4, 3, dtype=DTYPES[dtype])
    report = convert_norms(model, (x,), to="native")
    assert [c.detail for c in report.changes] == ["RMSNorm -> nn.RMSNorm, exact"]
    assert type(model[1]) is nn.RMSNorm


def test_instancenorm_in_half_precision_loses_precision_on_small_planes():
    """torch's CPU InstanceNorm computes its statistics less accurately than GroupNorm in fp16/bf16:
    on 2-element planes offset by 10, bf16 InstanceNorm is off by ~1.0 (of outputs of size 1) from the
    float64 result on the same inputs, GroupNorm(C, C) by ~0.001. The conversion's check compares with
    the original model, so it cannot tell which one is wrong: it refuses (VerificationError) rather
    than call the conversion exact. (The property test above keeps half-precision planes >= 8 values.)"""
    x = (torch.randn(2, 4, 2, generator=torch.Generator().manual_seed(0)) + 10).to(torch.bfloat16)
    truth = nn.GroupNorm(4, 4, affine=False).double()(x.double())
    instance_error = (nn.InstanceNorm1d(4)(x).double() - truth).abs().max().item()
    group_error = (nn.GroupNorm(4, 4, affine=False).to(torch.bfloat16)(x).double() - truth).abs().max().item()
    assert instance_error > 0.5 and group_error < 0.01
    with pytest.raises(VerificationError, match="the converted model differs from the original"):
        convert_norms(nn.Sequential(nn.InstanceNorm1d(4)).eval(), (x,), to="groupnorm")
