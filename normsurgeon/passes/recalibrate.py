"""Recompute BatchNorm running statistics from user data.

After weight averaging (SWA, model soups), pruning, quantization-aware edits, or a checkpoint
whose stats were never updated, BN's running mean/var no longer describe the activations it
sees, and eval-mode outputs are wrong. Recalibration resets every BN's stats and re-estimates
them from the user's batches: the exact mean and (unbiased) variance of every sample each BN
received, pooled over all batches in float64 (:class:`_PooledStats`). torch's cumulative average
(``momentum=None``, what ``update_bn`` uses) averages per-batch statistics instead: it weights a
small last batch like a full one and leaves out the spread between batch means, so data sorted
by class or by source gets too small a variance.

Unlike ``torch.optim.swa_utils.update_bn``: only the BN layers go to train mode (dropout and the
rest stay in eval), it runs under ``no_grad``, takes dict batches, restores every module's mode
afterwards, and restores the old statistics if anything fails. The
report's check compares outputs before and after on a held-out batch; it is informational
(recalibration is meant to change outputs) and passes when the new outputs are finite.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..check import compare_outputs, flatten_outputs
from ..errors import PreconditionError, UsageError, VerificationError, first_line
from ..io.data import Batch, Batches, check_fits, describe_shapes, load_batches, to_model
from ..modules import MeanOnlyBatchNorm
from ..report import Action, Change, Check, Report, Skip, SkipReason
from ..surgery import eval_mode, preserved_modes
from ..trace import call_model

_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def recalibrate(
    model: nn.Module,
    data: Any,
    *,
    batches: int | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    trust_pickle: bool = False,
) -> Report:
    """Reset and re-estimate the running stats of every BatchNorm in ``model`` from ``data``.

    ``data`` is a tensor/tuple/dict/list of batches, or a path to a ``.pt``/``.npz`` file or a
    folder of them (see :mod:`normsurgeon.io.data`). ``batches`` caps how many batches are used;
    ``batch_size`` re-batches the data first. Edits ``model`` in place; ``report.model`` is it.
    """
    if batches is not None and batches < 1:
        raise UsageError(f"batches={batches}: must be at least 1")
    loaded = data if isinstance(data, Batches) else load_batches(data, trust_pickle=trust_pickle, batch_size=batch_size)
    report = Report("recalibrate", model=model)
    report.notes.extend([loaded.description, *loaded.notes])
    norms = _calibratable(model, report)
    calibration, held_out = _split(loaded.batches, batches, report)
    calibration = [to_model(b, model) for b in calibration]
    held_out = to_model(held_out, model)
    with eval_mode(model):
        check_fits(model, calibration[0], what="calibration data")
        before = check_fits(model, held_out, what="held-out batch")
    old = {path: _snapshot(bn) for path, bn in norms}
    try:  # on any failure the old statistics come back
        _accumulate(model, [bn for _, bn in norms], calibration, progress=progress)
        with eval_mode(model), torch.no_grad():
            after = call_model(model, held_out)
        report.check = _informational_check(before, after)
        _require_finite(report.check, norms)
    except BaseException:
        for path, bn in norms:
            _restore(bn, old[path])
        raise
    for path, bn in norms:
        _record(path, bn, old[path], report)
    report.facts.update({"batches": len(calibration), "layers": len(report.changed(Action.RECALIBRATED)),
                         "held-out batch": describe_shapes(held_out)})
    return report


def calibratable(module: nn.Module) -> bool:
    """True for BatchNorm layers that keep running statistics (and mean-only BatchNorm)."""
    if isinstance(module, MeanOnlyBatchNorm):
        return True
    return isinstance(module, _BatchNorm) and module.track_running_stats and module.running_mean is not None


def _calibratable(model: nn.Module, report: Report) -> list[tuple[str, nn.Module]]:
    norms = []
    for path, module in model.named_modules():
        if calibratable(module):
            norms.append((path, module))
        elif isinstance(module, _BatchNorm):
            report.skipped.append(Skip(path, SkipReason.NO_RUNNING_STATS, "nothing to recalibrate"))
    if not norms:
        raise PreconditionError(
            "the model has no BatchNorm layer with running statistics, so there is nothing to "
            "recalibrate; check that this is the model you meant"
        )
    return norms


def _split(batches: list[Batch], limit: int | None, report: Report) -> tuple[list[Batch], Batch]:
    """Calibration batches and a held-out batch for the (informational) before/after check."""
    count = len(batches)
    if limit is not None and limit < count:
        return batches[:limit], batches[limit]
    if limit is None and count >= 2:
        report.notes.append(f"calibrated on {count - 1} batches; the last batch is held out for the check")
        return batches[:-1], batches[-1]
    report.notes.append("no batch left over for the check: it reuses the last calibration batch")
    return batches, batches[-1]


def _snapshot(bn: nn.Module) -> dict[str, torch.Tensor]:
    return {name: getattr(bn, name).detach().clone() for name in _STAT_BUFFERS if getattr(bn, name, None) is not None}


def _restore(bn: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in saved.items():
            getattr(bn, name).copy_(value)


class _PooledStats:
    """A forward pre-hook that pools one BN's input statistics over every batch (Chan et al.'s merge).

    Per batch, torch's ``var_mean`` (Welford, in the input's dtype, no float64 copy of the
    activation); across batches, count-weighted in float64.
    """

    def __init__(self, channels: int, device: torch.device) -> None:
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(channels, dtype=torch.float64, device=device)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        dims = [0, *range(2, x.dim())]
        n = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        delta = mean.double() - self.mean
        total = self.count + n
        self.mean += delta * (n / total)
        self.m2 += var.double() * n + delta.square() * (self.count * n / total)
        self.count = total

    def write(self, bn: nn.Module) -> None:
        """Set ``bn``'s running statistics to the pooled ones (torch keeps the unbiased variance)."""
        with torch.no_grad():
            bn.running_mean.copy_(self.mean)
            if getattr(bn, "running_var", None) is not None:
                bn.running_var.copy_(self.m2 / max(self.count - 1, 1))


def _accumulate(model: nn.Module, norms: list[nn.Module], calibration: list[Batch], *, progress: bool) -> None:
    """BN layers (only) in train mode, one no-grad forward per batch; then each BN gets its pooled statistics.

    The pooled statistics replace whatever the BN's own running update made of the batches, so its
    momentum is left as it is.
    """
    pools = [_PooledStats(bn.running_mean.numel(), bn.running_mean.device) for bn in norms]
    handles = [bn.register_forward_pre_hook(pool) for bn, pool in zip(norms, pools)]
    with preserved_modes(model):
        model.eval()
        for bn in norms:
            bn.reset_running_stats()
            bn.train()
            for part in bn.children():  # a BatchNorm with its drop and act inside (timm BatchNormAct2d):
                part.eval()  # only the norm uses batch statistics; its dropout stays off, as at test time
        try:
            with torch.no_grad():
                for index, batch in _progress(calibration, progress):
                    _forward(model, batch, index)
        finally:
            for handle in handles:
                handle.remove()
    for bn, pool in zip(norms, pools):
        if pool.count:
            pool.write(bn)


def _forward(model: nn.Module, batch: Batch, index: int) -> None:
    try:
        call_model(model, batch)
    except Exception as exc:
        hint = ("; use batches of at least 2 samples (--batch-size)"
                if "more than 1 value per channel" in str(exc) else "; check the data")
        raise PreconditionError(
            f"the model failed on calibration batch {index} of shape {describe_shapes(batch)} in "
            f"BatchNorm train mode ({first_line(exc, named=True)}){hint}"
        ) from exc


def _progress(batches: list[Batch], show: bool) -> Iterable[tuple[int, Batch]]:
    if not show:
        yield from enumerate(batches)
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("recalibrating BatchNorm", total=len(batches))
        for index, batch in enumerate(batches):
            yield index, batch
            bar.advance(task)


def _record(path: str, bn: nn.Module, old: dict[str, torch.Tensor], report: Report) -> None:
    if int(bn.num_batches_tracked) == 0:  # never called: keep what it had rather than 0/1
        _restore(bn, old)
        report.skipped.append(Skip(path, SkipReason.NOT_CALLED, "not reached by the data; statistics kept"))
        return
    d_mean = (bn.running_mean.double() - old["running_mean"].double()).abs().mean().item()
    detail = f"mean |Δmean| {d_mean:.4g}"
    if "running_var" in old:
        d_var = (bn.running_var.double() - old["running_var"].double()).abs().mean().item()
        detail += f", mean |Δvar| {d_var:.4g}"
    detail += f", from {int(bn.num_batches_tracked)} batches"
    report.changes.append(Change(Action.RECALIBRATED, path, None, detail))


def _informational_check(before: Any, after: Any) -> Check:
    """Before/after comparison that passes when the new outputs are finite (it is meant to differ)."""
    check = compare_outputs(before, after, atol=float("inf"), rtol=0.0,
                            label="after vs before recalibration, held-out batch (informational: "
                                  "outputs are meant to change; it fails only on NaN/inf)")
    finite = {name: bool(torch.isfinite(t).all()) if t.is_floating_point() else True
              for name, t in flatten_outputs(after)}
    outputs = tuple(
        dataclasses.replace(o, passed=finite.get(o.name, False),
                            detail="" if finite.get(o.name, False) else "NaN/inf after recalibration")
        for o in check.outputs
    )
    return dataclasses.replace(check, outputs=outputs, informational=True)


def _require_finite(check: Check, norms: list[tuple[str, nn.Module]]) -> None:
    bad = [path for path, bn in norms
           if not all(torch.isfinite(getattr(bn, n)).all() for n in ("running_mean", "running_var") if getattr(bn, n, None) is not None)]
    if bad or not check.passed:
        where = f"running stats of {', '.join(bad[:4])}" if bad else "the outputs on the held-out batch"
        raise VerificationError(
            f"after recalibration {where} contain NaN/inf; check the data for NaN/inf or extreme values"
        )
