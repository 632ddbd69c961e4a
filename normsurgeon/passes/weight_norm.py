"""Weight normalization (Salimans & Kingma 2016): apply it, initialise it from data, remove it.

A weight-normed layer computes with w = g · v / ‖v‖, the norm taken per slice along one dim
(every dim where g has size 1). Per layer type, g is per *output* channel:

* Conv1d/2d/3d and Linear, weight (C_out, C_in/groups, k...) or (out, in): ``dim=0``;
* ConvTranspose1d/2d/3d, weight (C_in, C_out/groups, k...): ``dim=1``. With ``groups > 1``
  slice j of dim 1 holds output channel j of *every* group, so one g is shared by ``groups``
  output channels. We keep torch's own ``parametrizations.weight_norm(dim=1)`` anyway, so the
  checkpoint loads with plain torch and the fold recognises it; the data-dependent init then
  pools the variance of the channels that share a g (each channel still gets zero mean).

Applying it without data is exact (v = w, g = ‖w‖). With data, the data-dependent init sets,
per layer in forward order, g = 1/σ and b = −μ/σ where μ, σ are the per-channel mean and std of
t = v·x/‖v‖ on the batch, so the layer's pre-activations start with zero mean and unit variance.

Removal bakes w = g · v / ‖v‖ (in float64, cast back) into a plain ``weight`` for layers made
with the parametrizations API or the deprecated hook API, and rewrites bare state_dicts
(``…parametrizations.weight.original0/1`` and ``…weight_g/weight_v`` keys) the same way.
"""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils.weight_norm import WeightNorm

from ..check import compare_outputs
from ..errors import UsageError
from ..inputs import InputsLike
from ..io.data import Batch, check_fits, load_batches, to_model
from ..pipeline import Edit, ModulePass, PassContext, raise_if_failed, run
from ..report import Change, Check, Report, Skip, SkipReason
from ..surgery import eval_mode, shared_parameter_ids, weight_norm_sites
from ..trace import Trace, call_model, trace
from .mean_only_bn import replace_batchnorms
from .weight_norm_init import data_dependent_init

SUPPORTED_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
)
_NAMES = {cls.__name__.lower(): cls for cls in SUPPORTED_LAYER_TYPES}


# --------------------------------------------------------------------------- maths


def weight_norm_dim(module: nn.Module) -> int:
    """The dim g is taken per: output channels, i.e. 1 for transposed convs, else 0."""
    return 1 if getattr(module, "transposed", False) else 0


def norm_dims(g_shape: torch.Size, v_shape: torch.Size) -> tuple[int, ...]:
    """The dims ‖v‖ is taken over, read from g's shape (size 1 there); ValueError if g does not fit v."""
    if len(g_shape) == 0:
        return tuple(range(len(v_shape)))
    if len(g_shape) != len(v_shape) or any(gs not in (1, vs) for gs, vs in zip(g_shape, v_shape)):
        raise ValueError(f"g of shape {tuple(g_shape)} does not fit v of shape {tuple(v_shape)}")
    return tuple(d for d, gs in enumerate(g_shape) if gs == 1)


def bake(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """w = g · v / ‖v‖ computed in float64, returned in v's dtype."""
    dims = norm_dims(g.shape, v.shape)
    v64 = v.detach().double()
    norm = torch.linalg.vector_norm(v64, 2, dim=dims, keepdim=True) if dims else v64.abs()
    return (v64 * (g.detach().double() / norm)).to(v.dtype)


def _torch_dim(g_shape: torch.Size, v_shape: torch.Size) -> int:
    """The ``dim`` torch's weight norm would have used for this g (-1: whole tensor)."""
    kept = [d for d, gs in enumerate(g_shape) if gs != 1] if len(g_shape) else []
    return kept[0] if len(kept) == 1 else -1


# --------------------------------------------------------------------------- what a layer has


def resolve_layer_types(layer_types: Iterable[type | str]) -> tuple[type[nn.Module], ...]:
    """Classes (or case-insensitive names) to weight-norm; a UsageError for anything unsupported."""
    valid = ", ".join(_NAMES)
    resolved = []
    for item in layer_types:
        cls = _NAMES.get(item.lower()) if isinstance(item, str) else item
        name = item if isinstance(item, str) else getattr(item, "__name__", repr(item))
        if not (isinstance(cls, type) and issubclass(cls, SUPPORTED_LAYER_TYPES)):
            raise UsageError(
                f"weight norm is not supported on {name}: normsurgeon applies it to conv, "
                f"conv-transpose and linear weights only; choose layer types from {valid}"
            )
        resolved.append(cls)
    if not resolved:
        raise UsageError(f"no layer types given; choose from {valid}")
    return tuple(resolved)


# --------------------------------------------------------------------------- apply


def apply_weight_norm(
    model: nn.Module,
    *,
    init_data: Any = None,
    mean_only_bn: bool = False,
    example_inputs: InputsLike | None = None,
    layer_types: Iterable[type | str] = SUPPORTED_LAYER_TYPES,
    trust_pickle: bool = False,
    atol: float | None = None,
    rtol: float | None = None,
    raise_on_mismatch: bool = True,
) -> Report:
    """Weight-norm every conv / conv-transpose / linear of ``model`` (in place); return the report.

    Without ``init_data`` the model computes what it did (checked on ``example_inputs``, or per
    layer without them). ``init_data`` (a batch, or a tensor file / folder path) runs the
    data-dependent init. ``mean_only_bn`` replaces BatchNorms that directly follow a weight-normed
    layer by :class:`~normsurgeon.modules.MeanOnlyBatchNorm` (needs inputs to trace; the report
    warns with the measured change).
    """
    types = resolve_layer_types(layer_types)
    init = load_batches(init_data, trust_pickle=trust_pickle) if init_data is not None else None
    init_batches = [to_model(b, model) for b in init.batches] if init else []
    inputs = example_inputs if example_inputs is not None else (init_batches[0] if init_batches else None)
    if mean_only_bn and inputs is None:
        raise UsageError("mean-only BatchNorm needs example inputs to find the BatchNorms that follow "
                         "weight-normed layers; pass example_inputs (CLI: --input-shape/--inputs)")
    report = Report("weightnorm apply", model=model)
    if init:
        report.notes.append(f"init {init.description}")
    flow = _trace(model, inputs, init_batches)
    before = _weights(model, types) if inputs is None else None
    normed = _apply_all(model, types, flow, report)
    report.check = _exactness(model, flow, inputs, before, atol, rtol, "weight-normed vs original")
    if raise_on_mismatch:
        raise_if_failed(report, "the weight-normed model")
    if mean_only_bn:
        replace_batchnorms(model, flow, {m for _, m in normed}, inputs, report)
    if init_batches:
        data_dependent_init(model, _forward_order(normed, flow), init_batches, report)
    report.facts["weight-normed"] = len(normed)
    report.notes.append(_loading_note(mean_only_bn, types))
    return report


def _trace(model: nn.Module, inputs: InputsLike | None, init_batches: list[Batch]) -> Trace | None:
    if inputs is None:
        return None
    with eval_mode(model):
        if init_batches:
            check_fits(model, init_batches[0], what="init data")
        return trace(model, inputs)


def _weights(model: nn.Module, types: tuple[type, ...]) -> dict[str, torch.Tensor]:
    return {path: m.weight.detach().clone() for path, m in model.named_modules()
            if isinstance(m, types) and isinstance(getattr(m, "weight", None), torch.Tensor)
            and not isinstance(m.weight, nn.parameter.UninitializedParameter)}


def _apply_all(model: nn.Module, types: tuple[type, ...], flow: Trace | None, report: Report) -> list[tuple[str, nn.Module]]:
    shared = shared_parameter_ids(model)  # tied weights, and weights whose memory another tensor also uses
    normed = []
    for path, module in list(model.named_modules()):
        if not isinstance(module, types):
            continue
        refusal = _refusal(module, shared, flow)
        if refusal:
            report.skipped.append(Skip(path, *refusal))
            continue
        dim = weight_norm_dim(module)
        zeros = _reparametrize(module, dim)
        normed.append((path, module))
        report.changes.append(Change("weight-normed", path, None, _apply_detail(module, dim, zeros)))
    return normed


def _refusal(module: nn.Module, shared: set[int], flow: Trace | None) -> tuple[SkipReason, str] | None:
    if weight_norm_sites(module):
        return SkipReason.ALREADY_WEIGHT_NORMED, "left as it is"
    if parametrize.is_parametrized(module, "weight"):
        kinds = ", ".join(type(p).__name__ for p in module.parametrizations.weight)
        return SkipReason.PARAMETRIZED_WEIGHT, f"weight is parametrized by {kinds}"
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return SkipReason.LAZY_UNINITIALIZED, "run the model once before applying weight norm"
    if not isinstance(weight, nn.Parameter) or not weight.is_floating_point():
        return SkipReason.UNSUPPORTED_DTYPE, "weight is not a floating-point parameter"
    if id(weight) in shared:
        return SkipReason.SHARED_PARAMETER, "weight norm would untie it"
    if flow is not None and flow.uses_outside(weight):
        return SkipReason.FUNCTIONAL_USE, "its weight is read outside it, which would still see the raw weight"
    return None


def _reparametrize(module: nn.Module, dim: int) -> int:
    """Register torch's weight norm; all-zero slices get v = 1, g = 0 (w stays 0, no NaN). Returns their count."""
    zero = torch.norm_except_dim(module.weight.detach(), 2, dim) == 0
    parametrizations.weight_norm(module, name="weight", dim=dim)
    if zero.any():
        with torch.no_grad():
            v = module.parametrizations.weight.original1
            v.copy_(torch.where(zero.expand_as(v), torch.ones_like(v), v))
    return int(zero.sum())


def _apply_detail(module: nn.Module, dim: int, zeros: int) -> str:
    groups = getattr(module, "groups", 1)
    detail = f"dim={dim}: one g per output channel"
    if getattr(module, "transposed", False) and groups > 1:
        detail = (f"dim=1: groups={groups}, so each g is shared by the {groups} output channels "
                  "with the same index in every group (torch's layout for transposed weights)")
    if zeros:
        detail += f"; {zeros} all-zero slice(s) kept at 0 with g=0"
    return detail


def _exactness(model: nn.Module, flow: Trace | None, inputs: InputsLike | None, before: dict | None,
               atol: float | None, rtol: float | None, label: str):
    """Outputs against the original's on the inputs, or, without inputs, every weight against the old one."""
    if flow is not None:
        with eval_mode(model), torch.no_grad():
            return compare_outputs(flow.outputs, call_model(model, inputs), atol=atol, rtol=rtol, label=label)
    modules = dict(model.named_modules())
    with torch.no_grad():
        after = {path: modules[path].weight.detach() for path in before}
    return compare_outputs(before, after, atol=atol, rtol=rtol, label=f"{label}, per-layer weights (no example inputs)")


def _forward_order(normed: list[tuple[str, nn.Module]], flow: Trace | None) -> list[tuple[str, nn.Module]]:
    if flow is None:
        return normed
    first = {m: calls[0].index for m, calls in flow.calls.items() if calls}
    return sorted(normed, key=lambda item: first.get(item[1], len(flow.nodes)))


def _loading_note(mean_only_bn: bool, types: tuple[type, ...]) -> str:
    options = [] if set(types) == set(SUPPORTED_LAYER_TYPES) else [f"layer_types={[t.__name__ for t in types]}"]
    if mean_only_bn:
        options += ["mean_only_bn=True", "example_inputs=..."]
    call = f"normsurgeon.apply_weight_norm(model{''.join(', ' + o for o in options)})"
    return ("a weight-normed model cannot be pickled; it is saved as a state_dict. To load it: build the "
            f"architecture, run {call}, then model.load_state_dict(torch.load(path))")


# --------------------------------------------------------------------------- remove


def remove_weight_norm(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    *,
    example_inputs: InputsLike | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    raise_on_mismatch: bool = True,
) -> Report:
    """Bake every weight norm into a plain weight; ``report.model`` is the module or the new state_dict.

    A module is edited in place (parametrizations and deprecated hooks alike) and checked on
    ``example_inputs`` (or layer by layer); a state_dict is rewritten into a new one whose keys
    load into the architecture built without weight norm.
    """
    if not isinstance(model_or_state_dict, Mapping):
        return run(RemoveWeightNorm(), model_or_state_dict, example_inputs, atol=atol, rtol=rtol,
                   raise_on_mismatch=raise_on_mismatch)
    report = _remove_from_state_dict(model_or_state_dict, atol, rtol)
    if raise_on_mismatch:
        raise_if_failed(report, "the baked state_dict")
    return report


class RemoveWeightNorm(ModulePass):
    """Bake each weight norm (parametrization or hook API) into a plain weight, in eval mode if need be.

    It reads no dataflow and needs no example inputs: without them each baked weight is checked
    against torch's own weight norm. A model without weight norm is not checked (nothing changed).
    """

    name, report_name = "remove_weight_norm", "weightnorm remove"
    check_label, subject = "without weight norm vs with", "the model without weight norm"
    eval_reason = None  # weights do not depend on the mode; the check runs in eval mode
    needs_flow = False
    check_if_unchanged = False

    def plan(self, ctx: PassContext) -> Iterator[Edit | Skip]:
        """Each weight-norm site (name, API style, dim); one with other parametrizations stacked is skipped."""
        for path, module in list(ctx.model.named_modules()):
            for name, style, dim in weight_norm_sites(module):
                if style == "parametrization" and len(module.parametrizations[name]) != 1:
                    kinds = ", ".join(type(p).__name__ for p in module.parametrizations[name])
                    yield Skip(path, SkipReason.PARAMETRIZED_WEIGHT, f"{name} is parametrized by {kinds}; "
                               "remove the others first")
                else:
                    yield Edit(path, module, (name, style, dim))

    def apply(self, ctx: PassContext, edit: Edit) -> list[Change]:
        name, style, dim = edit.plan
        key = f"{edit.path}.{name}" if edit.path else name
        before, after = ctx.state.setdefault(self.name, ({}, {}))
        before[key], after[key] = _bake_site(edit.target, name, style)
        return [Change("weight norm removed", edit.path, None, f"{name}: {style} API, dim={dim}")]

    def finish(self, ctx: PassContext, report: Report) -> None:
        if report.changes:  # a model this pass did not touch keeps its hooks
            for module in ctx.model.modules():
                if not parametrize.is_parametrized(module):
                    _drop_compat_hooks(module)
        report.facts["removed"] = len(report.changes)

    def check_without_inputs(self, ctx: PassContext, atol: float | None, rtol: float | None) -> Check:
        """Every baked weight against the one torch's weight norm computed."""
        before, after = ctx.state[self.name]
        return compare_outputs(before, after, atol=atol, rtol=rtol,
                               label="plain weights vs weight-normed weights (no example inputs)")


def _bake_site(module: nn.Module, name: str, style: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace one weight norm by its baked plain weight; returns (torch's weight, ours)."""
    if style == "parametrization":
        plist = module.parametrizations[name]
        g, v = plist.original0, plist.original1
        with torch.no_grad():
            reference = getattr(module, name).detach().clone()
        weight = bake(g, v)
        _own_parametrized_class(module)
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    else:
        hook = next(h for h in module._forward_pre_hooks.values() if isinstance(h, WeightNorm) and h.name == name)
        g, v = getattr(module, f"{name}_g"), getattr(module, f"{name}_v")
        with torch.no_grad():
            reference = hook.compute_weight(module).detach().clone()
        weight = bake(g, v)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.nn.utils.remove_weight_norm(module, name)
    with torch.no_grad():
        getattr(module, name).copy_(weight)
    return reference, getattr(module, name).detach()


def _own_parametrized_class(module: nn.Module) -> None:
    """Give ``module`` a private copy of its generated ``Parametrized*`` class.

    torch's remove_parametrizations deletes the property from the module's class, and a deep
    copy shares that class with the original: removing weight norm from a copy would break the
    original (``'ParametrizedConv1d' object has no attribute 'weight'``).
    """
    cls = type(module)
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def _drop_compat_hooks(module: nn.Module) -> None:
    """torch leaves a local load_state_dict hook behind after removal; it makes the module unpicklable."""
    for key, hook in list(module._load_state_dict_pre_hooks.items()):
        if "_weight_norm_compat_hook" in getattr(getattr(hook, "hook", hook), "__qualname__", ""):
            del module._load_state_dict_pre_hooks[key]


_PARAMETRIZED = re.compile(r"(?P<prefix>.*?)parametrizations\.(?P<name>[^.]+)\.original0")
_HOOKED = re.compile(r"(?P<prefix>.*?)(?P<name>[^.]+)_g")


def _state_dict_sites(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str, str]]:
    """g key -> (v key, new weight key, style) for every weight-norm pair in the state_dict."""
    sites = {}
    for key in state_dict:
        match = _PARAMETRIZED.fullmatch(key)
        if match:
            v_key = key[: -len("original0")] + "original1"
            style = "parametrization"
        else:
            match = _HOOKED.fullmatch(key)
            v_key = key[: -len("_g")] + "_v" if match else ""
            style = "hook"
        if match and v_key in state_dict:
            sites[key] = (v_key, match["prefix"] + match["name"], style)
    return sites


def _remove_from_state_dict(state_dict: Mapping[str, torch.Tensor], atol: float | None, rtol: float | None) -> Report:
    sites = _state_dict_sites(state_dict)
    report = Report("weightnorm remove (state_dict)")
    drop = {v_key for v_key, _, _ in sites.values()}
    new: OrderedDict[str, torch.Tensor] = OrderedDict()
    torch_weights, ours = {}, {}
    for key, value in state_dict.items():
        if key in drop:
            continue
        if key not in sites:
            new[key] = value
            continue
        v_key, weight_key, style = sites[key]
        g, v = value, state_dict[v_key]
        try:
            new[weight_key] = bake(g, v)
        except ValueError as exc:
            new[key], new[v_key] = g, v
            report.skipped.append(Skip(weight_key, SkipReason.PARAMETRIZED_WEIGHT, f"{exc}: not weight norm"))
            continue
        dim = _torch_dim(g.shape, v.shape)
        torch_weights[weight_key] = torch._weight_norm(v, g, dim)
        ours[weight_key] = new[weight_key]
        per = f"g per dim {dim}" if dim >= 0 else "one g for the whole tensor"
        report.changes.append(Change("weight norm removed", weight_key.rpartition(".")[0], None,
                                     f"{style} keys -> {weight_key} ({per})"))
    report.model = new
    if ours:
        report.check = compare_outputs(torch_weights, ours, atol=atol, rtol=rtol,
                                       label="baked weights vs torch's weight norm, per layer")
    leftover = [k for k in new if ".parametrizations." in k]
    if leftover:
        report.notes.append(f"other parametrizations left as they are: {', '.join(leftover[:4])}")
    report.facts["removed"] = len(report.changes)
    return report
