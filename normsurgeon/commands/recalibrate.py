"""``normsurgeon recalibrate``: recompute BatchNorm running statistics from user data."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..cli_options import emit, handle_errors, model_options, output_options, weights_option
from ..io.loading import load_model
from ..errors import UsageError


@click.command(short_help="Recompute BatchNorm running statistics from data.")
@model_options
@weights_option
@output_options(default="MODEL.recalibrated.pt beside MODEL")
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path), metavar="FILE|DIR",
              help="Calibration batches: a .pt (tensor, tuple, list of batches, dict) or .npz file, or a folder of them.")
@click.option("--batches", type=click.IntRange(min=1), metavar="N",
              help="Use at most N batches (default: all but one, held out for the check).")
@click.option("--batch-size", type=click.IntRange(min=1), metavar="B",
              help="Re-batch the data into batches of B samples first.")
@handle_errors
def recalibrate(model_path: Path, factory: str | None, import_paths: tuple[Path, ...], trust_pickle: bool,
                weights: Path | None,
                output: Path | None, force: bool, as_json: bool, verbose: bool, data_path: Path,
                batches: int | None, batch_size: int | None) -> None:
    """Reset and re-estimate every BatchNorm's running mean/var from --data.

    Each BatchNorm gets the exact mean and variance of every sample it received, pooled over
    all batches (not the training momentum, nor an average of per-batch statistics), with only
    the BatchNorm layers in train mode. The check compares outputs before and after on a
    held-out batch: informational (recalibration changes outputs on purpose), it fails only
    when the new outputs are not finite. Writes MODEL.recalibrated.pt in MODEL's own form.

    \b
    Example:
      normsurgeon recalibrate averaged.pt --data calib.pt --batch-size 64
    """
    from ..io.saving import (
        check_output_path,
        default_output_path,
        files_read,
        save_module,
        save_state_dict,
    )
    from ..passes.recalibrate import recalibrate as run_recalibration

    loaded = load_model(model_path, factory=factory, trust_pickle=trust_pickle, import_paths=import_paths,
                        weights=weights)
    if loaded.form == "exported_program":
        raise UsageError(f"{model_path}: a .pt2 ExportedProgram's statistics are constants; recalibrate the nn.Module before export")
    reads = files_read(model_path, weights, data_path)  # never overwritten by -o (a --data folder: every file in it)
    out_path = check_output_path(output or default_output_path(model_path, "recalibrated"), force=force, protect=reads)
    # A progress bar only on a terminal: elsewhere it leaves a blank line on stderr.
    report = run_recalibration(loaded.model, data_path, batches=batches, batch_size=batch_size,
                               progress=sys.stderr.isatty(), trust_pickle=trust_pickle)
    report.notes[:0] = list(loaded.notes)
    if loaded.form == "state_dict+factory":
        save_state_dict(report.model.state_dict(), out_path, force=force, protect=reads)
        out_form = "state_dict"
    else:
        save_module(report.model, out_path, force=force, protect=reads)
        out_form = "module"
    facts = {"model": f"{model_path} ({loaded.form})", "data": str(data_path), "output": f"{out_path} ({out_form})"}
    emit(report, as_json=as_json, title="normsurgeon recalibrate", facts=facts,
         extra={"output": str(out_path), "output_form": out_form})
