"""``normsurgeon recalibrate``: recompute BatchNorm running statistics from user data."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..cli_options import model_options, output_options, weights_option
from .common import ModelArgs, model_command, open_model


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
@model_command
def recalibrate(args: ModelArgs, data_path: Path, batches: int | None, batch_size: int | None) -> None:
    """Reset and re-estimate every BatchNorm's running mean/var from --data.

    Each BatchNorm gets the exact mean and variance of every sample it received, pooled over
    all batches (not the training momentum, nor an average of per-batch statistics), with only
    the BatchNorm layers in train mode. The check compares outputs before and after on a
    held-out batch: informational (recalibration changes outputs on purpose), it fails only
    when the new outputs are not finite. Writes MODEL.recalibrated.pt in MODEL's own form; a
    save_pretrained folder gives a folder, reloaded and checked on the held-out batch before it is kept.

    \b
    Example:
      normsurgeon recalibrate averaged.pt --data calib.pt --batch-size 64
    """
    from ..io.data import load_batches, to_model
    from ..io.pretrained_output import write_model
    from ..io.saving import save_state_dict
    from ..passes.recalibrate import recalibrate as run_recalibration

    opened = open_model(args, "recalibrate", reads=(data_path,))  # a --data folder: every file in it is protected
    target = opened.output_target("recalibrated")
    data = load_batches(data_path, trust_pickle=args.trust_pickle, batch_size=batch_size)
    # A progress bar only on a terminal: elsewhere it leaves a blank line on stderr.
    report = run_recalibration(opened.model, data, batches=batches, progress=sys.stderr.isatty())
    if opened.loaded.form == "state_dict+factory":
        out_path = save_state_dict(report.model.state_dict(), target.path, force=args.force, protect=opened.reads)
        out_form = "state_dict"
    else:  # a save_pretrained model: a directory, proven on the held-out batch by reloading it
        out_path = write_model(report, to_model(data.batches[-1], report.model), target, force=args.force,
                               protect=opened.reads)
        out_form = "save_pretrained" if out_path.is_dir() else "module"
    facts = {"data": str(data_path), "output": f"{out_path} ({out_form})"}
    opened.emit(report, title="normsurgeon recalibrate", facts=facts,
                extra={"output": str(out_path), "output_form": out_form})
