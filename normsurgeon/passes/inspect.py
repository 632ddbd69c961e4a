"""One row per norm layer: what it is, where it sits, what normsurgeon can do with it, and hazards.

Nothing is changed: a model with layers in training mode is traced on a copy (a train-mode BatchNorm
would update its running statistics). What can be done comes from the passes' own planning — the
BatchNorm fold plan of :mod:`.fold_batchnorm` (after the branch merges of :mod:`.reparameterize`, which
``fold`` runs first), the affine fold plan of :mod:`.fold_norm_affine`, the
conversion rules of :mod:`.convert_rules` and the residual-stream check of :mod:`.convert_centring` —
so inspect never promises what a pass would refuse.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..dataflow import Refusal
from ..inputs import InputsLike
from ..pipeline import Edit, PassContext
from ..placement import Where, place_norms
from ..recognize import BATCHNORM_FAMILY, NormInfo, NormKind, Recognition, recognize_norms
from ..report import Report
from ..surgery import copy_model, shared_parameter_ids
from ..trace import Trace, trace
from ..weight_standardization import StandardizedConv
from .convert_centring import plan_centring
from .convert_rules import find_rule
from .fold_batchnorm import plan_batchnorm_fold
from .fold_norm_affine import plan_affine_fold
from .param_groups import find_scale_invariant
from .reparameterize import FormReader, plan_sites


@dataclass
class NormRow:
    """Everything inspect says about one norm layer (JSON-ready)."""

    path: str
    cls: str
    kind: str
    native: bool
    eps: float
    normalized: str
    normalized_shape: list[int]
    groups: int | None
    affine: str
    training: bool
    placement: str
    neighbours: str
    input_shape: list[int]
    calls: int
    evidence: str
    can: list[str] = field(default_factory=list)
    cannot: list[str] = field(default_factory=list)
    hazards: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class InspectReport(Report):
    """A :class:`Report` with one :class:`NormRow` per norm and the rejected look-alikes."""

    norms: list[NormRow] = field(default_factory=list)
    unrecognized: list[dict[str, str]] = field(default_factory=list)
    weight_standardized: list[dict[str, str]] = field(default_factory=list)  # convs that standardize their weight

    def to_dict(self) -> dict[str, Any]:
        standardized = {"weight_standardized": list(self.weight_standardized)} if self.weight_standardized else {}
        return {**super().to_dict(), "norms": [row.to_dict() for row in self.norms],
                "unrecognized": list(self.unrecognized), **standardized}


def inspect_norms(model: nn.Module, example_inputs: InputsLike) -> InspectReport:
    """Describe every norm layer of ``model`` as it runs on ``example_inputs``; changes nothing."""
    training = {path for path, m in model.named_modules() if m.training}
    if training:  # trace an eval-mode copy: a train-mode BatchNorm would update its statistics (or
        model = copy_model(model).eval()  # fail on one value per channel); the dataflow is the same
    flow = trace(model, example_inputs)
    recognition = recognize_norms(model, flow)
    report = InspectReport("inspect")
    channel = {i.module for i in recognition.norms if i.kind.spec.channel_dim_1}
    where = place_norms(flow, [i.module for i in recognition.norms], channel_norms=channel)
    shared = shared_parameter_ids(model)
    exact_rms = _exact_rmsnorm(flow, recognition, where, shared, model, example_inputs)
    invariant = find_scale_invariant(model, flow)
    merged = merged_norms(model, flow)
    for info in recognition.norms:
        row = _row(info, where[info.module], info.path in training)
        if info.module in merged:
            row.can.append(merged[info.module])
        else:
            _fold_options(flow, info, shared, row)
        _convert_options(info, exact_rms, row)
        row.hazards.extend(hazards(info, training=row.training))
        if row.training:  # weight decay is a training matter: no hazard for a model being deployed
            row.hazards.extend(_decay_hazards(info, invariant))
        report.norms.append(row)
    report.unrecognized = [{"path": u.path, "class": u.class_name, "reason": u.detail} for u in recognition.unrecognized]
    report.weight_standardized = [_standardized(path, conv) for path, conv in recognition.weight_standardized]
    _summarize(report)
    return report


def _row(info: NormInfo, where: Where, training: bool) -> NormRow:
    return NormRow(
        path=info.path, cls=type(info.module).__name__, kind=info.kind.cli_name, native=info.native,
        eps=info.eps, normalized=info.describe_normalized(), normalized_shape=list(info.normalized_shape),
        groups=info.groups, affine=info.affine, training=training, placement=where.placement.value,
        neighbours=where.detail, input_shape=list(info.input_shape), calls=info.calls, evidence=info.evidence,
    )


def _standardized(path: str, found: StandardizedConv) -> dict[str, str]:
    """A weight-standardized conv: what it is, and whether a plain conv can take its place."""
    bake = (f"cannot be baked: {found.why_not}" if found.why_not else
            f"bake into a plain {found.conv_type.__name__} (exact): normsurgeon.bake_weight_standardization")
    return {"path": path, "class": type(found.module).__name__, "what": found.describe(), "bake": bake}


# ------------------------------------------------------------------------------- what can be done


def merged_norms(model: nn.Module, flow: Trace) -> dict[nn.Module, str]:
    """BatchNorm module -> how ``fold``'s reparameterize step merges it away with its branch (from the pass's plan)."""
    ctx = PassContext(model, None).knowing(flow=flow)  # plan on the trace inspect already has
    merged = {}
    for site, planned in plan_sites(ctx, FormReader(flow)):
        if isinstance(planned, Edit):
            for norm in site.norms:
                merged[norm] = (f"merged with its branch into one conv at {planned.path} (fold reparameterizes "
                                f"first: {planned.plan.detail}): normsurgeon fold")
    return merged


def _fold_options(flow: Trace, info: NormInfo, shared: set[int], row: NormRow) -> None:
    if info.kind in BATCHNORM_FAMILY:
        try:
            plan = plan_batchnorm_fold(flow, info.module, shared)
        except Refusal as refusal:
            row.cannot.append(f"fold: {refusal.reason.value}" + (f": {refusal.detail}" if refusal.detail else ""))
            return
        side = "producer" if plan.into_producer else "consumer"
        targets = ", ".join(flow.module_paths[t] for t in plan.targets)
        row.can.append(f"fold into {targets} (its {side}): normsurgeon fold")
    elif info.kind in (NormKind.LAYERNORM, NormKind.RMSNORM):
        try:
            consumers = plan_affine_fold(flow, info, shared)
        except Refusal as refusal:
            row.cannot.append(f"fold affine: {refusal.reason.value}" + (f": {refusal.detail}" if refusal.detail else ""))
            return
        targets = ", ".join(flow.module_paths[m] for m in consumers)
        row.can.append(f"fold affine into {targets}: normsurgeon fold --affine")


def _convert_options(info: NormInfo, exact_rms: dict[nn.Module, str], row: NormRow) -> None:
    targets: list[NormKind | None] = [None, *NormKind]
    for target in targets:
        if info.kind is NormKind.LAYERNORM and target is NormKind.RMSNORM and info.module in exact_rms:
            why = exact_rms[info.module]
            if not why:
                row.can.append("convert to rmsnorm exactly, by centring the residual stream (--to rmsnorm)")
                continue
            row.cannot.append(f"exact rmsnorm: {why}")
        rule = find_rule(info, target)
        if rule is None:
            continue
        name = "native" if target is None else target.cli_name
        try:
            built = rule.build(info)
            why_inexact = rule.inexact(info)
        except Refusal as refusal:
            row.cannot.append(f"convert to {name}: {refusal.detail or refusal.reason.value}")
            continue
        into = f"{type(built).__name__}"
        if why_inexact:
            row.can.append(f"convert to {name} ({into}) approximately, for fine-tuning (--to {name} --approximate): {why_inexact}")
        else:
            row.can.append(f"convert to {name} ({into}) exactly (--to {name})")


def _exact_rmsnorm(flow: Trace, recognition: Recognition, where: dict[nn.Module, Where], shared: set[int],
                   model: nn.Module, example_inputs: InputsLike) -> dict[nn.Module, str]:
    """LayerNorm module -> '' when LN->RMSNorm is exact by centring, else why not."""
    lns = [i for i in recognition.norms if i.kind is NormKind.LAYERNORM]
    if not lns:
        return {}
    try:
        plan = plan_centring(flow, recognition, lns, where, shared, model=model, inputs=example_inputs)
    except Refusal as refusal:
        return {i.module: f"the residual stream cannot be centred: {refusal.detail}" for i in lns}
    result = {i.module: "" for i in plan.norms}
    result.update({i.module: detail for i, _, detail in plan.left_out})
    result.update({i.module: f"the residual stream cannot be centred: {why.detail}"
                   for infos, why in plan.refused for i in infos})
    return result


# ------------------------------------------------------------------------------- hazards


def hazards(info: NormInfo, *, training: bool) -> list[str]:
    """What may go wrong with this norm at test time or when folding it (``training``: its mode)."""
    found = []
    module = info.module
    if info.kind in BATCHNORM_FAMILY and training and info.kind is not NormKind.FROZEN_BATCHNORM:
        per_channel = _values_per_channel(info.input_shape)
        found.append("in training mode: it normalizes with batch statistics, so at batch size 1 σ = 0 "
                     "(or torch refuses one value per channel)"
                     + (" — as on these inputs, one value per channel" if per_channel == 1 else "")
                     + ": call .eval() for inference")
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats and not training:
        found.append("InstanceNorm with track_running_stats uses running statistics in eval mode, not each sample's")
    if info.kind in BATCHNORM_FAMILY:
        found.extend(_stat_hazards(info))
    return found


def _values_per_channel(shape: tuple[int, ...]) -> int | None:
    if len(shape) < 2:
        return None
    count = shape[0]
    for d in shape[2:]:
        count *= d
    return count


def _stat_hazards(info: NormInfo) -> list[str]:
    module = info.module
    mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
        return []
    found = []
    if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
        found.append("running statistics contain NaN or inf: recalibrate (normsurgeon recalibrate)")
        return found
    tiny = var <= max(info.eps, 1e-12)
    if bool(tiny.any()):
        found.append(f"running_var ≈ 0 in {int(tiny.sum())} of {var.numel()} channels (min {var.min().item():.2g}): "
                     f"those channels are scaled by up to 1/sqrt(eps) = {(1 / info.eps ** 0.5):.3g}")
    tracked = getattr(module, "num_batches_tracked", None)
    if isinstance(tracked, torch.Tensor) and int(tracked) == 0:
        default = bool((mean == 0).all() and (var == 1).all())
        found.append("running statistics were never updated (num_batches_tracked = 0"
                     + (", mean 0, var 1" if default else "") + "): recalibrate before folding or deploying")
    return found


def _decay_hazards(info: NormInfo, invariant: dict[str, str]) -> list[str]:
    layers = [path for path, norms in invariant.items() if f"{info.path} (" in norms]
    if not layers:
        return []
    return [f"the weight of {', '.join(layers)} is scale-invariant (its output goes straight into this norm): "
            "weight decay on it only raises the effective learning rate; exempt it with "
            "normsurgeon.param_groups(model, weight_decay, example_inputs=..., exempt_scale_invariant=True)"]


def _summarize(report: InspectReport) -> None:
    kinds: dict[str, int] = {}
    for row in report.norms:
        kinds[row.kind] = kinds.get(row.kind, 0) + 1
    report.facts["norms"] = len(report.norms)
    report.facts["kinds"] = ", ".join(f"{k} x{n}" for k, n in kinds.items()) or "none"
    report.facts["with hazards"] = sum(1 for row in report.norms if row.hazards)
    if report.unrecognized:
        report.facts["look-alikes not recognised"] = len(report.unrecognized)
    if report.weight_standardized:
        _note_weight_standardized(report)


def _note_weight_standardized(report: InspectReport) -> None:
    """The convs that standardize their weight: counted, with what baking them does (a note the CLI prints)."""
    rows = report.weight_standardized
    bakeable = [row for row in rows if row["bake"].startswith("bake")]
    classes = ", ".join(sorted({row["class"] for row in rows}))
    report.facts["weight-standardized convs"] = len(rows)
    note = (f"{len(rows)} conv(s) ({classes}) standardize their weight at every forward (weight standardization, "
            "not a norm of activations)")
    if bakeable:
        note += f"; normsurgeon.bake_weight_standardization bakes {len(bakeable)} into plain convs, exactly"
    refused = [row for row in rows if row not in bakeable]
    if refused:
        why = refused[0]["bake"].removeprefix("cannot be baked: ")
        note += f"; {len(refused)} cannot ({refused[0]['path']}: {why})"
    report.notes.append(note)
