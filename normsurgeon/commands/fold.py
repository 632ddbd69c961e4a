"""``normsurgeon fold``: fold BatchNorm into neighbouring layers and write the checked model."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from ..cli_options import (
    ATOL_HELP,
    RTOL_HELP,
    TOLERANCE,
    emit,
    handle_errors,
    input_options,
    model_options,
    output_options,
    weights_option,
)
from ..errors import PreconditionError, UsageError
from ..io.inputs import ExampleInputs, resolve_inputs
from ..io.loading import LoadedModel, load_model
from ..io.pretrained_output import output_target, write_model
from ..io.saving import default_output_path, files_read, write_atomically
from ..passes.fold_batchnorm import batchnorms_left, fold_passes, run_fold
from ..passes.fold_batchnorm_exported import fold_batchnorm_exported
from ..passes.fold_norm_affine import FoldNormAffines
from ..pipeline import Sequential, raise_if_failed
from ..report import Report


@click.command(short_help="Fold BatchNorm into neighbouring conv/linear layers.")
@model_options
@weights_option
@input_options
@output_options(default="MODEL.folded.pt beside MODEL; a save_pretrained folder gives FOLDER.folded/ where it reloads the same")
@click.option("--eval", "set_eval", is_flag=True,
              help="Put a model saved in training mode into eval mode first (folding computes its test-time behaviour).")
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
@click.option("--atol", type=TOLERANCE, help=ATOL_HELP)
@click.option("--rtol", type=TOLERANCE, help=RTOL_HELP)
@handle_errors
def fold(model_path: Path, factory: str | None, import_paths: tuple[Path, ...], trust_pickle: bool,
         weights: Path | None,
         input_shapes: tuple[str, ...], inputs_file: Path | None, output: Path | None, force: bool,
         as_json: bool, verbose: bool, set_eval: bool, to_affine: bool, affine: bool, allow_default_stats: bool,
         reparameterize: bool, strict: bool, atol: float | None, rtol: float | None) -> None:
    """Fold BatchNorm running statistics into the neighbouring conv/linear layers.

    Writes MODEL.folded.pt (a pickled module of the model's own class, folded BNs replaced by
    nn.Identity; a .pt2 gives MODEL.folded.pt2) and exits 0 only when the folded model matches
    the original on the example inputs. A grouped ConvTranspose that gets a bias from the fold
    becomes normsurgeon's BiasAfterConvTranspose (torch's CPU kernel is slow with a bias); the
    report says where.

    \b
    Examples:
      normsurgeon fold models/examples/resnet18.pt --input-shape 1,3,32,32
      normsurgeon fold model.pt --inputs batch.pt --json
      normsurgeon fold weights.pth --factory mypkg.nets:resnet50 --input-shape 1,3,224,224
    """
    loaded = load_model(model_path, factory=factory, trust_pickle=trust_pickle, import_paths=import_paths,
                        weights=weights)
    reads = files_read(model_path, weights, inputs_file)  # never overwritten by -o
    # a save_pretrained model goes back as a directory where it reloads the same
    target = output_target(output, loaded.form, default_output_path(model_path, "folded"), force=force, protect=reads)
    out_path = target.path
    if loaded.form == "exported_program":
        if affine:
            raise UsageError(f"{model_path}: --affine needs an nn.Module; a .pt2 ExportedProgram has no layers to edit")
        report = _fold_exported(loaded, input_shapes, inputs_file, trust_pickle, atol, rtol)
        _refuse_leftovers(report, strict)
        write_atomically(out_path, lambda tmp: torch.export.save(report.model, tmp), force=force, protect=reads)
    else:
        report, inputs = _fold_module(loaded, input_shapes, inputs_file, trust_pickle, set_eval, to_affine,
                                      affine, allow_default_stats, reparameterize, atol, rtol)
        _refuse_leftovers(report, strict)
        out_path = write_model(report, inputs.args, target, force=force, protect=reads)
    facts = {"model": f"{model_path} ({loaded.form})", "output": str(out_path),
             "folded": str(len(report.changed("folded"))), "skipped": str(len(report.skipped))}
    if reparameterize and loaded.form != "exported_program":
        facts["reparameterized"] = str(len(report.changed("reparameterized")))
    if affine:
        facts["affines folded"] = str(len(report.changed("folded-affine")))
    emit(report, as_json=as_json, title="normsurgeon fold", facts=facts, extra={"output": str(out_path)})


def _fold_module(loaded: LoadedModel, input_shapes: tuple[str, ...], inputs_file: Path | None, trust_pickle: bool,
                 set_eval: bool, to_affine: bool, affine: bool, allow_default_stats: bool, reparameterize: bool,
                 atol: float | None, rtol: float | None) -> tuple[Report, ExampleInputs]:
    model = loaded.model
    notes = list(loaded.notes)
    if model.training:
        if not set_eval:
            raise PreconditionError(
                f"{loaded.source} was saved in training mode, where BatchNorm uses batch statistics; "
                "pass --eval to fold its test-time (eval-mode) behaviour"
            )
        model.eval()
        notes.append("the model was in training mode; folded its eval-mode behaviour (--eval)")
    inputs = resolve_inputs(model, input_shapes=input_shapes, inputs_file=inputs_file, trust_pickle=trust_pickle)
    fold = fold_passes(unfoldable="affine" if to_affine else "keep", allow_default_stats=allow_default_stats,
                       reparameterize=reparameterize)
    passes = Sequential(fold, *([FoldNormAffines()] if affine else []))
    report = run_fold(passes, model, inputs.args, atol=atol, rtol=rtol)  # one trace for every pass
    report.notes[:0] = notes + [inputs.description]
    return report, inputs


def _fold_exported(loaded: LoadedModel, input_shapes: tuple[str, ...], inputs_file: Path | None,
                   trust_pickle: bool, atol: float | None, rtol: float | None) -> Report:
    """A .pt2 has no modules: fold in its graph, checked on its stored (or the given) inputs."""
    inputs = None
    description = "the example inputs stored in the .pt2 file"
    if input_shapes or inputs_file:
        resolved = resolve_inputs(loaded.model, input_shapes=input_shapes, inputs_file=inputs_file,
                                  trust_pickle=trust_pickle)
        inputs, description = resolved.args, resolved.description
    report = fold_batchnorm_exported(loaded.exported_program, inputs, atol=atol, rtol=rtol)
    report.notes[:0] = [*loaded.notes, description]
    raise_if_failed(report, "the folded program")
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
