"""``normsurgeon convert``: change norm layers' kind, exactly (checked) or, on request, approximately."""

from __future__ import annotations

import click

from ..cli_options import input_options, model_options, output_options, tolerance_options, weights_option
from ..errors import PreconditionError, UsageError
from ..recognize import NormKind
from ..report import Report
from ..streaming import StreamedSurgery
from .common import EvalMode, ModelArgs, eval_option, model_command, open_model
from .streamed import refuse_full_check_alone, run_streamed, stream_options

EVAL = EvalMode("; pass --eval to convert its eval-mode behaviour", "converted its eval-mode behaviour (--eval)")
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
@click.option("--untie", is_flag=True,
              help="LayerNorm -> RMSNorm: give a layer that writes to the residual stream its own copy of a tied "
                   "weight (input embedding tied to the LM head).")
@eval_option("Put a model saved in training mode into eval mode first.")
@stream_options
@tolerance_options
@model_command
def convert(args: ModelArgs, to: str, from_: str | None, only: str | None, approximate: bool, untie: bool,
            stream: bool, full_check: bool, atol: float | None, rtol: float | None) -> None:
    """Convert norm layers to another kind and write the checked model (MODEL.converted.pt).

    Exact: hand-written norms -> torch's own (--to native), BatchNorm <-> FrozenBatchNorm <->
    SyncBatchNorm, InstanceNorm <-> GroupNorm(C groups), LayerNorm -> RMSNorm in pre-norm
    transformers (by centring the residual stream). Approximate, with --approximate only:
    BatchNorm -> GroupNorm/LayerNorm, RMSNorm <-> LayerNorm on un-centred inputs.

    --stream converts a save_pretrained folder one decoder block at a time; the converted norms are
    written as the class builds them (a LayerNorm with weight 1 and bias 0 computes RMSNorm on the
    centred stream), and a result the class cannot hold (a new lm_head bias) is refused.

    \b
    Examples:
      normsurgeon convert llama.pt --to native --input-shape 1,16:int64
      normsurgeon convert gpt.pt --to rmsnorm --input-shape 1,16:int64
      normsurgeon convert gpt2-lm.pt --to rmsnorm --untie --input-shape 1,16:int64
      normsurgeon convert resnet.pt --to groupnorm --approximate
      normsurgeon convert phi-dir/ --to rmsnorm --stream
    """
    from ..passes.convert import convert_norms, parse_target

    refuse_full_check_alone(stream, full_check)
    target = parse_target(to)  # unknown kinds fail before anything is loaded
    source = NormKind.parse(from_, option="--from kind") if from_ else None

    def surgery(model, inputs) -> Report:
        return convert_norms(model, inputs, to=target if target is not None else "native", from_=source, only=only,
                             approximate=approximate, untie=untie, atol=atol, rtol=rtol)

    if stream:
        if approximate:
            raise UsageError("--stream checks every block against the original, which an approximate conversion "
                             "changes; drop --approximate or --stream")
        job = StreamedSurgery("convert", surgery, subject="the converted model", require=_require_conversions)
        return run_streamed(args, job, "converted",
                            title="normsurgeon convert", facts=_facts, atol=atol, rtol=rtol, full_check=full_check)
    opened = open_model(args, "convert", eval_mode=EVAL)
    destination = opened.output_target("converted")
    report = surgery(opened.model, opened.example_inputs())
    _require_conversions(report)
    if not report.changes:
        opened.notes.append(f"every selected norm is already {report.facts.get('to')}: nothing to convert, the "
                            "output is the same model")
    out_path = opened.write(report, destination)
    opened.emit(report, title="normsurgeon convert", facts={"output": str(out_path), **_facts(report)},
                extra={"output": str(out_path)})


def _require_conversions(report: Report) -> None:
    if not report.changes and (report.skipped or report.left_out):
        raise PreconditionError(nothing_converted(report))


def _facts(report: Report) -> dict[str, str]:
    return {"converted": str(len(report.changed("converted"))), "skipped": str(len(report.skipped))}


def nothing_converted(report: Report) -> str:
    """The one-line error when no norm was converted though some were skipped or left out: the first reasons."""
    reasons = [f"{s.module}: {s.message}" for s in report.skipped[:3]]
    reasons += [f"{o.module}: not converted exactly: {o.detail}" for o in report.left_out[:2]]
    more = f" (and {len(report.skipped) - 3} more)" if len(report.skipped) > 3 else ""
    return f"nothing was converted to {report.facts.get('to')}: {'; '.join(reasons)}{more}"
