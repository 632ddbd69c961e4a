"""``normsurgeon export`` and ``normsurgeon verify``: ship ONNX that is proven in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli_options import (
    input_options,
    model_options,
    output_options,
    report_options,
    target_option,
    tolerance_options,
    weights_option,
)
from ..errors import UsageError
from ..io.saving import default_output_path
from .common import ModelArgs, model_command, open_model

_PROVIDER = click.option("--provider", "providers", type=click.Choice(["cpu", "cuda", "all"]), default="cpu",
                         show_default=True,
                         help="onnxruntime execution provider(s) to verify on; 'all' runs those present "
                              "and says which were skipped (cuda needs normsurgeon[gpu] on a CUDA machine).")


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
@click.option("--dynamic", is_flag=True,
              help="Symbolic input dims per modality: batch and sequence for token inputs (decoder_* their own "
                   "sequence), batch, height and width for pixel_values, batch and time for audio, batch for the "
                   "rest; an axis the model fixes stays static, with a note. Verified at two sizes along each axis.")
@click.option("--dynamic-axis", "dynamic_axes", multiple=True, metavar="NAME:AXIS=SYMBOL[,AXIS=SYMBOL]",
              help="Exactly these symbolic axes of input NAME (repeatable); an axis the model fixes is an error. "
                   "Alone: only the named inputs are dynamic; with --dynamic: they replace that input's defaults.")
@click.option("--dynamic-batch", is_flag=True,
              help="Make dim 0 of every input symbolic; the file is then verified at two batch sizes.")
@click.option("--external-data", is_flag=True,
              help="Put the weights in MODEL.onnx.data beside the file, whatever their size (always done above "
                   "protobuf's 2 GiB limit).")
@click.option("--with-past", is_flag=True,
              help="Causal LMs: export the KV cache as inputs and outputs (optimum's text-generation-with-past "
                   "layout: past_key_values.N.key/value in, present.N.key/value out, a past of length 0 for the "
                   "prefill); batch, sequence and past length symbolic. Encoder-decoders (T5, Whisper): -o is a "
                   "FOLDER (default MODEL-onnx/) of optimum's encoder_model.onnx, decoder_model.onnx and "
                   "decoder_with_past_model.onnx (past_key_values.N.decoder/encoder.key/value). Verified over a "
                   "first step and 3 greedy decode steps at batch 1 and 2 against torch's own cache loop.")
@target_option
@_PROVIDER
@tolerance_options
@model_command
def export(args: ModelArgs, no_fold: bool, opset: int | None, dynamic: bool, dynamic_axes: tuple[str, ...],
           dynamic_batch: bool, external_data: bool, with_past: bool, target: str, providers: str,
           atol: float | None, rtol: float | None) -> None:
    """Fold, export to ONNX and verify the file in onnxruntime against the original model.

    Removes weight norm and folds BatchNorm (unless --no-fold) on a copy, exports with torch's
    dynamo exporter and the onnxscript optimizer, writes the file atomically, and compares every
    output of onnxruntime with the original torch model. Exits 0 only when every output matches.

    \b
    Examples:
      normsurgeon export models/examples/resnet18.pt -o resnet18.onnx --input-shape 1,3,32,32
      normsurgeon export --dynamic llama-dir/    # batch and sequence symbolic
      normsurgeon export vit-dir/ --dynamic-axis pixel_values:0=batch
      normsurgeon export llama-dir/ --target ort   # onnxruntime's fused norm ops
      normsurgeon export llama-dir/ --with-past    # KV cache in and out, for generation loops
      normsurgeon export t5-dir/ --with-past -o t5-onnx/   # encoder-decoder: a folder of three files
    """
    from ..onnx.dynamic_axes import parse_dynamic
    from ..onnx.export import export_onnx
    from ..onnx.with_past import export_with_past
    from ..onnx.with_past_seq2seq import check_folder_target, export_seq2seq_with_past, is_encoder_decoder

    axes = parse_dynamic(dynamic_axes, defaults=dynamic)  # a bad spec fails before the model loads
    if with_past and (axes or dynamic_batch or args.gives_inputs):
        raise UsageError("--with-past sets its own inputs and dynamic axes (batch, sequence, past length); leave out "
                         "--dynamic, --dynamic-axis, --dynamic-batch, --input-shape and --inputs")
    opened = open_model(args, None)
    if with_past and is_encoder_decoder(opened.model):
        folder = args.output or seq2seq_folder_for(args.model_path)
        check_folder_target(folder, force=args.force, protect=opened.reads)  # before the slow work
        report = export_seq2seq_with_past(opened.model, folder, fold=not no_fold, opset=opset, providers=providers,
                                          atol=atol, rtol=rtol, force=args.force, protect=opened.reads,
                                          verbose=args.verbose, external_data=external_data, target=target)
        opened.emit(report, title="normsurgeon export", facts={"output": f"{folder}/"}, extra={"output": str(folder)})
        return
    out_path = opened.output_file(onnx_path_for(args.model_path))
    if with_past:
        report = export_with_past(opened.model, out_path, fold=not no_fold, opset=opset, providers=providers,
                                  atol=atol, rtol=rtol, force=args.force, protect=opened.reads, verbose=args.verbose,
                                  external_data=external_data, target=target)
    else:
        report = export_onnx(opened.model, opened.example_inputs(), out_path, fold=not no_fold, opset=opset,
                             dynamic=axes, dynamic_batch=dynamic_batch, providers=providers, atol=atol,
                             rtol=rtol, force=args.force, protect=opened.reads, verbose=args.verbose,
                             external_data=external_data, target=target)
    opened.emit(report, title="normsurgeon export", facts={"output": str(out_path)}, extra={"output": str(out_path)})


@click.command(short_help="Compare MODEL with MODEL.onnx in onnxruntime, output by output.")
@model_options
@weights_option
@click.argument("onnx_path", metavar="MODEL.onnx", type=click.Path(path_type=Path))
@input_options
@_PROVIDER
@tolerance_options
@report_options
@model_command
def verify(args: ModelArgs, onnx_path: Path, providers: str, atol: float | None, rtol: float | None) -> None:
    """Compare MODEL (torch) with MODEL.onnx (onnxruntime) on the same inputs, output by output.

    Prints max abs diff, max rel diff and cosine per output and provider; exits 0 only if every
    output passes.

    \b
    Example (the file from the export example, which has a fixed batch of 1; export with
    --dynamic-batch to verify other batch sizes):
      normsurgeon verify models/examples/resnet18.pt resnet18.onnx --input-shape 1,3,32,32
    """
    from ..onnx.verify import verify_onnx

    opened = open_model(args, None)
    report = verify_onnx(opened.model, onnx_path, opened.example_inputs(), providers=providers, atol=atol, rtol=rtol)
    opened.emit(report, title="normsurgeon verify", facts={"onnx": str(onnx_path)}, extra={"onnx": str(onnx_path)})


def onnx_path_for(model_path: Path) -> Path:
    """model.pt -> model.onnx; a save_pretrained folder -> folder.onnx beside it; timm:NAME -> NAME.onnx."""
    return default_output_path(model_path, "", ".onnx")


def seq2seq_folder_for(model_path: Path) -> Path:
    """The default --with-past folder of an encoder-decoder: model.pt -> model-onnx/, t5-dir/ -> t5-dir-onnx/."""
    path = onnx_path_for(model_path)
    return path.with_name(f"{path.stem}-onnx")
