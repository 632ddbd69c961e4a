"""Bake weight standardization into plain conv weights (timm StdConv2d, ScaledStdConv2d, NFNets, BiT).

A weight-standardized conv recomputes ŵ = γ·s·(w − mean w)/sqrt(var w + eps) per output channel
at every forward, and an ONNX export keeps those ops (54 nodes on nfnet_l0). At test time ŵ is a
constant: each such layer, recognised by behaviour (:mod:`normsurgeon.weight_standardization`),
is replaced by a plain ``nn.Conv2d`` (or 1d/3d) holding the ŵ it computed, so the model computes
the same numbers and its export carries a plain Conv. A layer whose convolution a plain conv
cannot stand in for (it pads its input dynamically, TF-style) is kept, with the reason; so is one
with forward hooks, which replacing it would drop.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..check import compare_outputs
from ..inputs import InputsLike
from ..pipeline import Edit, ModulePass, PassContext, run
from ..report import Action, Change, Check, Report, Skip, SkipReason
from ..surgery import eval_mode, hooks_lost_by_replacing, replace_module
from ..weight_standardization import StandardizedConv, find_standardization


def bake_weight_standardization(model: nn.Module, example_inputs: InputsLike | None, *, inplace: bool = False,
                                atol: float | None = None, rtol: float | None = None,
                                raise_on_mismatch: bool = True) -> Report:
    """Replace every weight-standardized conv of ``model`` by a plain conv with its standardized weight.

    The result computes the same outputs (checked on ``example_inputs``; without them, each new conv
    against the layer it replaces on a probe input) and exports as plain Conv ops. With
    ``inplace=False`` the model is deep-copied first; ``report.model`` is the result.
    """
    return run(BakeWeightStandardization(), model, example_inputs, inplace=inplace, atol=atol, rtol=rtol,
               raise_on_mismatch=raise_on_mismatch)


class BakeWeightStandardization(ModulePass):
    """Each weight-standardized conv becomes a plain conv holding the weight it computed (bit-identical outputs)."""

    name, report_name = "bake_weight_standardization", "bake weight standardization"
    check_label, subject = "baked vs original", "the model with its weight standardization baked"
    eval_reason = None  # the standardized weight does not depend on the mode; the check runs in eval mode
    needs_flow = False  # each layer is probed on its own: no trace, so a later pass traces the baked model
    check_if_unchanged = False

    def plan(self, ctx: PassContext) -> Iterator[Edit | Skip]:
        """A :class:`StandardizedConv` per weight-standardized conv; why not for one that cannot be replaced."""
        for path, module in list(ctx.model.named_modules()):
            found = find_standardization(module)
            if found is None:
                continue
            if found.why_not:
                yield Skip(path, SkipReason.UNSUPPORTED_STRUCTURE, f"{found.describe()}: {found.why_not}")
                continue
            if module is ctx.model:  # nothing holds the model itself, so no plain conv can take its place
                yield Skip(path, SkipReason.UNSUPPORTED_STRUCTURE, f"{found.describe()} is the whole model: "
                           "wrap it (nn.Sequential(model)) to have it replaced by a plain conv")
                continue
            hooked = hooks_lost_by_replacing(module)
            if hooked:
                yield Skip(path, SkipReason.HOOKED, hooked)
                continue
            yield Edit(path, module, found)

    def apply(self, ctx: PassContext, edit: Edit) -> list[Change]:
        found: StandardizedConv = edit.plan
        plain = found.build()
        replace_module(ctx.model, edit.target, plain, ctx.parents)
        ctx.state.setdefault(self.name, []).append((edit.path, found, plain))
        return [Change(Action.REPLACED, edit.path, None,
                       f"{found.describe()} by a plain {type(plain).__name__} with that weight baked in")]

    def finish(self, ctx: PassContext, report: Report) -> None:
        if report.changes:  # a fold or export of a model without any says nothing about them
            report.facts["weight-standardized convs baked"] = len(report.changes)

    def check_without_inputs(self, ctx: PassContext, atol: float | None, rtol: float | None) -> Check:
        """Each new conv against the layer it replaced, on that layer's probe input."""
        before, after = {}, {}
        for path, found, plain in ctx.state.get(self.name, []):
            x, before[path] = found.probe
            with eval_mode(plain), torch.no_grad():
                after[path] = plain(x)
        return compare_outputs(before, after, atol=atol, rtol=rtol,
                               label="plain convs vs weight-standardized convs (no example inputs)")
