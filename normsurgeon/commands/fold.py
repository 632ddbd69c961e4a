"""``normsurgeon fold``: fold BatchNorm into neighbouring layers and write the checked model."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli import emit, handle_errors, input_options, model_options, output_options
from ..errors import PreconditionError, UsageError


@click.command()
@model_options
@input_options
@output_options
@click.option("--eval", "set_eval", is_flag=True,
              help="Put a model saved in training mode into eval mode first (folding computes its test-time behaviour).")
@click.option("--to-affine", is_flag=True,
              help="Replace BatchNorms that cannot be folded by an equivalent per-channel affine.")
@click.option("--allow-default-stats", is_flag=True,
              help="Fold BatchNorms whose running stats were never updated (mean 0, var 1).")
@click.option("--atol", type=float, help="Absolute tolerance of the check (default by dtype; fp32: 1e-5).")
@click.option("--rtol", type=float, help="Tolerance relative to max|output| (default by dtype; fp32: 1e-4).")
@handle_errors
def fold(model_path: Path, factory: str | None, import_paths: tuple[Path, ...], trust_pickle: bool,
         input_shapes: tuple[str, ...], inputs_file: Path | None, output: Path | None, force: bool,
         as_json: bool, verbose: bool, set_eval: bool, to_affine: bool, allow_default_stats: bool,
         atol: float | None, rtol: float | None) -> None:
    """Fold BatchNorm running statistics into the neighbouring conv/linear layers.

    Writes MODEL.folded.pt (a pickled module of the model's own class, folded BNs replaced by
    nn.Identity) and exits 0 only when the folded model matches the original on the example inputs.

    \b
    Example:
      normsurgeon fold models/examples/resnet18.pt --input-shape 1,3,32,32
    """
    from ..io.inputs import resolve_inputs
    from ..io.loading import load_model
    from ..io.saving import default_output_path, save_module
    from ..passes.fold_batchnorm import fold_batchnorm

    loaded = load_model(model_path, factory=factory, trust_pickle=trust_pickle, import_paths=import_paths)
    if loaded.form == "exported_program":
        raise UsageError(
            f"{model_path}: fold edits nn.Module layers, and a .pt2 ExportedProgram has none; "
            "fold the module before torch.export, or export it to ONNX and run `normsurgeon optimize`"
        )
    model = loaded.model
    notes = list(loaded.notes)
    if model.training:
        if not set_eval:
            raise PreconditionError(
                f"{model_path} was saved in training mode, where BatchNorm uses batch statistics; "
                "pass --eval to fold its test-time (eval-mode) behaviour"
            )
        model.eval()
        notes.append("the model was in training mode; folded its eval-mode behaviour (--eval)")
    inputs = resolve_inputs(model, input_shapes=input_shapes, inputs_file=inputs_file, trust_pickle=trust_pickle)
    report = fold_batchnorm(model, inputs.args, unfoldable="affine" if to_affine else "keep",
                            allow_default_stats=allow_default_stats, atol=atol, rtol=rtol)
    report.notes[:0] = notes + [inputs.description]
    out_path = output or default_output_path(model_path, "folded")
    save_module(report.model, out_path, force=force, protect=[model_path])
    facts = {"model": f"{model_path} ({loaded.form})", "output": str(out_path),
             "folded": str(len(report.changed("folded"))), "skipped": str(len(report.skipped))}
    emit(report, as_json=as_json, title="normsurgeon fold", facts=facts, extra={"output": str(out_path)})
