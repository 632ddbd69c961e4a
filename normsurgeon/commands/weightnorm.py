"""``normsurgeon weightnorm apply|remove``: add weight norm to a model, or bake it into plain weights."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
import torch

from ..cli_options import emit, input_options, model_options, output_options, weights_option
from ..errors import LoadError, PreconditionError, UsageError
from ..streaming import StreamedSurgery
from .common import ModelArgs, model_command, open_model
from .streamed import refuse_full_check_alone, run_streamed, stream_options

_LAYER_TYPES_HELP = ("Layer type to weight-norm (repeatable; default all): conv1d, conv2d, conv3d, "
                     "convtranspose1d, convtranspose2d, convtranspose3d, linear.")


@click.group(short_help="Apply weight norm, or bake it into plain weights.")
def weightnorm() -> None:
    """Apply weight normalization (w = g·v/‖v‖) to a model, or remove it again.

    \b
    Examples:
      normsurgeon weightnorm remove generator.pt                  # a bare state_dict: plain keys out
      normsurgeon weightnorm remove ckpt.pt --factory mymodels:build_generator
      normsurgeon weightnorm apply model.pt --init-data batch.pt --input-shape 8,3,32,32
      normsurgeon weightnorm remove wav2vec2-folder/          # save_pretrained: a folder where it reloads the same
      normsurgeon weightnorm apply timm:resnet18 --weights w.safetensors
    """


@weightnorm.command("apply", short_help="Weight-norm conv/linear layers; writes a state_dict.")
@model_options
@weights_option
@input_options
@output_options(default="MODEL.weightnorm.pt beside MODEL (a state_dict)")
@click.option("--init-data", type=click.Path(path_type=Path), metavar="FILE|DIR",
              help="Data for the data-dependent init (Salimans & Kingma 2016): a .pt/.npz tensor file or a folder of them.")
@click.option("--mean-only-bn", is_flag=True,
              help="Replace BatchNorms right after weight-normed layers by mean-only BatchNorm (needs example inputs; warns with the measured change).")
@click.option("--layer-type", "layer_types", multiple=True, metavar="TYPE", help=_LAYER_TYPES_HELP)
@model_command
def apply(args: ModelArgs, init_data: Path | None, mean_only_bn: bool, layer_types: tuple[str, ...]) -> None:
    """Weight-norm the conv / conv-transpose / linear layers of MODEL; writes a state_dict.

    torch cannot pickle a weight-normed module, so the output (MODEL.weightnorm.pt) is a
    state_dict; the report says how to load it. A save_pretrained folder also gives a state_dict
    file (FOLDER.weightnorm.pt): its class does not build the weight-norm tensors, so a folder
    would not reload them. Without --init-data the model computes exactly what it did, checked
    on the example inputs (or layer by layer without them).

    \b
    Examples:
      normsurgeon weightnorm apply model.pt --input-shape 8,3,32,32
      normsurgeon weightnorm apply model.pt --init-data batch.pt --input-shape 8,3,32,32
      normsurgeon weightnorm apply model.pt --layer-type conv2d --layer-type linear
    """
    from ..io.pretrained_output import DoesNotRoundTrip, wants_directory
    from ..io.saving import save_state_dict
    from ..passes.weight_norm import SUPPORTED_LAYER_TYPES, apply_weight_norm, resolve_layer_types

    types = resolve_layer_types(layer_types or SUPPORTED_LAYER_TYPES)
    opened = open_model(args, "weightnorm apply", reads=(init_data,))
    inputs = opened.example_inputs(optional=True)
    if args.output is not None and wants_directory(args.output, opened.loaded.form):
        raise DoesNotRoundTrip(args.output, _not_reloadable(opened.model))
    out_path = opened.output_file("weightnorm")
    report = apply_weight_norm(opened.model, init_data=init_data, mean_only_bn=mean_only_bn, layer_types=types,
                               example_inputs=inputs, trust_pickle=args.trust_pickle)
    if opened.loaded.form == "pretrained_dir":
        report.notes.append("wrote a state_dict file, not a save_pretrained directory: "
                            + _not_reloadable(opened.model))
    save_state_dict(report.model.state_dict(), out_path, force=args.force, protect=opened.reads)
    opened.emit(report, title="normsurgeon weightnorm apply", facts={"output": f"{out_path} (state_dict)"},
                extra={"output": str(out_path), "output_form": "state_dict"})


@weightnorm.command("remove", short_help="Bake weight norm into plain weights.")
@model_options
@weights_option
@input_options
@output_options(default="MODEL.plain.pt beside MODEL; a save_pretrained folder gives FOLDER.plain/ where it reloads the same")
@stream_options
@model_command
def remove(args: ModelArgs, stream: bool, full_check: bool) -> None:
    """Bake weight norm (parametrizations or the old weight_g/weight_v hooks) into plain weights.

    A bare state_dict (no --factory) is rewritten into plain '<layer>.weight' keys that load
    into the architecture built without weight norm. With --factory, or for a pickled module,
    the output is a plain, picklable module. Writes MODEL.plain.pt. A save_pretrained folder is
    checked on inputs inferred from its config and written back as a folder (FOLDER.plain/) only
    where from_pretrained reloads it the same; a class that weight-norms its layers when it is
    built does not (it would re-apply weight norm and drop the plain weights), so that model is
    written as FOLDER.plain.pt with a note, and -o DIR is refused. --stream (one block at a time)
    writes only a folder, so it refuses such a class with that reason.

    \b
    Examples:
      normsurgeon weightnorm remove generator.pt                  # a bare state_dict: plain keys out
      normsurgeon weightnorm remove ckpt.pt --factory mymodels:build_generator
      normsurgeon weightnorm remove wav2vec2-folder/
    """
    from ..passes.weight_norm import remove_weight_norm

    refuse_full_check_alone(stream, full_check)
    if stream:
        job = StreamedSurgery("weightnorm remove", lambda model, inputs: remove_weight_norm(model, example_inputs=inputs),
                              subject="the model without weight norm",
                              require=lambda report: _require_changes(report, args.model_path))
        return run_streamed(args, job, "plain", title="normsurgeon weightnorm remove", facts=lambda report: {},
                            atol=None, rtol=None, full_check=full_check)
    state_dict = None if args.factory or args.weights else _bare_state_dict(args.model_path)
    if state_dict is not None:
        _remove_from_state_dict(args, state_dict)
        return
    opened = open_model(args, "weightnorm remove")
    inputs = opened.example_inputs(optional=True, from_config=True)
    target = opened.output_target("plain")
    report = remove_weight_norm(opened.model, example_inputs=inputs)
    _require_changes(report, args.model_path)
    out_path = opened.write(report, target)
    out_form = "save_pretrained" if out_path.is_dir() else "module"
    opened.emit(report, title="normsurgeon weightnorm remove", facts={"output": f"{out_path} ({out_form})"},
                extra={"output": str(out_path), "output_form": out_form})


def _remove_from_state_dict(args: ModelArgs, state_dict: Mapping[str, torch.Tensor]) -> None:
    """A bare state_dict (no model to run): weight-norm keys rewritten into plain '<layer>.weight' keys."""
    from ..io.saving import check_output_path, default_output_path, files_read, save_state_dict
    from ..passes.weight_norm import remove_weight_norm

    if args.gives_inputs:
        raise UsageError("example inputs need a model: pass --factory to check outputs, or drop --input-shape/--inputs")
    report = remove_weight_norm(state_dict)
    _require_changes(report, args.model_path)
    out_path = args.output or default_output_path(args.model_path, "plain")
    reads = files_read(args.model_path, args.weights, args.inputs_file)
    check_output_path(out_path, force=args.force, protect=reads)
    save_state_dict(report.model, out_path, force=args.force, protect=reads)
    facts = {"model": f"{args.model_path} (state_dict)", "output": f"{out_path} (state_dict)"}
    emit(report, as_json=args.as_json, title="normsurgeon weightnorm remove", facts=facts,
         extra={"output": str(out_path), "output_form": "state_dict"})


def _not_reloadable(model: Any) -> str:
    """Why a weight-normed transformers model is not written as a save_pretrained directory."""
    return (f"{type(model).__name__} does not build the tensors weight norm adds (parametrizations.weight.original0/1), "
            "so from_pretrained would not load them")


def _bare_state_dict(path: Path) -> Mapping[str, torch.Tensor] | None:
    """The file's state_dict when it holds only tensors (read weights-only), else None (a model load_model builds)."""
    from ..io.huggingface import pretrained_dir_of
    from ..io.loading import load_tensors
    from ..io.timm_models import is_timm_spec

    if is_timm_spec(path) or (Path(path).exists() and pretrained_dir_of(Path(path)) is not None):
        return None
    try:
        obj = load_tensors(path)
    except LoadError:  # a pickled module, or something load_model explains better
        return None
    for candidate in (obj, *(obj.get(k) for k in ("state_dict", "model", "model_state_dict") if isinstance(obj, Mapping))):
        if isinstance(candidate, Mapping) and candidate and all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in candidate.items()):
            return candidate
    return None


def _require_changes(report: Any, path: Path) -> None:
    if not report.changes:
        raise PreconditionError(
            f"{path}: has no weight-normed layer (no parametrizations.*.original0/1 or *_g/*_v weights), "
            "so there is nothing to remove; use the file as it is"
        )
