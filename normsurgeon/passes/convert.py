"""Convert norm layers from one kind to another: exactly where the maths allows, approximately on request.

The norms are recognised by behaviour (:mod:`normsurgeon.recognize`), the conversions are the rules
of :mod:`.convert_rules` plus LayerNorm -> RMSNorm by centring the residual stream
(:mod:`.convert_centring`). Exact conversions are applied first and checked against the original
outputs (a mismatch raises :class:`VerificationError`). Approximate conversions (BatchNorm ->
GroupNorm for small-batch fine-tuning, RMSNorm <-> LayerNorm on un-centred inputs) need
``approximate=True``; without it nothing is changed and a :class:`UsageError` says what the difference
would be. With it, their measured difference is a second, informational check and a warning that the
model needs fine-tuning.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..check import compare_outputs, require_tensor_outputs
from ..dataflow import Refusal
from ..errors import PreconditionError, UsageError
from ..inputs import InputsLike
from ..pipeline import raise_if_failed
from ..placement import place_norms
from ..recognize import NormInfo, NormKind, Recognition, recognize_norms
from ..report import Action, Change, LeftOut, Report, Skip, SkipReason
from ..surgery import copy_model, hooks_lost_by_replacing, replace_module, shared_parameter_ids
from ..trace import Trace, call_model, trace
from .convert_centring import CentringPlan, apply_centring, plan_centring
from .convert_rules import Rule, described, find_rule

NATIVE = "native"
Target = NormKind | Literal["native"]


@dataclass
class _Item:
    """One planned module-for-module conversion."""

    info: NormInfo
    rule: Rule
    why_inexact: str


def parse_target(name: str | NormKind) -> NormKind | None:
    """``native`` -> None (each hand-written norm to torch's own layer), else a :class:`NormKind`."""
    if isinstance(name, NormKind):
        return name
    if name.strip().lower() == NATIVE:
        return None
    return NormKind.parse(name, option="--to kind", extra=(NATIVE,))


def convert_norms(
    model: nn.Module,
    example_inputs: InputsLike,
    *,
    to: Target | str,
    from_: NormKind | str | None = None,
    only: str | None = None,
    approximate: bool = False,
    untie: bool = False,
    inplace: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
) -> Report:
    """Convert the model's norms to ``to`` (a kind, or ``"native"``); return the report.

    ``from_`` limits the conversion to norms of one kind, ``only`` to paths matching a glob pattern
    (comma-separated patterns allowed). Exact conversions are checked; approximate ones need
    ``approximate=True`` (else :class:`UsageError` with the difference they would make). ``untie``:
    LayerNorm -> RMSNorm may give a layer that writes to the residual stream its own copy of a tied
    weight (an input embedding tied to the LM head), so that it can be centred alone.
    """
    target = parse_target(to)
    source_kind = NormKind.parse(from_, option="--from kind") if isinstance(from_, str) else from_
    if model.training:
        raise PreconditionError("the model is in training mode (BatchNorm uses batch statistics, dropout is random); "
                                "call model.eval() first (CLI: --eval)")
    if not inplace:
        model = copy_model(model)
    label = target.cli_name if target is not None else NATIVE
    report = Report("convert", model=model, facts={"to": label})
    flow = trace(model, example_inputs)
    require_tensor_outputs(flow.outputs)
    recognition = recognize_norms(model, flow)
    selected = _select(recognition, source_kind, only, report)
    shared = shared_parameter_ids(model)
    centring, rest, why_not_centred = _plan_centring(model, example_inputs, flow, recognition, selected, target, shared,
                                                     report, untie)
    items = _plan_items(rest, target, report, why_not_centred)
    inexact = [item for item in items if item.why_inexact]
    if inexact and not approximate:
        raise _approximate_required(model, example_inputs, inexact, to=to, from_=from_, only=only, untie=untie)
    if centring is not None:
        _apply_centring(model, flow, centring, report)
    for item in items:
        if not item.why_inexact:
            _replace(model, item, report)
    if report.changes or not inexact:  # no table of "exact conversions" when there were none
        report.checks.append(_exact_check(flow, model, example_inputs, atol, rtol))
        raise_if_failed(report, "the converted model")
    if inexact:
        for item in inexact:
            _replace(model, item, report)
        report.checks.append(_approximate_check(flow, model, example_inputs, report))
    return report


# ------------------------------------------------------------------------------- planning


def _select(recognition: Recognition, kind: NormKind | None, only: str | None, report: Report) -> list[NormInfo]:
    patterns = [p.strip() for p in only.split(",") if p.strip()] if only else []

    def wanted(path: str) -> bool:
        return not patterns or any(fnmatch.fnmatchcase(path, p) for p in patterns)

    for item in recognition.unrecognized:
        if wanted(item.path):
            report.skipped.append(Skip(item.path, SkipReason.NOT_A_NORM, item.detail))
    chosen = [i for i in recognition.norms if wanted(i.path) and (kind is None or i.kind is kind)]
    if not chosen and not report.skipped:
        found = ", ".join(sorted({i.kind.cli_name for i in recognition.norms})) or "none"
        what = f"{kind.cli_name} norms" if kind else "norms"
        raise UsageError(f"no {what}{' matching ' + repr(only) if only else ''} in the model (kinds found: {found})")
    return chosen


def _plan_centring(model: nn.Module, example_inputs: InputsLike, flow: Trace, recognition: Recognition,
                   selected: list[NormInfo], target: NormKind | None, shared: set[int], report: Report,
                   untie: bool) -> tuple[CentringPlan | None, list[NormInfo], dict[int, str]]:
    """LayerNorm -> RMSNorm by centring, for the LNs where the structure allows; the rest go on,
    with why centring does not make them exact (by ``id`` of their NormInfo)."""
    lns = [i for i in selected if i.kind is NormKind.LAYERNORM] if target is NormKind.RMSNORM else []
    if not lns:
        return None, selected, {}
    where = place_norms(flow, [i.module for i in recognition.norms])
    plan = plan_centring(flow, recognition, lns, where, shared, untie=untie, model=model, inputs=example_inputs)
    why_not = {}
    for infos, refusal in plan.refused:
        why = f"the residual stream cannot be centred: {refusal.detail}"
        report.notes.append(f"LayerNorm -> RMSNorm cannot be exact by centring the residual stream read by "
                            f"{_names(infos)}: {refusal.detail}")
        report.left_out.extend(LeftOut(i.path, refusal.reason, why) for i in infos)
        why_not.update((id(i), why) for i in infos)
    for info, reason, detail in plan.left_out:
        report.notes.append(f"{info.path}: not converted exactly: {detail}")
        report.left_out.append(LeftOut(info.path, reason, detail))
        why_not[id(info)] = detail
    converted = {id(i) for i in plan.norms}
    if not converted:
        return None, selected, why_not
    return plan, [i for i in selected if id(i) not in converted], why_not


def _names(infos: list[NormInfo]) -> str:
    more = f" and {len(infos) - 3} more" if len(infos) > 3 else ""
    return ", ".join(i.path for i in infos[:3]) + more


def _plan_items(infos: list[NormInfo], target: NormKind | None, report: Report,
                why_not_centred: dict[int, str]) -> list[_Item]:
    items = []
    for info in infos:
        if info.native and (target is None or info.kind is target):
            continue  # already what was asked for
        hooked = hooks_lost_by_replacing(info.module)
        if hooked:
            report.skipped.append(Skip(info.path, SkipReason.HOOKED, hooked))
            continue
        rule = find_rule(info, target)
        if rule is None:
            wanted = target.spec.title if target is not None else "a torch layer"
            report.skipped.append(Skip(info.path, SkipReason.NO_CONVERSION, f"{info.kind.spec.title} -> {wanted}"))
            continue
        try:
            why = rule.inexact(info)
        except Refusal as refusal:
            report.skipped.append(refusal.skip(info.path))
            continue
        if why and id(info) in why_not_centred:
            why = f"{why_not_centred[id(info)]}, and {why}"
        items.append(_Item(info, rule, why))
    return items


def _approximate_required(model: nn.Module, example_inputs: InputsLike, inexact: list[_Item], **options) -> UsageError:
    """The error for an approximate conversion without ``approximate``, with the difference it would make."""
    trial = convert_norms(copy_model(model), example_inputs, approximate=True, **options)
    check = trial.checks[-1]
    names = _names([item.info for item in inexact])
    first = inexact[0]
    return UsageError(
        f"{first.info.kind.spec.title} -> {first.rule.target.spec.title} is not exact for {names}: {first.why_inexact}; "
        f"on the example inputs the outputs would differ by up to {check.max_abs_diff:.3g} "
        f"(relative {check.max_rel_diff:.3g}); pass --approximate to convert anyway (the model then needs fine-tuning)"
    )


# ------------------------------------------------------------------------------- applying


def _apply_centring(model: nn.Module, flow: Trace, plan: CentringPlan, report: Report) -> None:
    outcome = apply_centring(model, flow, plan)
    report.changes.extend(outcome.changes)
    report.notes.extend(outcome.notes)
    for info, new, detail in outcome.norms:
        if new is None:
            report.skipped.append(Skip(info.path, SkipReason.NO_FOLDABLE_NEIGHBOUR, detail))
            continue
        new.train(info.module.training)
        replace_module(model, info.module, new)
        report.changes.append(Change(Action.CONVERTED, info.path, described(new), detail))


def _replace(model: nn.Module, item: _Item, report: Report) -> None:
    try:
        new = item.rule.build(item.info)
    except Refusal as refusal:
        report.skipped.append(refusal.skip(item.info.path))
        return
    new.train(item.info.module.training)
    replace_module(model, item.info.module, new)
    _note_rounding(item, report)
    detail = f"approximate: {item.why_inexact}" if item.why_inexact else "exact"
    report.changes.append(Change(Action.CONVERTED, item.info.path, described(new),
                                 f"{item.info.kind.spec.title} -> {described(new)}, {detail}"))


def _note_rounding(item: _Item, report: Report) -> None:
    """Half-precision hand-written RMSNorms (Llama) round before the weight multiply; torch's rounds once."""
    weight = item.info.weight
    note = ("hand-written RMSNorms in fp16/bf16 (Llama/T5 style: computed in float32, cast back, then "
            "multiplied by the weight) round twice, nn.RMSNorm once: expect differences of about 1 ulp")
    if (item.info.kind is NormKind.RMSNORM and item.rule.native_only and weight is not None
            and weight.dtype in (torch.float16, torch.bfloat16) and note not in report.notes):
        report.notes.append(note)


def _exact_check(flow: Trace, model: nn.Module, example_inputs: InputsLike, atol: float | None, rtol: float | None):
    with torch.no_grad():
        outputs = call_model(model, example_inputs)
    return compare_outputs(flow.outputs, outputs, atol=atol, rtol=rtol, label="exact conversions vs original")


def _approximate_check(flow: Trace, model: nn.Module, example_inputs: InputsLike, report: Report):
    with torch.no_grad():
        outputs = call_model(model, example_inputs)
    check = dataclasses.replace(compare_outputs(flow.outputs, outputs, atol=float("inf"), rtol=0.0,
                                                label="after approximate conversions vs original"),
                                informational=True)
    report.facts["approximate"] = True
    report.facts["needs_fine_tuning"] = True
    report.notes.append(
        f"warning: approximate conversions change the outputs by up to {check.max_abs_diff:.3g} "
        f"(relative {check.max_rel_diff:.3g}, min cosine {check.min_cosine:.4f}); the model needs fine-tuning"
    )
    return check
