"""The ``normsurgeon`` command line: parse, call the Python API, render the report.

Exit codes: 0 done and checked; 1 unexpected normsurgeon error; 2 usage; 3 unreadable input;
4 unsafe pickle refused; 5 model not in a state the command can work on; 6 numerical check
failed; 7 export failed; 8 output not written; 130 interrupted. See docs/errors.md.
"""

from __future__ import annotations

import functools
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import click
from rich.console import Console

from .errors import NormSurgeonError
from .render import print_report, render_json

_stdout = Console(highlight=False, soft_wrap=True)
_stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def model_options(func: Callable) -> Callable:
    """MODEL argument plus the options that say how to load it."""
    decorators = [
        click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False, path_type=Path)),
        click.option("--factory", metavar="MODULE:CALLABLE",
                     help="Builds the architecture when MODEL is a state_dict; the state_dict is loaded strictly."),
        click.option("--import-path", "import_paths", multiple=True, metavar="DIR",
                     type=click.Path(file_okay=False, path_type=Path),
                     help="Extra directory to import model classes from (the current directory always is). Repeatable."),
        click.option("--trust-pickle", is_flag=True,
                     help="Load pickles that reference more than torch types and nn.Module classes. Runs code from the file: only for files you trust."),
    ]
    return functools.reduce(lambda f, d: d(f), reversed(decorators), func)


def input_options(func: Callable) -> Callable:
    """Options that give the example inputs used for tracing and checking."""
    decorators = [
        click.option("--input-shape", "input_shapes", multiple=True, metavar="SHAPE[:DTYPE]",
                     help="A random example input, e.g. 1,3,224,224 or 1,16:int64. Repeat for several inputs."),
        click.option("--inputs", "inputs_file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.pt",
                     help="A saved tensor, tuple of tensors (positional) or dict (keyword arguments)."),
    ]
    return functools.reduce(lambda f, d: d(f), reversed(decorators), func)


def output_options(func: Callable) -> Callable:
    decorators = [
        click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
                     help="Where to write the result (default: beside MODEL, e.g. model.folded.pt)."),
        click.option("--force", is_flag=True, help="Overwrite an existing output file (never the input)."),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout."),
        click.option("--verbose", is_flag=True, help="Show full tracebacks for errors."),
    ]
    return functools.reduce(lambda f, d: d(f), reversed(decorators), func)


def handle_errors(func: Callable) -> Callable:
    """Turn normsurgeon errors into one line on stderr (or JSON) and the documented exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json, verbose = kwargs.get("as_json", False), kwargs.get("verbose", False)
        try:
            return func(*args, **kwargs)
        except NormSurgeonError as error:
            if verbose:
                _stderr.print(traceback.format_exc(), markup=False)
            if as_json:
                click.echo(render_json({"error": str(error), "error_type": type(error).__name__, "passed": False}))
            _stderr.print(f"error: {error}", markup=False)
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            _stderr.print("interrupted: nothing was written", markup=False)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="normsurgeon")
def main() -> None:
    """Surgery on the normalization layers of trained PyTorch models.

    Every command prints what it changed, what it skipped and why, and a numerical check of the
    result against the original model; --json prints the same as JSON. MODEL is a pickled
    nn.Module (torch.save(model)), a state_dict with --factory, or a .pt2 ExportedProgram.
    """


def emit(report: Any, *, as_json: bool, title: str, facts: dict[str, str], extra: dict[str, Any]) -> None:
    """Print a report (human or JSON) and exit non-zero when its check failed."""
    if as_json:
        click.echo(render_json({**report.to_dict(), **extra}))
    else:
        print_report(report, _stdout, title=title, facts=facts)
    if not report.passed:
        sys.exit(6)


def _register_commands() -> None:
    from .commands import COMMANDS

    for command in COMMANDS:
        main.add_command(command)


_register_commands()
