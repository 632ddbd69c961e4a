"""``normsurgeon optimize``: fold and fuse norms in an existing .onnx file, checked in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli import emit, handle_errors
from ..io.inputs import parse_input_shape
from ..io.saving import default_output_path


@click.command()
@click.argument("onnx_path", metavar="MODEL.onnx", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the result (default: MODEL.opt.onnx beside the input).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="SHAPE",
              help="Concrete shape for each graph input, in order, where the model has symbolic dims "
                   "(e.g. 1,3,224,224). The dtype comes from the model.")
@click.option("--atol", type=float, help="Absolute tolerance of the check (default by dtype; fp32: 1e-5).")
@click.option("--rtol", type=float, help="Tolerance relative to max|output| (default by dtype; fp32: 1e-4).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file (never the input).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--verbose", is_flag=True, help="Show full tracebacks for errors.")
@handle_errors
def optimize(onnx_path: Path, output: Path | None, input_shapes: tuple[str, ...], atol: float | None,
             rtol: float | None, force: bool, as_json: bool, verbose: bool) -> None:
    """Fold BatchNormalization into Conv/ConvTranspose/Gemm/MatMul and fuse decomposed norms.

    Works on .onnx files from any exporter: BatchNormalization is folded into the layer before it
    (or an unpadded layer after it); LayerNorm / RMSNorm / GroupNorm subgraphs become the native
    ops where the model's opset has them. The result is run against the input in onnxruntime on
    random inputs and written only when it matches.

    \b
    Example:
      normsurgeon optimize model.onnx -o model.opt.onnx --input-shape 1,3,224,224
    """
    from ..onnx.optimize import optimize_onnx

    shapes = [parse_input_shape(spec).shape for spec in input_shapes]
    out_path = output or default_output_path(onnx_path, "opt")
    report = optimize_onnx(onnx_path, out_path, input_shapes=shapes, atol=atol, rtol=rtol, force=force)
    ops_after = report.facts.get("ops_after", {})
    facts = {"model": str(onnx_path), "output": str(out_path),
             "BatchNormalization left": str(ops_after.get("BatchNormalization", 0))}
    emit(report, as_json=as_json, title="normsurgeon optimize", facts=facts, extra={"output": str(out_path)})
