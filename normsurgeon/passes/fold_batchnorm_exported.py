"""Fold test-time BatchNorm in a ``torch.export`` ExportedProgram (a ``.pt2`` file).

An ExportedProgram has no modules to edit, only an ATen graph whose weights are lifted to
placeholders. A ``batch_norm`` node (eval form) whose input is a ``conv*`` / ``conv_transpose*`` /
``convolution`` / ``linear`` node is folded when the graph proves the layer's output goes to the
BN alone and the layer's weight placeholder has no other user: the weight is rescaled in place in
the program's state_dict (same maths as :mod:`normsurgeon.maths`), the bias written into the
layer's own bias, or, for a bias-free layer, into the BN's now unused bias or running_mean
tensor, and the BN node is removed. BNs in any other position are reported as skipped.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from ..check import compare_outputs
from ..errors import PreconditionError, UsageError, first_line
from ..inputs import ExampleInputs, InputsLike
from ..maths import batchnorm_scale_shift, scale_channels_
from ..pipeline import PassContext
from ..report import Change, Check, Report, Skip, SkipReason
from .fold_batchnorm import FoldBatchNorm

_aten = torch.ops.aten
_CONV = {_aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default}
_CONV_TRANSPOSE = {_aten.conv_transpose1d.default, _aten.conv_transpose2d.input, _aten.conv_transpose3d.input}
_LINEAR = {_aten.linear.default}
_CONVOLUTION = _aten.convolution.default
_BN_EVAL = _aten._native_batch_norm_legit_no_training.default
_BN = _aten.batch_norm.default


def fold_batchnorm_exported(
    program: torch.export.ExportedProgram,
    example_inputs: InputsLike | None = None,
    *,
    atol: float | None = None,
    rtol: float | None = None,
) -> Report:
    """Fold BNs of ``program`` in place; check against its outputs before folding.

    ``example_inputs`` default to the example inputs stored in the program.
    """
    inputs = _inputs(program, example_inputs)
    reference = _run(program, inputs)
    report = Report("fold", model=program)
    tensors = _Tensors(program)
    for node in list(program.graph.nodes):
        if node.op == "call_function" and node.target in (_BN, _BN_EVAL):
            _fold_node(program, node, tensors, report)
    program.graph.eliminate_dead_code()
    program.graph_module.recompile()
    module = program.module()
    with torch.no_grad():
        folded = inputs.call(module)
    report.check = compare_outputs(reference, folded, atol=atol, rtol=rtol, label="folded vs original")
    if not report.check.passed and atol is None and rtol is None:  # tolerances the user gave are kept
        report.check = _review(module, inputs, reference, folded, report)
    return report


def _review(module: torch.nn.Module, inputs: ExampleInputs, reference: Any, folded: Any, report: Report) -> Check:
    """The module path's rounding-noise allowance (:meth:`~normsurgeon.pipeline.ModulePass.review`) for a program.

    A fold exact in float64 still rounds each rescaled weight once in float32, and a deep graph
    amplifies that (LeViT); the folded program run in float64 measures how much.
    """
    ctx = PassContext(module, inputs).knowing(reference=reference)  # the outputs before the fold
    return FoldBatchNorm().review(ctx, report, folded, report.check)


def _run(program: torch.export.ExportedProgram, inputs: ExampleInputs) -> Any:
    """The program's outputs, or the inputs it was exported for when it refuses these (its guards)."""
    try:
        with torch.no_grad():
            return inputs.call(program.module())
    except Exception as exc:
        stored = program.example_inputs
        shapes = ""
        if stored is not None:
            found = [tuple(t.shape) for t in (*stored[0], *stored[1].values()) if isinstance(t, torch.Tensor)]
            shapes = f"; it was exported for inputs of shape {', '.join(map(str, found))}" if found else ""
        raise PreconditionError(
            f"the .pt2 program does not run on the example inputs ({first_line(exc, named=True)}){shapes}; "
            "pass --input-shape/--inputs it accepts, or re-export it with dynamic shapes"
        ) from exc


def _inputs(program: torch.export.ExportedProgram, example_inputs: InputsLike | None) -> ExampleInputs:
    """The given inputs, else those stored in the program (positional and keyword)."""
    if example_inputs is not None:
        return ExampleInputs.of(example_inputs)
    stored = program.example_inputs
    if stored is None:
        raise UsageError("the .pt2 file stores no example inputs; pass --input-shape or --inputs")
    return ExampleInputs(tuple(stored[0]), stored[1], "the example inputs stored in the .pt2 file")


class _Tensors:
    """Placeholder name -> tensor (parameters, buffers, constants), copied before any edit.

    torch.export shares parameter storage with the module it exported: editing in place would
    silently change the user's module too, so a tensor is cloned the first time it is written.
    """

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        signature = program.graph_signature
        self.fqns = {**signature.inputs_to_parameters, **signature.inputs_to_buffers,
                     **getattr(signature, "inputs_to_lifted_tensor_constants", {})}
        self.program = program

    def _store(self, fqn: str) -> dict:
        return self.program.state_dict if fqn in self.program.state_dict else self.program.constants

    def __contains__(self, name: str) -> bool:
        fqn = self.fqns.get(name)
        return fqn is not None and (fqn in self.program.state_dict or fqn in self.program.constants)

    def get(self, name: str) -> torch.Tensor | None:
        return self._store(self.fqns[name])[self.fqns[name]] if name in self else None

    def writable(self, name: str) -> torch.Tensor:
        fqn = self.fqns[name]
        store = self._store(fqn)
        original = store[fqn]
        copy = original.detach().clone()
        store[fqn] = torch.nn.Parameter(copy, original.requires_grad) if isinstance(original, torch.nn.Parameter) else copy
        return copy


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else node.name


def _fold_node(
    program: torch.export.ExportedProgram, bn: fx.Node, tensors: _Tensors, report: Report
) -> None:
    path = _module_path(bn)
    layer, weight, bias, mean, var, *rest = bn.args
    eps = rest[-2] if bn.target is _BN else rest[-1]
    if bn.target is _BN and rest[0]:
        report.skipped.append(Skip(path, SkipReason.TRAINING_MODE, "exported with training=True"))
        return
    outputs = _bn_outputs(bn)
    if outputs is None:
        report.skipped.append(Skip(path, SkipReason.NO_FOLDABLE_NEIGHBOUR, "its batch statistics outputs are used"))
        return
    why_not = _why_not_foldable(layer, bn, tensors)
    if why_not:
        report.skipped.append(Skip(path, SkipReason.NO_FOLDABLE_NEIGHBOUR, why_not))
        return
    stats = [tensors.get(n.name) if isinstance(n, fx.Node) else None for n in (weight, bias, mean, var)]
    s, t = batchnorm_scale_shift(stats[2], stats[3], float(eps), stats[0], stats[1])
    transposed, groups = _layout(layer)
    w = tensors.writable(layer.args[1].name)
    old_bias_node = layer.args[2] if len(layer.args) > 2 else None
    if old_bias_node is not None:
        new_bias = tensors.get(old_bias_node.name).double() * s + t
        bias_node = old_bias_node
    else:
        new_bias = t
        bias_node = next(n for n in (bias, mean) if isinstance(n, fx.Node) and len(n.users) == 1)
    scale_channels_(w, s, channel_dim=1 if transposed else 0, groups=groups)
    target = tensors.writable(bias_node.name)
    with torch.no_grad():
        target.copy_(new_bias.to(target.dtype))
    layer.args = (layer.args[0], layer.args[1], bias_node, *layer.args[3:])
    outputs.replace_all_uses_with(layer)
    _rename_user_output(program, outputs.name, layer.name)
    for node in [*bn.users, bn] if outputs is not bn else [bn]:
        program.graph.erase_node(node)
    report.changes.append(Change("folded", path, _module_path(layer), "into its producer (in the exported graph)"))


def _bn_outputs(bn: fx.Node) -> fx.Node | None:
    """The node carrying the normalized output, or None when saved statistics are used too."""
    if bn.target is _BN:
        return bn
    users = list(bn.users)
    if all(u.target is operator.getitem and u.args[1] == 0 for u in users) and len(users) == 1:
        return users[0]
    return None


def _why_not_foldable(layer: object, bn: fx.Node, tensors: _Tensors) -> str:
    if not isinstance(layer, fx.Node) or layer.op != "call_function" or not (
        layer.target in _CONV | _CONV_TRANSPOSE | _LINEAR or layer.target is _CONVOLUTION
    ):
        return f"its input comes from {getattr(layer, 'name', layer)}, not a conv or linear"
    if len(layer.users) != 1:
        return f"{layer.name}'s output also goes to {', '.join(u.name for u in layer.users if u is not bn)}"
    for arg in layer.args[1:3]:
        if isinstance(arg, fx.Node) and (arg.name not in tensors or len(arg.users) != 1):
            return f"{layer.name}'s weight or bias is not a parameter used only there"
    if len(layer.args) < 2 or not isinstance(layer.args[1], fx.Node):
        return f"{layer.name} has no weight placeholder"
    return ""


def _layout(layer: fx.Node) -> tuple[bool, int]:
    """(transposed, groups) of a conv-like node; a linear is (False, 1)."""
    args = layer.args
    if layer.target is _CONVOLUTION:
        return bool(args[6]), int(args[8])
    if layer.target in _CONV:
        return False, int(args[6]) if len(args) > 6 else 1
    if layer.target in _CONV_TRANSPOSE:
        return True, int(args[6]) if len(args) > 6 else 1
    return False, 1


def _rename_user_output(program: torch.export.ExportedProgram, old: str, new: str) -> None:
    """Keep the program's signature in step when a graph output now comes from another node."""
    for spec in program.graph_signature.output_specs:
        if getattr(spec.arg, "name", None) == old:
            spec.arg = type(spec.arg)(name=new)
