"""``normsurgeon convert``: change norm layers' kind, exactly (checked) or, on request, approximately."""

from __future__ import annotations

from pathlib import Path

import click

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
from ..io.loading import load_model
from ..errors import PreconditionError, UsageError
from ..recognize import NormKind

_KINDS = ", ".join([*NormKind.names(), "native"])


@click.command(short_help="Convert norm layers to another kind (exact, or --approximate).")
@model_options
@weights_option
@input_options
@output_options(default="MODEL.converted.pt beside MODEL; a save_pretrained folder gives FOLDER.converted/ where it reloads the same")
@click.option("--to", "to", required=True, metavar="KIND",
              help=f"Target kind: {_KINDS} (native: each hand-written norm to torch's own layer).")
@click.option("--from", "from_", metavar="KIND", help="Convert only norms of this kind.")
@click.option("--only", metavar="PATTERN", help="Convert only norms whose path matches this glob, e.g. 'blocks.*.ln1' (comma-separated for several).")
@click.option("--approximate", is_flag=True,
              help="Allow conversions that change the outputs (e.g. BatchNorm -> GroupNorm for fine-tuning); the report gives the difference.")
@click.option("--eval", "set_eval", is_flag=True, help="Put a model saved in training mode into eval mode first.")
@click.option("--atol", type=TOLERANCE, help=ATOL_HELP)
@click.option("--rtol", type=TOLERANCE, help=RTOL_HELP)
@handle_errors
def convert(model_path: Path, factory: str | None, import_paths: tuple[Path, ...], trust_pickle: bool,
            weights: Path | None,
            input_shapes: tuple[str, ...], inputs_file: Path | None, output: Path | None, force: bool,
            as_json: bool, verbose: bool, to: str, from_: str | None, only: str | None, approximate: bool,
            set_eval: bool, atol: float | None, rtol: float | None) -> None:
    """Convert norm layers to another kind and write the checked model (MODEL.converted.pt).

    Exact: hand-written norms -> torch's own (--to native), BatchNorm <-> FrozenBatchNorm <->
    SyncBatchNorm, InstanceNorm <-> GroupNorm(C groups), LayerNorm -> RMSNorm in pre-norm
    transformers (by centring the residual stream). Approximate, with --approximate only:
    BatchNorm -> GroupNorm/LayerNorm, RMSNorm <-> LayerNorm on un-centred inputs.

    \b
    Examples:
      normsurgeon convert llama.pt --to native --input-shape 1,16:int64
      normsurgeon convert gpt.pt --to rmsnorm --input-shape 1,16:int64
      normsurgeon convert resnet.pt --to groupnorm --approximate
    """
    from ..io.inputs import resolve_inputs
    from ..io.pretrained_output import output_target, write_model
    from ..io.saving import default_output_path, files_read
    from ..passes.convert import convert_norms, parse_target

    target = parse_target(to)  # unknown kinds fail before anything is loaded
    source = NormKind.parse(from_, option="--from kind") if from_ else None
    loaded = load_model(model_path, factory=factory, trust_pickle=trust_pickle, import_paths=import_paths,
                        weights=weights)
    if loaded.form == "exported_program":
        raise UsageError(f"{model_path}: convert edits nn.Module layers, and a .pt2 ExportedProgram has none; "
                         "convert the module before torch.export")
    reads = files_read(model_path, weights, inputs_file)  # never overwritten by -o
    destination = output_target(output, loaded.form, default_output_path(model_path, "converted"), force=force,
                                protect=reads)
    model, notes = loaded.model, list(loaded.notes)
    if model.training:
        if not set_eval:
            raise PreconditionError(f"{model_path} was saved in training mode; pass --eval to convert its eval-mode behaviour")
        model.eval()
        notes.append("the model was in training mode; converted its eval-mode behaviour (--eval)")
    inputs = resolve_inputs(model, input_shapes=input_shapes, inputs_file=inputs_file, trust_pickle=trust_pickle)
    report = convert_norms(model, inputs.args, to=target if target is not None else "native", from_=source,
                           only=only, approximate=approximate, atol=atol, rtol=rtol)
    if not report.changes:
        if report.skipped or _inexact_notes(report):
            raise PreconditionError(nothing_converted(report))
        notes.append(f"every selected norm is already {report.facts.get('to')}: nothing to convert, the output is "
                     "the same model")
    report.notes[:0] = [*notes, inputs.description]
    out_path = write_model(report, inputs.args, destination, force=force, protect=reads)
    facts = {"model": f"{model_path} ({loaded.form})", "output": str(out_path),
             "converted": str(len(report.changed("converted"))), "skipped": str(len(report.skipped))}
    emit(report, as_json=as_json, title="normsurgeon convert", facts=facts, extra={"output": str(out_path)})


def _inexact_notes(report) -> list[str]:
    return [n for n in report.notes if "not converted exactly" in n or "cannot be exact" in n]


def nothing_converted(report) -> str:
    """The one-line error when no norm was converted: the first reasons, so the user sees why."""
    reasons = [f"{s.module}: {s.message}" for s in report.skipped[:3]]
    reasons += _inexact_notes(report)[:2]
    more = f" (and {len(report.skipped) - 3} more)" if len(report.skipped) > 3 else ""
    why = "; ".join(reasons) + more if reasons else f"every selected norm is already {report.facts.get('to')}"
    return f"nothing was converted to {report.facts.get('to')}: {why}"
