"""``normsurgeon optimize``: fold and fuse norms in an existing .onnx file, checked in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli_options import emit, handle_errors, output_options, target_option, tolerance_options
from ..errors import UsageError
from ..io.inputs import parse_input_shape
from ..io.saving import check_output_path, default_output_path

@click.command(short_help="Fold BatchNorm and fuse norms in an existing .onnx file.")
@click.argument("onnx_path", metavar="MODEL.onnx", type=click.Path(path_type=Path))
@click.option("--input-shape", "input_shapes", multiple=True, metavar="SHAPE",
              help="Concrete shape of each graph input, in order (repeat the option), for models with "
                   "symbolic dims, e.g. 1,3,224,224. No dtype: it comes from the model.")
@target_option
@tolerance_options
@output_options(default="MODEL.opt.onnx beside MODEL.onnx")
@handle_errors
def optimize(onnx_path: Path, output: Path | None, input_shapes: tuple[str, ...], target: str, atol: float | None,
             rtol: float | None, force: bool, as_json: bool, verbose: bool) -> None:
    """Fold BatchNormalization into Conv/ConvTranspose/Gemm/MatMul and fuse decomposed norms.

    Works on .onnx files from any exporter: BatchNormalization is folded into the layer before it
    (or an unpadded layer after it); LayerNorm / RMSNorm / GroupNorm subgraphs become the native
    ops where the model's opset has them (with --target ort, onnxruntime's own ops at any opset, and
    residual Add + norm pairs become its Skip ops, for CUDA; --target ort-cpu leaves those pairs, which
    onnxruntime's CPU kernels run slower). The result is run against the input in
    onnxruntime on random inputs and written only when it matches.

    \b
    Examples:
      normsurgeon optimize resnet18.onnx                  # static shapes: writes resnet18.opt.onnx
      normsurgeon optimize model.onnx -o model.opt.onnx --input-shape 1,3,224,224  # symbolic dims
      normsurgeon optimize llama.onnx --target ort --input-shape 1,128  # onnxruntime's fused norms
      normsurgeon optimize llama.onnx --target ort-cpu --input-shape 1,128  # the same, minus Skip ops
    """
    from ..onnx.optimize import Target, optimize_onnx

    shapes = [_shape(spec) for spec in input_shapes]
    out_path = check_output_path(output or default_output_path(onnx_path, "opt"), force=force, protect=[onnx_path])
    report = optimize_onnx(onnx_path, out_path, input_shapes=shapes, atol=atol, rtol=rtol, force=force,
                           target=Target(target))
    ops_after = report.facts.get("ops_after", {})
    facts = {"model": str(onnx_path), "output": str(out_path), "target": target,
             "nodes": f"{report.facts['nodes_before']} → {report.facts['nodes_after']}",
             "BatchNormalization left": str(ops_after.get("BatchNormalization", 0))}
    emit(report, as_json=as_json, title="normsurgeon optimize", facts=facts, extra={"output": str(out_path)})


def _shape(spec: str) -> tuple[int, ...]:
    """A shape without dtype: optimize feeds each input in the dtype the .onnx declares."""
    shape_text, colon, dtype = spec.partition(":")
    if colon:
        raise UsageError(
            f"bad --input-shape {spec!r}: optimize takes the dtype from the model, not from ':{dtype}'; "
            f"give the shape only, e.g. --input-shape {shape_text}"
        )
    return parse_input_shape(spec).shape
