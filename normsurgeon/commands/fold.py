"""``normsurgeon fold``: fold BatchNorm into neighbouring layers and write the checked model."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from ..cli_options import input_options, model_options, output_options, tolerance_options, weights_option
from ..errors import PreconditionError
from ..io.saving import write_atomically
from ..passes.fold_batchnorm import batchnorms_left, fold_passes, run_fold
from ..passes.fold_batchnorm_exported import fold_batchnorm_exported
from ..passes.fold_norm_affine import FoldNormAffines
from ..pipeline import Sequential, raise_if_failed
from ..report import Report
from ..streaming import StreamedSurgery
from .common import EvalMode, ModelArgs, OpenedModel, eval_option, model_command, open_model
from .streamed import refuse_full_check_alone, run_streamed, stream_options

EVAL = EvalMode(", where BatchNorm uses batch statistics; pass --eval to fold its test-time (eval-mode) behaviour",
                "folded its eval-mode behaviour (--eval)")


@click.command(short_help="Fold BatchNorm into neighbouring conv/linear layers.")
@model_options
@weights_option
@input_options
@output_options(default="MODEL.folded.pt beside MODEL; a save_pretrained folder gives FOLDER.folded/ where it reloads the same")
@eval_option("Put a model saved in training mode into eval mode first (folding computes its test-time behaviour).")
@click.option("--to-affine", is_flag=True,
              help="Replace BatchNorms that cannot be folded by an equivalent per-channel affine.")
@click.option("--affine", is_flag=True,
              help="Also fold LayerNorm/RMSNorm scales (and LN shifts) into the linear layers that alone "
                   "read them, leaving parameter-free norms.")
@click.option("--allow-default-stats", is_flag=True,
              help="Fold BatchNorms whose running stats were never updated (mean 0, var 1).")
@click.option("--reparameterize/--no-reparameterize", default=True, show_default=True,
              help="First merge parallel conv+BN branches that are summed (RepVGG, MobileOne, FastViT blocks) "
                   "into one conv.")
@click.option("--strict", is_flag=True,
              help="Exit 5 and write nothing when any BatchNorm is left unfolded, whatever the reason (for CI); "
                   "with --to-affine those with no foldable neighbour become affines and do not count.")
@stream_options
@tolerance_options
@model_command
def fold(args: ModelArgs, to_affine: bool, affine: bool, allow_default_stats: bool, reparameterize: bool,
         strict: bool, stream: bool, full_check: bool, atol: float | None, rtol: float | None) -> None:
    """Fold BatchNorm running statistics into the neighbouring conv/linear layers.

    First, weight-standardized convs (timm StdConv2d) are baked into plain convs, and summed
    conv+BN branches (RepVGG, MobileOne) are merged into one conv unless --no-reparameterize.
    A folded BatchNorm becomes nn.Identity; a BatchNorm with its activation inside (timm
    BatchNormAct2d) becomes that activation.

    Writes MODEL.folded.pt (a pickled module of the model's own class; a .pt2 gives
    MODEL.folded.pt2) and exits 0 only when the folded model matches the original on the example
    inputs. A grouped ConvTranspose that gets a bias from the fold becomes normsurgeon's
    BiasAfterConvTranspose (torch's CPU kernel is slow with a bias); the report says where.

    --stream edits a save_pretrained folder one decoder block at a time (a model larger than memory)
    and writes a folder with the same shards; a norm shift that would give a linear layer a bias its
    class builds without is then left unfolded, with that reason.

    \b
    Examples:
      normsurgeon fold models/examples/resnet18.pt --input-shape 1,3,32,32
      normsurgeon fold model.pt --inputs batch.pt --json
      normsurgeon fold weights.pth --factory mypkg.nets:resnet50 --input-shape 1,3,224,224
      normsurgeon fold llama-dir/ --affine --stream
    """
    refuse_full_check_alone(stream, full_check)
    def passes(add_biases: bool = True) -> Sequential:
        fold_bn = fold_passes(unfoldable="affine" if to_affine else "keep", reparameterize=reparameterize,
                              allow_default_stats=allow_default_stats)
        return Sequential(fold_bn, *([FoldNormAffines(add_biases=add_biases)] if affine else []))

    if stream:
        def surgery(model, inputs) -> Report:
            report = run_fold(passes(add_biases=False), model, inputs, atol=atol, rtol=rtol)  # the folder's class
            _refuse_leftovers(report, strict)
            return report

        return run_streamed(args, StreamedSurgery("fold", surgery, subject="the folded model"), "folded",
                            title="normsurgeon fold", facts=lambda report: _facts(report, affine, reparameterize),
                            atol=atol, rtol=rtol, full_check=full_check)
    opened = open_model(args, "fold --affine" if affine else None, eval_mode=EVAL)
    target = opened.output_target("folded")  # a save_pretrained model goes back as a folder where it reloads the same
    exported = opened.loaded.form == "exported_program"
    if exported:
        report = _fold_exported(opened, target.path, strict, atol, rtol)
    else:
        report = run_fold(passes(), opened.model, opened.example_inputs(), atol=atol, rtol=rtol)  # one trace
        _refuse_leftovers(report, strict)
    out_path = target.path if exported else opened.write(report, target)
    facts = {"output": str(out_path), **_facts(report, affine, reparameterize and not exported)}
    opened.emit(report, title="normsurgeon fold", facts=facts, extra={"output": str(out_path)})


def _facts(report: Report, affine: bool, reparameterize: bool) -> dict[str, str]:
    facts = {"folded": str(len(report.changed("folded"))), "skipped": str(len(report.skipped))}
    if reparameterize:
        facts["reparameterized"] = str(len(report.changed("reparameterized")))
    if affine:
        facts["affines folded"] = str(len(report.changed("folded-affine")))
    return facts


def _fold_exported(opened: OpenedModel, path: Path, strict: bool, atol: float | None, rtol: float | None) -> Report:
    """A .pt2 has no modules: fold in its graph, checked on the given inputs or those stored in the file; write it."""
    inputs = opened.example_inputs(optional=True)
    report = fold_batchnorm_exported(opened.loaded.exported_program, inputs, atol=atol, rtol=rtol)
    if inputs is None:
        opened.notes.append("the example inputs stored in the .pt2 file")
    raise_if_failed(report, "the folded program")
    _refuse_leftovers(report, strict)
    write_atomically(path, lambda tmp: torch.export.save(report.model, tmp), force=opened.args.force,
                     protect=opened.reads)
    return report


def _refuse_leftovers(report: Report, strict: bool) -> None:
    """``--strict``: a BatchNorm left in the result is an error (exit 5), named with why it stayed."""
    left = batchnorms_left(report) if strict else []
    if left:
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        raise PreconditionError(
            f"--strict: {len(left)} BatchNorm(s) left unfolded: {'; '.join(left[:3])}{more}; run without --strict "
            "to see the report, pass --to-affine to replace those with no foldable neighbour, or drop --strict"
        )
