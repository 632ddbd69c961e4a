"""``normsurgeon export`` and ``normsurgeon verify``: ship ONNX that is proven in onnxruntime."""

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
    report_options,
    weights_option,
)
from ..io.inputs import resolve_inputs
from ..io.loading import load_model
from ..io.saving import check_output_path, default_output_path, files_read

_PROVIDER = click.option("--provider", "providers", type=click.Choice(["cpu", "cuda", "all"]), default="cpu",
                         show_default=True,
                         help="onnxruntime execution provider(s) to verify on; 'all' runs those present "
                              "and says which were skipped (cuda needs normsurgeon[gpu] on a CUDA machine).")
_ATOL = click.option("--atol", type=TOLERANCE, help=ATOL_HELP)
_RTOL = click.option("--rtol", type=TOLERANCE, help=RTOL_HELP)


@click.command(short_help="Fold, export to ONNX and verify it in onnxruntime.")
@model_options
@weights_option
@input_options
@output_options(default="MODEL.onnx beside MODEL, e.g. model.pt -> model.onnx")
@click.option("--no-fold", is_flag=True, help="Export without folding BatchNorm first (torch.onnx's optimizer "
              "still fuses a BatchNorm right after a conv; the report says when it did).")
@click.option("--opset", type=int, default=None,
              help="ONNX opset (default 23: the highest where onnxruntime runs the export and "
                   "LayerNorm, GroupNorm and RMSNorm are native ops).")
@click.option("--dynamic", "dynamic", multiple=True, is_flag=False, flag_value="", metavar="[NAME:AXIS=SYMBOL,...]",
              help="Symbolic input dims. Alone: batch and sequence for token inputs (decoder_* their own sequence), "
                   "batch, height and width for pixel_values, batch and time for audio, batch for the rest; "
                   "an axis the model fixes stays static, with a note. NAME:AXIS=SYMBOL[,AXIS=SYMBOL] "
                   "(repeatable): exactly these axes of that input. Verified at two sizes along each axis.")
@click.option("--dynamic-batch", is_flag=True,
              help="Make dim 0 of every input symbolic; the file is then verified at two batch sizes.")
@_PROVIDER
@_ATOL
@_RTOL
@handle_errors
def export(model_path: Path, factory: str | None, import_paths: tuple[Path, ...], trust_pickle: bool,
           weights: Path | None,
           input_shapes: tuple[str, ...], inputs_file: Path | None, output: Path | None, force: bool,
           as_json: bool, verbose: bool, no_fold: bool, opset: int | None, dynamic: tuple[str, ...],
           dynamic_batch: bool, providers: str, atol: float | None, rtol: float | None) -> None:
    """Fold, export to ONNX and verify the file in onnxruntime against the original model.

    Removes weight norm and folds BatchNorm (unless --no-fold) on a copy, exports with torch's
    dynamo exporter and the onnxscript optimizer, writes the file atomically, and compares every
    output of onnxruntime with the original torch model. Exits 0 only when every output matches.

    \b
    Examples:
      normsurgeon export models/examples/resnet18.pt -o resnet18.onnx --input-shape 1,3,32,32
      normsurgeon export llama-dir/ --dynamic    # batch and sequence symbolic
    """
    from ..onnx.dynamic_axes import parse_dynamic
    from ..onnx.export import export_onnx

    axes = parse_dynamic(dynamic)  # a bad spec fails before the model loads
    loaded = load_model(model_path, factory=factory, trust_pickle=trust_pickle, import_paths=import_paths,
                        weights=weights)
    reads = files_read(model_path, weights, inputs_file)  # never overwritten by -o
    out_path = check_output_path(output or onnx_path_for(model_path), force=force, protect=reads)
    inputs = resolve_inputs(loaded.model, input_shapes=input_shapes, inputs_file=inputs_file, trust_pickle=trust_pickle)
    report = export_onnx(loaded.model, inputs.args, out_path, fold=not no_fold, opset=opset,
                         dynamic=axes, dynamic_batch=dynamic_batch, providers=providers, atol=atol,
                         rtol=rtol, force=force, protect=reads, verbose=verbose)
    report.notes[:0] = [*loaded.notes, inputs.description]
    facts = {"model": f"{model_path} ({loaded.form})", "output": str(out_path)}
    emit(report, as_json=as_json, title="normsurgeon export", facts=facts, extra={"output": str(out_path)})


@click.command(short_help="Compare MODEL with MODEL.onnx in onnxruntime, output by output.")
@model_options
@weights_option
@click.argument("onnx_path", metavar="MODEL.onnx", type=click.Path(path_type=Path))
@input_options
@_PROVIDER
@_ATOL
@_RTOL
@report_options
@handle_errors
def verify(model_path: Path, factory: str | None, import_paths: tuple[Path, ...], trust_pickle: bool,
           weights: Path | None,
           onnx_path: Path, input_shapes: tuple[str, ...], inputs_file: Path | None, providers: str,
           atol: float | None, rtol: float | None, as_json: bool, verbose: bool) -> None:
    """Compare MODEL (torch) with MODEL.onnx (onnxruntime) on the same inputs, output by output.

    Prints max abs diff, max rel diff and cosine per output and provider; exits 0 only if every
    output passes.

    \b
    Example (the file from the export example, which has a fixed batch of 1; export with
    --dynamic-batch to verify other batch sizes):
      normsurgeon verify models/examples/resnet18.pt resnet18.onnx --input-shape 1,3,32,32
    """
    from ..onnx.verify import verify_onnx

    loaded = load_model(model_path, factory=factory, trust_pickle=trust_pickle, import_paths=import_paths,
                        weights=weights)
    inputs = resolve_inputs(loaded.model, input_shapes=input_shapes, inputs_file=inputs_file, trust_pickle=trust_pickle)
    report = verify_onnx(loaded.model, onnx_path, inputs.args, providers=providers, atol=atol, rtol=rtol)
    report.notes[:0] = [*loaded.notes, inputs.description]
    facts = {"model": f"{model_path} ({loaded.form})", "onnx": str(onnx_path)}
    emit(report, as_json=as_json, title="normsurgeon verify", facts=facts, extra={"onnx": str(onnx_path)})


def onnx_path_for(model_path: Path) -> Path:
    """model.pt -> model.onnx; a save_pretrained folder -> folder.onnx beside it; timm:NAME -> NAME.onnx."""
    default = default_output_path(model_path, "x", ".onnx")
    return default.with_name(default.name.replace(".x.onnx", ".onnx"))
