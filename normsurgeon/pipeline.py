"""One shape for every module pass, and one runner for it (in the spirit of onnx-ir's passes).

A pass says what it plans and how it applies one planned item::

    class ScaleLinears(ModulePass):
        name, report_name = "scale_linears", "scale"
        check_label, subject = "scaled vs original", "the scaled model"

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
first use), the original outputs (taken before the first edit), each pass's check against them,
and the single place that raises when a check fails. It returns one :class:`Report`.

Items are applied as the pass yields them, so a pass may plan each item against the edits it
already made. The trace is of the model as it was when a pass first needed it; a pass that changes
which module feeds which makes it stale for the passes after it, which then see the earlier
dataflow. That can only make them refuse more (a LayerNorm whose consumer was a BatchNorm folded
away is still seen feeding that BatchNorm).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .check import compare_outputs, mismatch_error, require_tensor_outputs, rounding_noise, within_rounding_noise
from .discrete_ops import Decisions, judge
from .errors import PreconditionError, UsageError, first_line
from .inputs import ExampleInputs, InputsLike
from .report import Change, Check, Report, Skip
from .surgery import ParentIndex, copy_model, eval_mode, module_parents, shared_parameter_ids
from .trace import Trace, call_model, refuse_unusable, trace

@dataclass(frozen=True)
class Edit:
    """One planned change: ``target`` at ``path``, with whatever the pass worked out for it (``plan``)."""

    path: str
    target: Any
    plan: Any = None


@dataclass
class PassContext:
    """What the passes of one run share: the model, its example inputs, one trace, the original outputs."""

    model: nn.Module
    example_inputs: ExampleInputs | None
    state: dict[str, Any] = field(default_factory=dict)  # a pass's own working state for this run, by pass name
    decisions: Decisions = field(default_factory=Decisions)  # what the original's data-dependent ops decided
    edited: bool = False  # a pass changed the model since its outputs were last taken (by a check)
    checked_outputs: Any = None  # the outputs the last check took (None: none yet, the model is the original)

    def knowing(self, *, flow: Trace | None = None, reference: Any = None) -> PassContext:
        """This context with its trace or original outputs given, not computed (a caller outside :func:`run`
        that already traced or ran the model: inspect's plan, the ``.pt2`` fold's review)."""
        for name, value in (("flow", flow), ("reference", reference)):
            if value is not None:
                self.__dict__[name] = value  # the cached_property's slot
        return self

    @functools.cached_property
    def flow(self) -> Trace:
        """The model's dataflow, traced when a pass first needs it (once per run)."""
        if self.example_inputs is None:
            raise UsageError("this pass needs example inputs to trace the model; pass example_inputs "
                             "(CLI: --input-shape/--inputs)")
        with eval_mode(self.model), self.decisions.record(self.model):
            flow = trace(self.model, self.example_inputs)
        require_tensor_outputs(flow.outputs, also=self.decisions.first_inputs)
        return flow

    @functools.cached_property
    def reference(self) -> Any:
        """The original outputs every check compares with (the trace's if traced by then, else one forward).

        :func:`run` reads it before the first edit; None without example inputs.
        """
        if self.example_inputs is None:
            return None
        if "flow" in self.__dict__:
            self.decisions.freeze()
            return self.flow.outputs
        try:
            with self.decisions.record(self.model):
                outputs = self.forward()
        except Exception as exc:  # the user's model failed on the user's inputs
            raise PreconditionError(f"the model failed on the example inputs ({first_line(exc, named=True)}); "
                                    "check --input-shape/--inputs") from exc
        self.decisions.freeze()
        require_tensor_outputs(outputs, also=self.decisions.first_inputs)
        return outputs

    @functools.cached_property
    def shared(self) -> set[int]:
        """Parameters used by more than one module (never edited in place); worked out once per pass."""
        return shared_parameter_ids(self.model)

    @functools.cached_property
    def parents(self) -> ParentIndex:
        """Where each module is registered (for replace_module); worked out once per pass."""
        return module_parents(self.model)

    def forward(self) -> Any:
        """The model's outputs on the example inputs now (in eval mode, no grad)."""
        with eval_mode(self.model), torch.no_grad():
            return call_model(self.model, self.example_inputs)

    def next_pass(self) -> None:
        """Forget what one pass's edits may have made stale (shared parameters, the parent index)."""
        self.__dict__.pop("shared", None)
        self.__dict__.pop("parents", None)


class ModulePass:
    """Base of a pass over an ``nn.Module``: override :meth:`plan` and :meth:`apply`, and the labels."""

    name = "pass"  # registry id (passes/registry.py)
    report_name = "pass"  # Report.pass_name
    check_label = "changed vs original"
    subject = "the changed model"  # how a failed check's error names the result
    eval_reason: str | None = "dropout and BatchNorm's batch statistics change its outputs"  # None: run in eval mode
    needs_flow = True  # False for a pass that reads no dataflow (it may then run without example inputs)
    check_if_unchanged = True  # False: a pass that edited nothing is not checked (spares the forward passes)
    rounding_noise_ok = False  # True: a failed default-tolerance check within float32 rounding noise passes

    def plan(self, ctx: PassContext) -> Iterable[Edit | Skip]:
        """Each item this pass would change (an :class:`Edit`) or leaves alone (a :class:`Skip`, with why)."""
        raise NotImplementedError

    def apply(self, ctx: PassContext, edit: Edit) -> list[Change]:
        """Make one planned change in place; return what changed."""
        raise NotImplementedError

    def finish(self, ctx: PassContext, report: Report) -> None:
        """After every item: notes, or edits that need all of them (default: nothing)."""

    def outputs(self, ctx: PassContext, report: Report) -> Any:
        """The changed model's outputs on the example inputs."""
        return ctx.forward()

    def review(self, ctx: PassContext, report: Report, outputs: Any, check: Check) -> Check:
        """Reconsider a check that failed under the default tolerance; returns the check that stands.

        With ``rounding_noise_ok`` a difference within :data:`~normsurgeon.check.NOISE_FACTOR` times
        the model's own float32 rounding noise passes. Deep nets amplify the one-ulp changes an exact fold makes to
        each weight (ResNet-152: 4e-4 relative for a fold exact to 7e-13 in float64); the changed
        model's distance from itself run in float64 measures that amplification, and a wrong edit
        is orders of magnitude above it.
        """
        noise = rounding_noise(ctx.model, ctx.example_inputs, outputs) if self.rounding_noise_ok else None
        accepted = within_rounding_noise(check, noise, lambda atol, label: compare_outputs(
            ctx.reference, outputs, atol=atol, rtol=check.rtol, label=label))
        if accepted is None:
            return check
        report.notes.append(accepted[1])
        return accepted[0]

    def check_without_inputs(self, ctx: PassContext, atol: float | None, rtol: float | None) -> Check | None:
        """The check when the run has no example inputs (default: refused, the outputs cannot be compared)."""
        raise UsageError(f"{self.report_name} needs example inputs to check its result; pass example_inputs "
                         "(CLI: --input-shape/--inputs)")


@dataclass(frozen=True)
class Sequential:
    """Passes run one after another over one model, sharing the run's trace; itself usable as a pipeline."""

    passes: tuple[ModulePass, ...]

    def __init__(self, *passes: ModulePass | Sequential) -> None:
        flat: list[ModulePass] = []
        for item in passes:
            flat.extend(item.passes if isinstance(item, Sequential) else [item])
        object.__setattr__(self, "passes", tuple(flat))

    def __iter__(self) -> Iterator[ModulePass]:
        return iter(self.passes)


def run(
    pipeline: ModulePass | Sequential,
    model: nn.Module,
    example_inputs: InputsLike | None,
    *,
    inplace: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    raise_on_mismatch: bool = True,
) -> Report:
    """Run ``pipeline`` on ``model`` and check each pass against the original outputs; return one report.

    With ``inplace=False`` the model is deep-copied first; ``report.model`` is the result. A
    failed check stops the run and raises :class:`VerificationError` carrying the report (with
    ``raise_on_mismatch``). ``example_inputs`` may be None only for passes that need no trace.
    """
    passes = tuple(pipeline) if isinstance(pipeline, Sequential) else (pipeline,)
    inputs = _refuse(passes, model, example_inputs)
    ctx = PassContext(model if inplace else copy_model(model), inputs)
    reports = []
    for one_pass in passes:
        ctx.next_pass()
        reports.append(_run_one(one_pass, ctx, atol, rtol))
        if not reports[-1].passed:
            break
    merged = merge_reports(reports)
    if raise_on_mismatch:
        raise_if_failed(merged, passes[len(reports) - 1].subject)
    return merged


def plan_only(pipeline: ModulePass | Sequential, model: nn.Module, example_inputs: InputsLike | None) -> Report | None:
    """The report :func:`run` would give if no pass had anything to change (the skips and notes; no check
    is needed), without changing ``model``; None when some pass would edit it (then run it on a copy).

    A caller that would otherwise copy the model first (export) pays for the copy only when it is used.
    """
    passes = tuple(pipeline) if isinstance(pipeline, Sequential) else (pipeline,)
    ctx = PassContext(model, _refuse(passes, model, example_inputs))
    reports = []
    for one_pass in passes:
        ctx.next_pass()
        report = Report(one_pass.report_name, model=model)
        for item in one_pass.plan(ctx):
            if not isinstance(item, Skip):
                return None
            report.skipped.append(item)
        one_pass.finish(ctx, report)
        reports.append(report)
    return merge_reports(reports)


def _refuse(passes: Sequence[ModulePass], model: nn.Module, example_inputs: Any) -> ExampleInputs | None:
    """Unusable inputs or wrappers, and a model in training mode where a pass needs eval mode (one error);
    the inputs as one value (None: none given, and no pass needs them)."""
    refuse_offloaded(model)
    inputs = None
    if example_inputs is not None or any(p.needs_flow for p in passes):
        inputs = refuse_unusable(model, example_inputs)  # the model's meta tensors too, then the inputs'
    else:
        meta = next((name for name, t in _tensor_names(model) if t is not None and t.is_meta), None)
        if meta is not None:
            raise PreconditionError(f"{meta} is on the meta device (a shape, no values): load the weights into "
                                    "memory first (e.g. load_state_dict(..., assign=True))")
    reasons = list(dict.fromkeys(p.eval_reason for p in passes if p.eval_reason))
    if model.training and reasons:
        raise PreconditionError(f"the model is in training mode, where {' and '.join(reasons)}; "
                                "call model.eval() first (CLI: --eval)")
    return inputs


def refuse_offloaded(model: nn.Module) -> None:
    """Refuse a model whose weights its modules do not hold: offloaded by accelerate's hooks (``device_map``
    with CPU/disk offload, ``cpu_offload``) or by compressed-tensors' offload cache.

    Passes edit a module's tensors in place; an offloaded module holds placeholders (meta tensors) or
    hands out a fresh copy at every access, so an edit would be lost, or nothing would be found to
    edit and the run would pass with 0 changes.
    """
    for path, module in model.named_modules():
        how = _offloaded_by(module)
        if how is not None:
            first = next((name for name, _ in _tensor_names(module, path)), path or "the model")
            raise PreconditionError(
                f"the model's weights are offloaded ({how} on {path or 'the model'}): {first} is not held in "
                "memory, so surgery would edit nothing or a copy; load the weights into memory first (e.g. "
                "from_pretrained without device_map/offload_folder, or remove the offload hooks after onloading)")


def _offloaded_by(module: nn.Module) -> str | None:
    """What offloads ``module``'s own tensors: an accelerate hook that offloads, or an offload cache; None."""
    if isinstance(module, torch.jit.ScriptModule):  # its own parameter wrapper; refused later as a wrapper
        return None
    if not isinstance(module._parameters, dict):  # compressed-tensors: an OffloadCache onloads per access
        return f"{type(module._parameters).__name__}, compressed-tensors offload"
    hook = getattr(module, "_hf_hook", None)
    for one in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):  # SequentialHook: several
        if getattr(one, "offload", False) or getattr(one, "weights_map", None) is not None:
            return f"accelerate {type(one).__name__}"
    return None


def _tensor_names(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.Tensor | None]]:
    """(dotted name, tensor) of every parameter and buffer under ``module``, from the containers' own items
    (an offload cache's values are not read: reading them would onload a copy)."""
    for path, sub in module.named_modules(prefix=prefix):
        for container in (sub._parameters, sub._buffers):
            plain = isinstance(container, dict)
            for name in list(container):
                yield (f"{path}.{name}" if path else name), (container[name] if plain else None)


def _run_one(one_pass: ModulePass, ctx: PassContext, atol: float | None, rtol: float | None) -> Report:
    report = Report(one_pass.report_name, model=ctx.model)
    applied = False
    for item in one_pass.plan(ctx):
        if isinstance(item, Skip):
            report.skipped.append(item)
            continue
        ctx.reference  # noqa: B018  (the original outputs, taken before the run's first edit)
        report.changes.extend(one_pass.apply(ctx, item))
        applied = True
    checked = applied or one_pass.check_if_unchanged
    if checked:
        ctx.reference  # noqa: B018  (before finish, which may still change the model)
    one_pass.finish(ctx, report)
    ctx.edited = ctx.edited or applied or bool(report.changes)
    checks = _checks(one_pass, ctx, report, atol, rtol) if checked else []
    if checks:
        report.checks = checks
    return report


def _checks(one_pass: ModulePass, ctx: PassContext, report: Report, atol: float | None,
            rtol: float | None) -> list[Check]:
    if ctx.example_inputs is None:
        check = one_pass.check_without_inputs(ctx, atol, rtol)
        return [] if check is None else [check]
    outputs = _outputs_now(one_pass, ctx, report)
    if ctx.decisions:  # the outputs pass through data-dependent ops (NMS, topk, thresholds): discrete_ops.py
        checks, notes = judge(ctx.decisions, ctx.model, ctx.example_inputs, ctx.reference, outputs,
                              lambda: one_pass.outputs(ctx, report), label=one_pass.check_label, atol=atol,
                              rtol=rtol, rounding_noise_ok=one_pass.rounding_noise_ok)
        report.notes.extend(notes)
        return checks
    check = compare_outputs(ctx.reference, outputs, atol=atol, rtol=rtol, label=one_pass.check_label)
    if not check.passed and atol is None and rtol is None:  # tolerances the user gave are kept
        check = one_pass.review(ctx, report, outputs, check)
    return [check]


def _outputs_now(one_pass: ModulePass, ctx: PassContext, report: Report) -> Any:
    """The model's outputs for a pass's check: run it, unless no pass changed it since the last check took them
    (or since the original's were taken): a fold pipeline's passes with nothing to do (no BatchNorm in an LLM,
    no LayerNorm in a CNN) then cost no forward pass."""
    if ctx.edited:
        ctx.checked_outputs = one_pass.outputs(ctx, report)
    elif ctx.checked_outputs is None:
        ctx.checked_outputs = ctx.reference
    ctx.edited = False
    return ctx.checked_outputs


def merge_reports(reports: Sequence[Report]) -> Report:
    """One report for a sequence of passes: the first one's name and model, everything else in order."""
    return functools.reduce(Report.merge, reports)


def raise_if_failed(report: Report, subject: str) -> None:
    """The one place a failed check raises (``subject`` names the result); the error carries the report."""
    failed: Check | None = next((c for c in report.checks if not c.passed), None)
    if failed is not None:
        error = mismatch_error(failed, subject)
        error.report = report  # type: ignore[attr-defined]
        raise error
