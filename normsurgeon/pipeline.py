"""One shape for every module pass, and one runner for it (in the spirit of onnx-ir's passes).

A pass says what it plans and how it applies one planned item::

    class ScaleLinears(ModulePass):
        name, check_label, subject = "scale", "scaled vs original", "the scaled model"

        def plan(self, ctx):
            for path, module in ctx.model.named_modules():
                if isinstance(module, nn.Linear):
                    yield Edit(path, module)
                elif isinstance(module, nn.Conv2d):
                    yield Skip(path, SkipReason.NO_FOLDABLE_NEIGHBOUR, "not a linear layer")

        def apply(self, ctx, edit):
            ...  # change edit.target in place
            return [Change("scaled", edit.path)]

:func:`run` does everything else once, for a single pass or a :class:`Sequential` of them: the
training-mode refusal, the optional copy, **one** trace shared by every pass of the run (traced on
first use), each pass's check against the original outputs, and the single place that raises
when a check fails. It returns one :class:`Report` (merged over the passes).

Items are applied as the pass yields them, so a pass may plan each item against the edits it
already made. A pass that changes which module feeds which makes the shared trace stale for the
passes after it; those see the original dataflow, which can only make them refuse more (e.g. a
LayerNorm whose consumer was a BatchNorm folded away is still seen feeding that BatchNorm).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from .check import compare_outputs, mismatch_error, require_tensor_outputs
from .errors import PreconditionError
from .report import Change, Check, Report, Skip
from .surgery import ParentIndex, copy_model, module_parents, shared_parameter_ids
from .trace import Trace, call_model, refuse_unusable, trace


@dataclass(frozen=True)
class Edit:
    """One planned change: ``target`` at ``path``, with whatever the pass worked out for it."""

    path: str
    target: Any
    plan: Any = None


@dataclass
class PassContext:
    """What the passes of one run share: the model, its example inputs, one trace, the original outputs."""

    model: nn.Module
    example_inputs: tuple | dict
    removed: dict[nn.Module, str] = field(default_factory=dict)  # modules a pass took out of the tree

    @cached_property
    def flow(self) -> Trace:
        """The dataflow of the model as it was before the run (traced on first use, once)."""
        flow = trace(self.model, self.example_inputs)
        require_tensor_outputs(flow.outputs)
        return flow

    @cached_property
    def reference(self) -> Any:
        """The original outputs every check compares with (the trace's, or one plain forward)."""
        if "flow" in self.__dict__:
            return self.flow.outputs
        with torch.no_grad():
            outputs = call_model(self.model, self.example_inputs)
        require_tensor_outputs(outputs)
        return outputs

    @cached_property
    def shared(self) -> set[int]:
        """Parameters used by more than one module (never edited in place)."""
        return shared_parameter_ids(self.model)

    @cached_property
    def parents(self) -> ParentIndex:
        return module_parents(self.model)


class ModulePass:
    """Base of a pass over an ``nn.Module``: override :meth:`plan` and :meth:`apply` (and the labels)."""

    name = "pass"  # Report.pass_name
    check_label = "changed vs original"
    subject = "the changed model"  # how the check's error names the result
    training_message = "the model is in training mode; call model.eval() first (CLI: --eval)"
    needs_flow = True  # False for a pass that reads no dataflow (the reference is then one plain forward)

    def plan(self, ctx: PassContext) -> Iterable[Edit | Skip]:
        raise NotImplementedError

    def apply(self, ctx: PassContext, edit: Edit) -> list[Change]:
        raise NotImplementedError

    def finish(self, ctx: PassContext, report: Report) -> None:
        """After every item: notes, or edits that need all of them (default: nothing)."""

    def outputs(self, ctx: PassContext, report: Report) -> Any:
        """The changed model's outputs on the example inputs."""
        with torch.no_grad():
            return call_model(ctx.model, ctx.example_inputs)

    def review(self, ctx: PassContext, report: Report, outputs: Any) -> None:
        """A failed check under the default tolerance may be reconsidered here (default: it stands)."""


@dataclass(frozen=True)
class Sequential:
    """Passes run one after another over one model, sharing the run's trace; itself usable as a pipeline."""

    passes: tuple[ModulePass, ...]

    def __init__(self, *passes: ModulePass | Sequential) -> None:
        flat: list[ModulePass] = []
        for item in passes:
            flat.extend(item.passes if isinstance(item, Sequential) else [item])
        object.__setattr__(self, "passes", tuple(flat))


def run(
    pipeline: ModulePass | Sequential,
    model: nn.Module,
    example_inputs: tuple | dict,
    *,
    inplace: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    raise_on_mismatch: bool = True,
) -> Report:
    """Run ``pipeline`` on ``model`` and check each pass against the original outputs; return one report.

    With ``inplace=False`` the model is deep-copied first; ``report.model`` is the result. A
    failed check stops the run and raises :class:`VerificationError` (with ``raise_on_mismatch``).
    """
    passes = pipeline.passes if isinstance(pipeline, Sequential) else (pipeline,)
    refuse_unusable(model, example_inputs)
    if model.training:
        raise PreconditionError(passes[0].training_message)
    if not inplace:
        model = copy_model(model)
    ctx = PassContext(model, example_inputs)
    if any(p.needs_flow for p in passes):
        ctx.flow  # noqa: B018  (trace before any edit: the reference is the untouched model)
    else:
        ctx.reference  # noqa: B018
    reports = []
    for one_pass in passes:
        report = _run_one(one_pass, ctx, atol, rtol)
        reports.append(report)
        if not report.passed:
            break
    merged = merge_reports(reports)
    if raise_on_mismatch:
        raise_if_failed(merged, passes[len(reports) - 1].subject)
    return merged


def _run_one(one_pass: ModulePass, ctx: PassContext, atol: float | None, rtol: float | None) -> Report:
    report = Report(one_pass.name, model=ctx.model)
    for item in one_pass.plan(ctx):
        if isinstance(item, Skip):
            report.skipped.append(item)
        else:
            report.changes.extend(one_pass.apply(ctx, item))
    one_pass.finish(ctx, report)
    outputs = one_pass.outputs(ctx, report)
    report.check = compare_outputs(ctx.reference, outputs, atol=atol, rtol=rtol, label=one_pass.check_label)
    if not report.check.passed and atol is None and rtol is None:  # tolerances the user gave are kept
        one_pass.review(ctx, report, outputs)
    return report


def merge_reports(reports: Sequence[Report]) -> Report:
    """One report for a sequence of passes: the first one's name and model, everything else in order."""
    merged = Report(reports[0].pass_name, model=reports[0].model)
    for report in reports:
        merged.changes.extend(report.changes)
        merged.skipped.extend(report.skipped)
        merged.checks.extend(report.checks)
        merged.notes.extend(report.notes)
        merged.facts.update({k: v for k, v in report.facts.items() if k not in merged.facts})
    return merged


def raise_if_failed(report: Report, subject: str) -> None:
    """The one place a module pass raises on a failed check; the error carries the report."""
    failed: Check | None = next((c for c in report.checks if not c.passed), None)
    if failed is not None:
        error = mismatch_error(failed, subject)
        error.report = report  # type: ignore[attr-defined]
        raise error
