"""The flow every model command shares: load, refuse what it cannot work on, --eval, inputs, output, emit.

A command body reads::

    @model_command
    def fold(args: ModelArgs, to_affine: bool, ...) -> None:
        opened = open_model(args, "fold", eval_mode=FOLD_EVAL)
        target = opened.output_target("folded")
        report = run_fold(..., opened.model, opened.example_inputs())
        path = opened.write(report, target)
        opened.emit(report, title="normsurgeon fold", facts={"output": str(path)}, extra={"output": str(path)})

so the error texts, the notes a report starts with and the files a command must never overwrite
are the same for every command.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import click

from ..cli_options import emit, handle_errors
from ..errors import PreconditionError, UsageError
from ..inputs import ExampleInputs
from ..io.loading import LoadedModel, load_model
from ..io.pretrained_output import OutputTarget, output_target, write_model
from ..io.saving import check_output_path, default_output_path, files_read
from ..report import Report


@dataclass(frozen=True)
class ModelArgs:
    """The options every model command shares (model_options, weights_option, input_options, output_options)."""

    model_path: Path
    factory: str | None = None
    config: Path | None = None
    import_paths: tuple[Path, ...] = ()
    trust_pickle: bool = False
    weights: Path | None = None
    input_shapes: tuple[str, ...] = ()
    inputs_file: Path | None = None
    output: Path | None = None
    force: bool = False
    as_json: bool = False
    verbose: bool = False
    set_eval: bool = False

    @property
    def gives_inputs(self) -> bool:
        """Whether --input-shape or --inputs was given."""
        return bool(self.input_shapes or self.inputs_file)


_SHARED = frozenset(f.name for f in fields(ModelArgs))


def model_command(body: Callable[..., None]) -> Callable[..., None]:
    """A command body that takes the shared options as one :class:`ModelArgs`, then its own; errors handled."""

    @functools.wraps(body)
    def command(**options: Any) -> None:
        shared = {name: options.pop(name) for name in _SHARED & options.keys()}
        return body(ModelArgs(**shared), **options)

    return handle_errors(command)


def eval_option(help: str) -> Callable[[Callable], Callable]:
    """--eval: put a model saved in training mode into eval mode first (``help`` says why for this command)."""
    return click.option("--eval", "set_eval", is_flag=True, help=help)


@dataclass(frozen=True)
class EvalMode:
    """How a command that works on eval-mode behaviour words ``--eval``."""

    refusal: str  # without --eval, after "<MODEL> was saved in training mode"
    note: str  # with --eval, after "the model was in training mode; "


def exported_program_refusal(path: Path, command: str) -> UsageError:
    """The one refusal of a .pt2 by a command that needs nn.Module layers (``command``: "convert", "fold --affine")."""
    return UsageError(f"{path}: {command} needs nn.Module layers, which a .pt2 ExportedProgram does not have; "
                      "pass the nn.Module it was exported from (or its state_dict with --factory)")


@dataclass
class OpenedModel:
    """A command's model, loaded and checked, with the notes its report starts with and the files it reads."""

    args: ModelArgs
    loaded: LoadedModel
    notes: list[str]
    reads: list[Path]  # never overwritten by -o
    inputs: ExampleInputs | None = None

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def described(self) -> str:
        """MODEL and its form, the report's first fact."""
        return f"{self.args.model_path} ({self.loaded.form})"

    def example_inputs(self, *, optional: bool = False, from_config: bool = False) -> ExampleInputs | None:
        """The inputs --input-shape/--inputs give, else inferred; ``optional``: None unless given (or, with
        ``from_config``, a save_pretrained or timm model's config gives them)."""
        from ..io.inputs import resolve_inputs

        by_config = from_config and self.loaded.form in ("pretrained_dir", "timm", "safetensors+config")
        if optional and not (self.args.gives_inputs or by_config):
            return None
        self.inputs = resolve_inputs(self.model, input_shapes=self.args.input_shapes,
                                     inputs_file=self.args.inputs_file, trust_pickle=self.args.trust_pickle)
        return self.inputs

    def output_target(self, tag: str) -> OutputTarget:
        """``-o`` or MODEL.<tag>.pt (a folder for a save_pretrained model), checked before any work."""
        default = default_output_path(self.args.model_path, tag)
        return output_target(self.args.output, self.loaded.form, default, force=self.args.force, protect=self.reads)

    def output_file(self, default: str | Path) -> Path:
        """``-o`` or the default file, checked before any work; ``default``: a path, or a tag ("recalibrated":
        MODEL.recalibrated.pt)."""
        if isinstance(default, str):
            default = default_output_path(self.args.model_path, default)
        return check_output_path(self.args.output or default, force=self.args.force, protect=self.reads)

    def write(self, report: Report, target: OutputTarget) -> Path:
        """Write ``report.model`` to ``target`` (a folder only where it reloads the same); the path written."""
        return write_model(report, self.inputs if self.inputs is not None else (), target, force=self.args.force,
                           protect=self.reads)

    def annotate(self, report: Report) -> None:
        """Put the load notes, the --eval note and where the inputs came from first in the report's notes."""
        report.notes[:0] = [*self.notes, *([self.inputs.description] if self.inputs is not None else [])]

    def emit(self, report: Report, *, title: str, facts: dict[str, str], extra: dict[str, Any]) -> None:
        """Annotate and print the report (MODEL first among the facts); exit 6 when its check failed."""
        self.annotate(report)
        emit(report, as_json=self.args.as_json, title=title, facts={"model": self.described, **facts}, extra=extra)


def open_model(args: ModelArgs, command: str | None, *, eval_mode: EvalMode | None = None,
               reads: tuple[Path | None, ...] = ()) -> OpenedModel:
    """Load MODEL; refuse a .pt2 where ``command`` needs nn.Module layers (None: a .pt2 is fine); with
    ``eval_mode``, refuse a model in training mode unless --eval put it in eval mode. ``reads``: further
    files the command reads (never overwritten)."""
    loaded = load_model(args.model_path, factory=args.factory, trust_pickle=args.trust_pickle,
                        import_paths=args.import_paths, weights=args.weights, config=args.config)
    exported = loaded.form == "exported_program"
    if exported and command is not None:
        raise exported_program_refusal(args.model_path, command)
    notes = list(loaded.notes)
    if eval_mode is not None and not exported and loaded.model.training:
        if not args.set_eval:
            raise PreconditionError(f"{args.model_path} was saved in training mode{eval_mode.refusal}")
        loaded.model.eval()
        notes.append(f"the model was in training mode; {eval_mode.note}")
    reads_too = files_read(args.model_path, args.weights, args.config, args.inputs_file, *reads)
    return OpenedModel(args, loaded, notes, reads_too)
