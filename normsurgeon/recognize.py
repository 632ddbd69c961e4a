"""Which modules are norm layers, and of what kind — decided by what they compute.

torch's own norm layers are known by class, but only when their ``forward`` is torch's own
(timm/transformers subclass ``nn.LayerNorm`` and change what it computes, e.g. ConvNeXt's
channels-first LayerNorm). Every other candidate — a leaf module named ``*Norm*``, or with an
``eps``/``variance_epsilon`` attribute, or with frozen-BatchNorm buffers — is *probed*: it runs on
a random tensor of the shape it saw in the trace (rows of very different scales and offsets, so
the mean, the variance and eps all show), and is classified only when its output matches a
reference formula, in float64, with its own eps, weight, bias and normalized dims:

    LayerNorm:  (x - mean(x)) / sqrt(var(x) + eps) * w + b     over the last dim(s)
    RMSNorm:    x / sqrt(mean(x²) + eps) * w (+ b)             over the last dim
    channels-first LayerNorm: LayerNorm over dim 1 of (N, C, ...)
    frozen BatchNorm: (x - running_mean) / sqrt(running_var + eps) * w + b   per channel (dim 1)
    GroupNorm:  LayerNorm over each group of C / G channels and the spatial dims

LayerNorm and RMSNorm are also tried with the scale ``1 + w`` (Gemma's RMSNorm, NeMo's
LayerNorm1P), whose weight is stored as an offset from 1: :attr:`NormInfo.scale_offset` says which
convention matched, and ``weight + scale_offset`` is the scale the norm applies.

A BatchNorm with its activation inside (timm ``BatchNormAct2d``, ``FrozenBatchNormAct2d``) is a
BatchNorm whose :attr:`NormInfo.activation` names what it applies after the norm
(:func:`~normsurgeon.norms.split_batchnorm_act` proves it by probing).

A module that only looks like a norm is reported with the reason (its closest formula and by how
much it misses), never silently treated as one. A conv that standardizes its weight at every forward
(timm ``StdConv2d``, ``ScaledStdConv2d``: :mod:`normsurgeon.weight_standardization`) normalizes
weights, not activations: it is listed as such, not as a look-alike.
"""

from __future__ import annotations

import copy
import enum
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.utils import parametrize

from .errors import UsageError
from .dataflow import Refusal
from .modules import ChannelsFirstLayerNorm, FrozenBatchNorm
from .norms import has_leaf_children, split_batchnorm_act
from .report import SkipReason
from .trace import Node, Trace
from .weight_standardization import StandardizedConv, find_standardization

_EPS_NAMES = ("eps", "variance_epsilon", "epsilon", "layer_norm_eps", "norm_eps")
_WEIGHT_NAMES = ("weight", "gamma", "scale")
_BIAS_NAMES = ("bias", "beta", "shift")
_GUESSED_EPS = (1e-5, 1e-6, 1e-12, 1e-8, 1e-3)
_SCALE_OFFSETS = (0.0, 1.0)  # scale = weight + offset: plain, and Gemma's (1 + w)
_PROBE_ELEMENTS = 1 << 16
# (atol, rtol) of a probe against the formula, relative to max|formula| (see compare below).
_PROBE_TOLERANCE = {torch.float64: (1e-9, 1e-8), torch.float32: (1e-5, 1e-4),
                    torch.float16: (2e-3, 5e-3), torch.bfloat16: (1e-2, 2e-2)}


@dataclass(frozen=True)
class KindSpec:
    """What a kind of norm is: its CLI name, a title, and the properties conversions rely on."""

    cli_name: str
    title: str
    batch_statistics: bool  # normalizes with statistics of the batch (BN family), not of one sample
    centres: bool  # subtracts a mean, so it ignores a constant added to its input
    channel_dim_1: bool  # normalizes/scales along dim 1 (channels) rather than the last dim


class NormKind(enum.Enum):
    """The kinds of normalization layer normsurgeon recognises, converts and folds."""

    BATCHNORM = KindSpec("batchnorm", "BatchNorm", True, True, True)
    FROZEN_BATCHNORM = KindSpec("frozen-batchnorm", "FrozenBatchNorm", True, True, True)
    SYNC_BATCHNORM = KindSpec("sync-batchnorm", "SyncBatchNorm", True, True, True)
    LAYERNORM = KindSpec("layernorm", "LayerNorm", False, True, False)
    LAYERNORM_CHANNELS_FIRST = KindSpec("layernorm-channels-first", "channels-first LayerNorm", False, True, True)
    RMSNORM = KindSpec("rmsnorm", "RMSNorm", False, False, False)
    GROUPNORM = KindSpec("groupnorm", "GroupNorm", False, True, True)
    INSTANCENORM = KindSpec("instancenorm", "InstanceNorm", False, True, True)

    @property
    def spec(self) -> KindSpec:
        return self.value

    @property
    def cli_name(self) -> str:
        return self.value.cli_name

    @classmethod
    def names(cls) -> list[str]:
        return [kind.cli_name for kind in cls]

    @classmethod
    def parse(cls, name: str, *, option: str = "kind", extra: tuple[str, ...] = ()) -> "NormKind":
        """The kind named ``name`` (CLI spelling, case and ``_`` forgiven); a UsageError lists the valid ones."""
        wanted = name.strip().lower().replace("_", "-")
        for kind in cls:
            if wanted in (kind.cli_name, kind.name.lower().replace("_", "-")):
                return kind
        valid = ", ".join([*cls.names(), *extra])
        raise UsageError(f"unknown {option} {name!r}; valid kinds: {valid}")


BATCHNORM_FAMILY = frozenset({NormKind.BATCHNORM, NormKind.FROZEN_BATCHNORM, NormKind.SYNC_BATCHNORM})


@dataclass(frozen=True, eq=False)
class NormInfo:
    """A recognised norm layer: what it computes, with which parameters, and how we know."""

    path: str
    module: nn.Module
    kind: NormKind
    native: bool  # torch's own layer (or a normsurgeon module built on one): no conversion needed
    eps: float
    num_features: int  # normalized size (last dim) or number of channels
    normalized_shape: tuple[int, ...]  # LN/RMS: trailing dims normalized; channel norms: (C,)
    groups: int | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    input_shape: tuple[int, ...]
    calls: int
    evidence: str
    eps_inferred: bool = False
    activation: str | None = None  # what the module applies after the norm, inside its forward (BatchNorm+act)
    scale_offset: float = 0.0  # the scale applied is weight + scale_offset (Gemma's RMSNorm: 1)

    def scale(self) -> torch.Tensor | None:
        """The per-feature scale the norm applies (``weight + scale_offset``, float64), or None without a weight."""
        return None if self.weight is None else self.weight.detach().double() + self.scale_offset

    @property
    def affine(self) -> str:
        parts = [name for name, t in (("weight", self.weight), ("bias", self.bias)) if t is not None]
        return "+".join(parts) or "none"

    def describe_normalized(self) -> str:
        """Which values are normalized together, in words."""
        kind = self.kind
        if kind in BATCHNORM_FAMILY:
            then = f", then {self.activation} in the same module" if self.activation else ""
            return f"per channel (dim 1, {self.num_features}) with running statistics{then}"
        if kind is NormKind.GROUPNORM:
            return f"{self.groups} groups of {self.num_features // max(self.groups or 1, 1)} channels per sample"
        if kind is NormKind.INSTANCENORM:
            return f"each of {self.num_features} channels per sample"
        if kind is NormKind.LAYERNORM_CHANNELS_FIRST:
            return f"channels (dim 1, {self.num_features}) per position"
        dims = "last dim" if len(self.normalized_shape) == 1 else f"last {len(self.normalized_shape)} dims"
        return f"{dims} {tuple(self.normalized_shape)}"


@dataclass(frozen=True)
class Unrecognized:
    """A module that looks like a norm but is not one normsurgeon can treat as one, and why."""

    path: str
    class_name: str
    detail: str


@dataclass
class Recognition:
    """Every norm of a traced model, and the look-alikes that were rejected."""

    norms: list[NormInfo] = field(default_factory=list)
    unrecognized: list[Unrecognized] = field(default_factory=list)
    weight_standardized: list[tuple[str, StandardizedConv]] = field(default_factory=list)  # (path, what it is)

    def of(self, module: nn.Module) -> NormInfo | None:
        return next((info for info in self.norms if info.module is module), None)


# ------------------------------------------------------------------------------- entry point


def recognize_norms(model: nn.Module, flow: Trace) -> Recognition:
    """Classify every norm-like module that ran in ``flow`` (a trace of ``model``)."""
    result = Recognition()
    # A parametrization (torch's ``_WeightNorm``, ``_SpectralNorm``, ...) transforms a weight, not
    # activations: it is named like a norm but is no norm layer, and runs inside its layer's call, so
    # it was listed as a look-alike "not called on the example inputs" for every weight-normed layer.
    parametrizations = {id(p) for m in model.modules() if isinstance(m, parametrize.ParametrizationList) for p in m}
    for path, module in model.named_modules():
        standardized = find_standardization(module)
        if standardized is not None:
            result.weight_standardized.append((path, standardized))
            continue
        if id(module) in parametrizations or not is_candidate(module):
            continue
        calls = flow.calls_of(module)
        try:
            info = recognize(module, path, calls)
        except Refusal as mismatch:
            result.unrecognized.append(Unrecognized(path, type(module).__name__, mismatch.detail))
            continue
        if info is not None:
            result.norms.append(info)
    return result


def is_candidate(module: nn.Module) -> bool:
    """A module worth probing: a torch norm, or a leaf named like a norm / with eps or BN buffers."""
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
        return True
    if next(module.children(), None) is not None:
        return _has_running_stats(module) and has_leaf_children(module)  # a BatchNorm with its activation inside
    if "norm" in type(module).__name__.lower():
        return True
    return _eps_of(module) is not None or _has_running_stats(module)


def recognize(module: nn.Module, path: str, calls: list[Node]) -> NormInfo | None:
    """The module's :class:`NormInfo`; raises :class:`~normsurgeon.dataflow.Refusal` (NOT_A_NORM) with
    the reason when it is not a norm.

    A torch norm class is known even when it never ran (then ``input_shape`` is ``()``).
    """
    shape = _input_shape(calls)
    known = _known_class(module)
    if known is not None:
        return _from_class(module, path, known, shape, len(calls))
    if not calls:
        raise _mismatch("not called on the example inputs, so what it computes cannot be checked")
    if len(calls[0].inputs) != 1:
        raise _mismatch("its forward() takes more than one tensor: a conditional norm normsurgeon cannot treat")
    if _has_running_stats(module) and next(module.children(), None) is not None:
        return _from_batchnorm_act(module, path, shape, len(calls))
    return _from_probe(module, path, shape, len(calls), calls[0])


def _mismatch(detail: str) -> Refusal:
    """A candidate whose behaviour matches no norm formula (``detail`` says how it was checked)."""
    return Refusal(SkipReason.NOT_A_NORM, detail)


# ------------------------------------------------------------------------------- by class


def _known_class(module: nn.Module) -> NormKind | None:
    """The kind of a torch (or normsurgeon) norm layer whose forward() is the library's own."""
    forward = type(module).forward
    table: tuple[tuple[type, Callable, NormKind], ...] = (
        (FrozenBatchNorm, FrozenBatchNorm.forward, NormKind.FROZEN_BATCHNORM),
        (nn.SyncBatchNorm, nn.SyncBatchNorm.forward, NormKind.SYNC_BATCHNORM),
        (_BatchNorm, _BatchNorm.forward, NormKind.BATCHNORM),
        (_InstanceNorm, _InstanceNorm.forward, NormKind.INSTANCENORM),
        (ChannelsFirstLayerNorm, ChannelsFirstLayerNorm.forward, NormKind.LAYERNORM_CHANNELS_FIRST),
        (nn.LayerNorm, nn.LayerNorm.forward, NormKind.LAYERNORM),
        (nn.RMSNorm, nn.RMSNorm.forward, NormKind.RMSNORM),
        (nn.GroupNorm, nn.GroupNorm.forward, NormKind.GROUPNORM),
    )
    for cls, cls_forward, kind in table:
        if isinstance(module, cls) and forward is cls_forward:
            return kind
    return None


def _from_class(module: nn.Module, path: str, kind: NormKind, shape: tuple[int, ...], calls: int) -> NormInfo:
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    groups = None
    if kind in (NormKind.LAYERNORM, NormKind.RMSNORM):
        normalized = tuple(module.normalized_shape)
        features = math.prod(normalized)
    else:
        features = int(getattr(module, "num_features", 0) or getattr(module, "num_channels", 0)
                       or module.normalized_shape[0])
        normalized = (features,)
        groups = module.num_groups if kind is NormKind.GROUPNORM else None
    eps = module.eps if module.eps is not None else torch.finfo(_dtype(module, shape)).eps
    return NormInfo(path, module, kind, True, float(eps), features, normalized, groups,
                    weight if isinstance(weight, torch.Tensor) else None,
                    bias if isinstance(bias, torch.Tensor) else None, shape, calls,
                    f"{type(module).__name__} (torch's own forward)", module.eps is None)


# ------------------------------------------------------------------------------- by behaviour


def _from_batchnorm_act(module: nn.Module, path: str, shape: tuple[int, ...], calls: int) -> NormInfo:
    """A BatchNorm-like module with children: BatchNorm, then nothing or its own activation (probed on a copy)."""
    try:
        stats, act = split_batchnorm_act(copy.deepcopy(module).eval(), shape)
    except Refusal as refusal:
        raise _mismatch(refusal.detail or refusal.reason.value) from None
    parts = list(act) if isinstance(act, nn.Sequential) else [act]
    activation = " then ".join(type(p).__name__ for p in parts) if not isinstance(act, nn.Identity) else None
    kind = _trainable_batchnorm_kind(module) or NormKind.FROZEN_BATCHNORM
    evidence = f"behaves as {kind.spec.title}" + (f" followed by its {activation}" if activation else "")
    weight = getattr(module, "weight") if stats.weight is not None else None
    bias = getattr(module, "bias") if stats.bias is not None else None
    return NormInfo(path, module, kind, False, stats.eps, stats.num_features, (stats.num_features,), None,
                    weight, bias, shape, calls, evidence, activation=activation)


@dataclass(frozen=True)
class _Hypothesis:
    kind: NormKind
    normalized_shape: tuple[int, ...]
    groups: int | None
    formula: Callable[[torch.Tensor, float], torch.Tensor]  # float64 input -> expected output
    scale_offset: float = 0.0

    def title(self) -> str:
        offset = " with scale (1 + weight)" if self.scale_offset == 1 else ""
        return self.kind.spec.title + offset


def _from_probe(module: nn.Module, path: str, shape: tuple[int, ...], calls: int, call: Node) -> NormInfo:
    weight, bias = _tensor_attr(module, _WEIGHT_NAMES), _tensor_attr(module, _BIAS_NAMES)
    dtype = call.args[0].dtype if call.args and isinstance(call.args[0], torch.Tensor) else _dtype(module, shape)
    if not dtype.is_floating_point:
        raise _mismatch(f"its input is {dtype}, not floating point")
    sizes = {t.numel() for t in (*module.parameters(), *module.buffers()) if t.dim() == 1}
    x = probe_input(shape, dtype, keep=sizes)
    try:
        with torch.no_grad():
            got = copy.deepcopy(module).eval()(x)
    except Exception as exc:  # the probe is our input, not the user's: report, don't crash
        raise _mismatch(f"failed on a probe tensor of shape {tuple(x.shape)} ({type(exc).__name__}: {exc})") from None
    if not isinstance(got, torch.Tensor) or got.shape != x.shape:
        raise _mismatch("its output does not have its input's shape")
    own_eps = _eps_of(module)
    eps_options = (own_eps,) if own_eps is not None else _GUESSED_EPS
    best: tuple[float, str] = (math.inf, "no formula fits its parameters' shapes")
    for hypothesis in _hypotheses(module, shape, weight, bias):
        for eps in eps_options:
            expected = hypothesis.formula(x.double(), eps)
            miss, passed, typical = _miss(got, expected, dtype)
            if passed:
                kind = _trainable_batchnorm_kind(module) or hypothesis.kind
                features = shape[1] if hypothesis.kind.spec.channel_dim_1 else math.prod(hypothesis.normalized_shape)
                evidence = f"behaves as {hypothesis.title()} (probe max diff {miss:.1e})"
                return NormInfo(path, module, kind, False, float(eps), features,
                                hypothesis.normalized_shape, hypothesis.groups, weight, bias, shape, calls,
                                evidence, own_eps is None, scale_offset=hypothesis.scale_offset)
            if typical < best[0]:
                best = (typical, f"closest formula is {hypothesis.title()} with eps={eps:g}: off by "
                                 f"{miss:.0%} at most, {typical:.0%} on average, of the larger output's scale")
    raise _mismatch(f"{type(module).__name__} computes no known norm formula on a probe input ({best[1]})")


def probe_input(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0, keep: set[int] = frozenset()) -> torch.Tensor:
    """Rows (along dim 0) of very different scale and offset: unit, tiny (eps shows), large.

    The batch becomes 3; large middle dims (not the last, not a channel dim 1 whose size is in
    ``keep``) are halved until the probe is small.
    """
    dims = list(shape) if shape else [4]
    dims[0] = 3 if len(dims) > 1 else dims[0]
    shrinkable = [i for i in range(1, len(dims) - 1) if not (i == 1 and dims[1] in keep)]
    while math.prod(dims) > _PROBE_ELEMENTS and any(dims[i] > 4 for i in shrinkable):
        i = max(shrinkable, key=lambda j: dims[j])
        dims[i] = max(4, dims[i] // 2)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(dims, generator=generator, dtype=torch.float64)
    if len(dims) > 1:
        view = (-1, *([1] * (len(dims) - 1)))
        x = x * torch.tensor([1.0, 0.02, 5.0], dtype=torch.float64).view(view)
        x = x + torch.tensor([0.5, 0.01, -3.0], dtype=torch.float64).view(view)
    return x.to(dtype)


def _miss(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> tuple[float, bool, float]:
    """Max |got - expected| relative to the larger of max|got| and max|expected| (so at most 2), whether
    it is within the dtype's tolerance of max|expected|, and the mean |got - expected| relative to the
    larger mean magnitude (to name the closest formula).

    Relative to the larger side, not to the formula's: a formula whose output is all but zero (a
    weight-times-normalized formula on Gemma's zero-initialised ``1 + w`` weight) reported 3.3e+30.
    """
    atol, rtol = _PROBE_TOLERANCE.get(dtype, _PROBE_TOLERANCE[torch.float32])
    got = got.detach().double()
    if not torch.isfinite(got).all():
        return math.inf, False, math.inf
    error = (got - expected).abs()
    diff, scale = error.max().item(), expected.abs().max().item()
    largest = max(scale, got.abs().max().item(), 1e-300)
    typical = error.mean().item() / max(expected.abs().mean().item(), got.abs().mean().item(), 1e-300)
    # The absolute part of the tolerance shrinks with the output's scale: a norm with a tiny gain
    # (say 1e-5) has outputs below atol, where every formula would fit (a hand-written RMSNorm was
    # taken for a LayerNorm and "exactly" converted to nn.LayerNorm). Scales >= 1 are unchanged.
    return diff / largest, diff <= atol * min(scale, 1.0) + rtol * scale, typical


def _hypotheses(module: nn.Module, shape: tuple[int, ...], weight: torch.Tensor | None,
                bias: torch.Tensor | None) -> list[_Hypothesis]:
    """The formulas the module could compute, given its parameters' shapes and its input's."""
    found: list[_Hypothesis] = []
    rank = len(shape)
    if _has_running_stats(module) and rank >= 2 and module.running_mean.numel() == shape[1]:
        found.append(_Hypothesis(NormKind.FROZEN_BATCHNORM, (shape[1],), None, _batchnorm_formula(module)))
    k = weight.dim() if weight is not None else 1
    trailing = tuple(shape[-k:]) if 0 < k <= rank else ()
    if trailing and _fits(weight, trailing) and _fits(bias, trailing):
        for offset in _SCALE_OFFSETS if weight is not None else (0.0,):
            scale = weight if not offset else weight.detach().double() + offset
            found.append(_Hypothesis(NormKind.LAYERNORM, trailing, None, _layernorm_formula(trailing, scale, bias),
                                     offset))
            if k == 1:
                found.append(_Hypothesis(NormKind.RMSNORM, trailing, None, _rmsnorm_formula(scale, bias), offset))
    if rank >= 3 and _fits(weight, (shape[1],)) and _fits(bias, (shape[1],)):
        found.append(_Hypothesis(NormKind.LAYERNORM_CHANNELS_FIRST, (shape[1],), None,
                                 _channels_first_formula(weight, bias)))
        groups = getattr(module, "num_groups", getattr(module, "groups", None))
        if isinstance(groups, int) and groups > 0 and shape[1] % groups == 0:
            found.append(_Hypothesis(NormKind.GROUPNORM, (shape[1],), groups, _groupnorm_formula(groups, weight, bias)))
    return found


def _trainable_batchnorm_kind(module: nn.Module) -> NormKind | None:
    """A torch BatchNorm subclass with its own forward() is still a (trainable) BatchNorm."""
    if isinstance(module, nn.SyncBatchNorm):
        return NormKind.SYNC_BATCHNORM
    return NormKind.BATCHNORM if isinstance(module, _BatchNorm) else None


def _fits(tensor: torch.Tensor | None, shape: tuple[int, ...]) -> bool:
    return tensor is None or tuple(tensor.shape) == tuple(shape)


def _affine(y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, view: tuple[int, ...]) -> torch.Tensor:
    if weight is not None:
        y = y * weight.detach().double().reshape(view)
    if bias is not None:
        y = y + bias.detach().double().reshape(view)
    return y


def _layernorm_formula(normalized: tuple[int, ...], weight, bias):
    dims = tuple(range(-len(normalized), 0))

    def formula(x: torch.Tensor, eps: float) -> torch.Tensor:
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        return _affine((x - mean) / torch.sqrt(var + eps), weight, bias, normalized)

    return formula


def _rmsnorm_formula(weight, bias):
    def formula(x: torch.Tensor, eps: float) -> torch.Tensor:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return _affine(y, weight, bias, (-1,))

    return formula


def _channels_first_formula(weight, bias):
    def formula(x: torch.Tensor, eps: float) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = x.var(1, unbiased=False, keepdim=True)
        view = (1, -1, *([1] * (x.dim() - 2)))
        return _affine((x - mean) / torch.sqrt(var + eps), weight, bias, view)

    return formula


def _groupnorm_formula(groups: int, weight, bias):
    def formula(x: torch.Tensor, eps: float) -> torch.Tensor:
        grouped = x.reshape(x.shape[0], groups, -1)
        mean = grouped.mean(-1, keepdim=True)
        var = grouped.var(-1, unbiased=False, keepdim=True)
        y = ((grouped - mean) / torch.sqrt(var + eps)).reshape(x.shape)
        return _affine(y, weight, bias, (1, -1, *([1] * (x.dim() - 2))))

    return formula


def _batchnorm_formula(module: nn.Module):
    mean, var = module.running_mean.detach().double(), module.running_var.detach().double()
    weight, bias = _tensor_attr(module, _WEIGHT_NAMES), _tensor_attr(module, _BIAS_NAMES)

    def formula(x: torch.Tensor, eps: float) -> torch.Tensor:
        view = (1, -1, *([1] * (x.dim() - 2)))
        y = (x - mean.view(view)) / torch.sqrt(var.view(view) + eps)
        return _affine(y, weight, bias, view)

    return formula


# ------------------------------------------------------------------------------- attributes


def _eps_of(module: nn.Module) -> float | None:
    for name in _EPS_NAMES:
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1:
            return float(value)
    return None


def _tensor_attr(module: nn.Module, names: tuple[str, ...]) -> torch.Tensor | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
    return None


def _has_running_stats(module: nn.Module) -> bool:
    mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
    return isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor) and mean.dim() == 1


def _input_shape(calls: list[Node]) -> tuple[int, ...]:
    return tuple(calls[0].inputs[0].shape) if calls and calls[0].inputs else ()


def _dtype(module: nn.Module, shape: tuple[int, ...]) -> torch.dtype:
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32
