"""Optimizer parameter groups that keep weight decay off norm parameters and biases.

Weight decay on a norm's gain pulls it towards 0, i.e. towards switching the layer off; on a
bias it pulls towards an arbitrary point. Both are usually unwanted, so they get no decay
(norm gains get ``norm_decay``, 0 by default).

A weight is *scale-invariant* when the loss does not change if it is multiplied by c > 0:
a conv/linear whose output goes straight into a normalization (BatchNorm, InstanceNorm,
LayerNorm, GroupNorm, RMSNorm) — through reshapes, transposes, ReLU or pooling at most — and,
for norms that do not remove a per-channel mean (all but BatchNorm / InstanceNorm), has no bias.
The gradient of such a weight is orthogonal to it, so L2 decay only shrinks ‖w‖ and thereby
raises the effective learning rate, lr_eff ∝ lr / ‖w‖² (van Laarhoven 2017; Zhang et al. 2019).
That is found from the traced dataflow, so it needs example inputs. The direction ``v`` of a
weight-normed layer is scale-invariant by construction and is reported without a trace.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.utils import parametrize

from ..dataflow import walk_down
from ..inputs import InputsLike
from ..modules import MeanOnlyBatchNorm
from ..report import Change, Report
from ..surgery import eval_mode, weight_norm_sites
from ..trace import Node, Trace, Value, trace

_NORM_TYPES = (_BatchNorm, _InstanceNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, MeanOnlyBatchNorm)
_CHANNEL_MEAN_NORMS = (_BatchNorm, _InstanceNorm)  # a per-channel bias before them cancels
_SCALE_INVARIANT_NORMS = (_BatchNorm, _InstanceNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
_HOMOGENEOUS_MODULES = (
    nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)
_HOMOGENEOUS_FUNCTIONS = frozenset(
    "view reshape flatten unflatten squeeze unsqueeze contiguous clone transpose permute swapaxes swapdims "
    "relu relu_ leaky_relu leaky_relu_ dropout max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d "
    "avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d chunk split unbind".split()
)
_PARAMETRIZED = re.compile(r"(?:(?P<layer>.*)\.)?parametrizations\.(?P<tensor>[^.]+)\.(?P<leaf>original\d*)")
_NO_INPUTS_NOTE = ("scale-invariant weights were not identified: pass example_inputs so the dataflow can be "
                   "traced (CLI: --input-shape/--inputs)")


@dataclass
class ParamGroups(Sequence):
    """Groups for ``torch.optim`` ({"params", "weight_decay", "name"}), and the scale-invariant layers.

    A sequence of the groups, so ``torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)`` works as is.
    """

    groups: list[dict[str, Any]]
    scale_invariant: list[str]
    report: Report
    names: dict[str, list[str]] = field(default_factory=dict)  # group name -> parameter names

    def __getitem__(self, index: Any) -> Any:
        return self.groups[index]

    def __len__(self) -> int:
        return len(self.groups)

    def to_dict(self) -> dict[str, Any]:
        groups = [{"name": g["name"], "weight_decay": g["weight_decay"], "params": self.names[g["name"]]}
                  for g in self.groups]
        return {**self.report.to_dict(), "groups": groups, "scale_invariant": list(self.scale_invariant)}


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    example_inputs: InputsLike | None = None,
    exempt_scale_invariant: bool = False,
    norm_decay: float = 0.0,
) -> ParamGroups:
    """Split ``model``'s parameters into decay / no-decay (/ norm) groups; every parameter once."""
    report = Report("param_groups", model=model)
    invariant: dict[str, str] = {}  # module path -> the norm its output goes into
    if example_inputs is None:
        report.notes.append(_NO_INPUTS_NOTE)
    else:
        with eval_mode(model):
            invariant = find_scale_invariant(model, trace(model, example_inputs))
    modules = dict(model.named_modules())
    assigned: dict[str, tuple[list[nn.Parameter], list[str], float]] = {
        "decay": ([], [], weight_decay), "no_decay": ([], [], 0.0), "norm": ([], [], norm_decay),
    }
    scale_invariant: list[str] = []
    for name, param in model.named_parameters():
        group, why, module_path = _classify(name, modules, invariant)
        if why.startswith("scale-invariant"):
            if module_path not in scale_invariant:
                scale_invariant.append(module_path)
            group = "no_decay" if exempt_scale_invariant else "decay"
        if group == "norm" and norm_decay == 0.0:
            group = "no_decay"
        assigned[group][0].append(param)
        assigned[group][1].append(name)
        report.changes.append(Change("grouped", name, group, why))
    groups = [{"params": params, "weight_decay": decay, "name": group}
              for group, (params, _, decay) in assigned.items() if params]
    names = {group: list(n) for group, (_, n, _) in assigned.items() if n}
    report.facts.update({f"{g['name']} params": len(g["params"]) for g in groups})
    report.facts["scale-invariant layers"] = len(scale_invariant) if example_inputs is not None else "unknown (no example inputs)"
    if scale_invariant:
        action = "exempted from decay" if exempt_scale_invariant else "kept in the decay group (exempt_scale_invariant=False)"
        report.notes.append(f"{len(scale_invariant)} scale-invariant weight(s) {action}: L2 there only changes the "
                            "effective learning rate (lr_eff ∝ lr/‖w‖²)")
    return ParamGroups(groups, scale_invariant, report, names)


def _classify(name: str, modules: dict[str, nn.Module], invariant: dict[str, str]) -> tuple[str, str, str]:
    """(group, reason, owning layer path) for one parameter name."""
    match = _PARAMETRIZED.fullmatch(name)
    if match:
        return _parametrized(match["layer"] or "", match["tensor"], match["leaf"], modules)
    path, _, leaf = name.rpartition(".")
    owner = modules.get(path)
    if owner is not None and _hook_weight_norm(owner, leaf):
        return ("norm", "weight-norm gain g", path) if leaf.endswith("_g") else (
            "decay", "scale-invariant: weight-norm direction v", path)
    if owner is not None and is_norm(owner):
        if leaf == "bias" or leaf.endswith("bias"):
            return "no_decay", f"bias of norm {type(owner).__name__}", path
        return "norm", f"gain of norm {type(owner).__name__}", path
    if leaf.endswith("bias"):
        return "no_decay", "bias", path
    if path in invariant and leaf == "weight":
        return "decay", f"scale-invariant: output goes straight into {invariant[path]}", path
    return "decay", "weight", path


def _parametrized(layer_path: str, tensor: str, leaf: str, modules: dict[str, nn.Module]) -> tuple[str, str, str]:
    layer = modules.get(layer_path)
    is_weight_norm = layer is not None and any(n == tensor and s == "parametrization" for n, s, _ in weight_norm_sites(layer))
    if is_weight_norm and leaf == "original0":
        return "norm", "weight-norm gain g", layer_path
    if is_weight_norm and leaf == "original1":
        return "decay", "scale-invariant: weight-norm direction v", layer_path
    return ("no_decay" if tensor.endswith("bias") else "decay"), f"parametrized {tensor}", layer_path


def _hook_weight_norm(module: nn.Module, leaf: str) -> bool:
    return any(style == "hook" and leaf in (f"{n}_g", f"{n}_v") for n, style, _ in weight_norm_sites(module))


def is_norm(module: nn.Module) -> bool:
    """torch norm layers, and leaf modules named like a norm (``...Norm``) whose parameters are all 1-D."""
    if isinstance(module, _NORM_TYPES):
        return True
    if next(module.children(), None) is not None or parametrize.is_parametrized(module):
        return False
    params = list(module.parameters(recurse=False))
    return type(module).__name__.endswith("Norm") and bool(params) and all(p.dim() <= 1 for p in params)


# --------------------------------------------------------------------------- scale invariance


def find_scale_invariant(model: nn.Module, flow: Trace) -> dict[str, str]:
    """Conv/linear layer path -> the norm(s) its output goes straight into, for scale-invariant weights."""
    found = {}
    for path, module in model.named_modules():
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) or weight_norm_sites(module):
            continue
        calls = flow.calls_of(module)
        norms: list[str] = []
        if calls and all(_into_norms(flow, call, module, norms) for call in calls):
            found[path] = ", ".join(dict.fromkeys(norms))
    return found


def _into_norms(flow: Trace, call: Node, layer: nn.Module, norms: list[str]) -> bool:
    if not call.outputs:
        return False
    has_bias = getattr(layer, "bias", None) is not None
    rank = len(call.outputs[0].shape)
    axis = rank - 1 if isinstance(layer, nn.Linear) else 1
    return _ends_in_norms(flow, call.outputs[0], has_bias, axis, norms)


def _ends_in_norms(flow: Trace, value: Value, has_bias: bool, axis: int, norms: list[str]) -> bool:
    """Every path from ``value`` reaches a scale-invariant norm through homogeneous ops only.

    With a bias only axis-only layout ops may sit between (the bias must stay a per-channel
    constant the norm removes); without one, any op with f(c·x) = c·f(x).
    """
    if has_bias:  # a layout op's output nobody reads is no path
        readers = list(walk_down(value, axis=axis))
        return bool(readers) and all(_into_norm(user, has_bias, at, norms) for user, at, _ in readers)
    if not value.users:
        return False
    for user in value.users:
        if user.kind == "module" and is_norm(user.module):
            if not _into_norm(user, has_bias, axis, norms):
                return False
        elif len(user.inputs) == 1 and _homogeneous(user) and user.outputs:
            if not all(_ends_in_norms(flow, out, has_bias, axis, norms) for out in user.outputs):
                return False
        else:
            return False
    return True


def _into_norm(user: Node, has_bias: bool, axis: int, norms: list[str]) -> bool:
    """``user`` is a norm that reads only this value and removes a scale (and, with a bias, the bias)."""
    if len(user.inputs) != 1 or not (user.kind == "module" and is_norm(user.module)):
        return False  # also reads another tensor (a residual add, a mask, ...), or is no norm
    if not _invariant_norm(user, has_bias, axis):
        return False
    norms.append(f"{user.name} ({type(user.module).__name__})")
    return True


def _homogeneous(node: Node) -> bool:
    """f(c·x) = c·f(x) for c > 0: shape ops, ReLU/LeakyReLU, pooling, dropout."""
    if node.kind == "module":
        return isinstance(node.module, _HOMOGENEOUS_MODULES)
    return node.kind == "function" and node.name in _HOMOGENEOUS_FUNCTIONS


def _invariant_norm(node: Node, has_bias: bool, axis: int) -> bool:
    norm = node.module
    if has_bias:
        return isinstance(norm, _CHANNEL_MEAN_NORMS) and axis == 1
    if isinstance(norm, _SCALE_INVARIANT_NORMS):
        return True
    if isinstance(norm, MeanOnlyBatchNorm) or not node.inputs:
        return False
    return _probe_invariance(norm, node.inputs[0].shape)


def _probe_invariance(norm: nn.Module, shape: tuple[int, ...]) -> bool:
    """A hand-written norm is scale-invariant if norm(2.5·x) == norm(x) on a random x (train mode)."""
    probe = copy.deepcopy(norm).train()
    reference = next(probe.parameters(), None)
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    try:
        with torch.no_grad():
            a, b = probe(x), probe(2.5 * x)
    except Exception:
        return False
    return isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, rtol=1e-3, atol=1e-4)
