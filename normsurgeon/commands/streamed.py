"""``--stream``: a command's surgery on a save_pretrained folder, one decoder block at a time."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from ..cli_options import emit
from ..errors import UsageError
from ..inputs import ExampleInputs
from ..io.huggingface import pretrained_dir_of
from ..io.safetensors_shards import INDEX, SINGLE
from ..io.saving import files_read
from ..report import Report
from ..streaming import StreamedSurgery, stream_surgery
from .common import ModelArgs

stream_option = click.option(
    "--stream", is_flag=True,
    help="Edit a save_pretrained folder (safetensors) one decoder block at a time, never holding the whole model; "
         "writes a save_pretrained folder with the same shards, each block checked on carried activations.")
full_check_option = click.option(
    "--full-check", is_flag=True,
    help="With --stream: also load the original and the written folder whole and compare their outputs "
         "(needs memory for both models).")


def stream_options(command: Callable) -> Callable:
    """--stream and --full-check."""
    return stream_option(full_check_option(command))


def refuse_full_check_alone(stream: bool, full_check: bool) -> None:
    if full_check and not stream:
        raise UsageError("--full-check checks a --stream run; add --stream, or drop --full-check (without --stream "
                         "the whole model is always checked)")


def run_streamed(args: ModelArgs, job: StreamedSurgery, tag: str, *, title: str,
                 facts: Callable[[Report], dict[str, str]], atol: float | None, rtol: float | None,
                 full_check: bool) -> None:
    """``job`` on the folder MODEL names, written to ``-o`` or FOLDER.<tag>/; the report printed (exit 6 on a
    failed check)."""
    folder = _streamable_folder(args)
    output = args.output or folder.with_name(f"{folder.name}.{tag}")
    if output.suffix in (".pt", ".pth", ".pt2", ".onnx", ".safetensors", ".bin"):
        raise UsageError(f"-o {output}: --stream writes a save_pretrained folder; name a folder, or drop --stream "
                         "to write a file")
    described: list[str] = []

    def make_inputs(model: object) -> ExampleInputs:
        from ..io.inputs import resolve_inputs

        inputs = resolve_inputs(model, input_shapes=args.input_shapes, inputs_file=args.inputs_file,
                                trust_pickle=args.trust_pickle)
        described.append(inputs.description)
        return inputs

    protect = files_read(folder, args.inputs_file)
    report = stream_surgery(folder, output, job, make_inputs, force=args.force, protect=protect,
                            progress=not args.as_json, atol=atol, rtol=rtol, full_check=full_check)
    report.notes[:0] = described
    emit(report, as_json=args.as_json, title=title,
         facts={"model": f"{args.model_path} (save_pretrained folder, streamed)", "output": str(output), **facts(report)},
         extra={"output": str(output)})


def _streamable_folder(args: ModelArgs) -> Path:
    """The save_pretrained folder with safetensors weights that MODEL names; --stream refused for anything else."""
    for option, value in (("--factory", args.factory), ("--config", args.config), ("--weights", args.weights)):
        if value:
            raise UsageError(f"--stream reads a save_pretrained folder as it is; drop {option} or drop --stream")
    if args.set_eval:
        raise UsageError("--stream builds the model in eval mode already; drop --eval")
    folder = pretrained_dir_of(args.model_path)
    if folder is None or not ((folder / INDEX).is_file() or (folder / SINGLE).is_file()):
        raise UsageError(f"{args.model_path}: --stream works on a save_pretrained folder with safetensors weights "
                         f"(config.json and {SINGLE} or {INDEX}); drop --stream for other models")
    return folder
