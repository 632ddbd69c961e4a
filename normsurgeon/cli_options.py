"""What the commands share at the CLI edge: option decorators, help texts, error handling and output.

Everything a command needs from the command line lives here, below the commands (which never
import :mod:`normsurgeon.cli`): the group in cli.py registers them.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import click
from rich.console import Console

from .errors import LoadError, NormSurgeonError
from .render import print_report, render_json, report_console

stderr_console = Console(stderr=True, highlight=False, soft_wrap=True)


def model_options(func: Callable) -> Callable:
    """MODEL argument plus the options that say how to load it."""
    decorators = [
        # No exists/dir_okay checks here: the loader explains a missing file or a folder in one line (exit 3).
        click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path)),  # a file, a folder or timm:NAME
        click.option("--factory", metavar="MODULE:CALLABLE",
                     help="The function that builds the architecture when MODEL is a state_dict, e.g. "
                          "mypkg.nets:resnet50; the weights must fit it exactly."),
        click.option("--config", "config", type=click.Path(path_type=Path), metavar="DIR",
                     help="When MODEL is a .safetensors file of a transformers model: the folder holding its "
                          "config.json (or the file itself); the architecture is built from it offline and the "
                          "weights must fit it exactly."),
        click.option("--import-path", "import_paths", multiple=True, metavar="DIR",
                     type=click.Path(file_okay=False, path_type=Path),
                     help="Extra directory to import model classes from (the current directory always is). Repeatable."),
        click.option("--trust-pickle", is_flag=True,
                     help="Load pickles that reference more than torch types and nn.Module classes. Runs code from the file: only for files you trust."),
    ]
    return functools.reduce(lambda f, d: d(f), reversed(decorators), func)


def weights_option(func: Callable) -> Callable:
    """--weights: the weights file of a MODEL given as timm:NAME."""
    return click.option("--weights", type=click.Path(path_type=Path), metavar="FILE",
                        help="With MODEL timm:NAME: the weights (safetensors, or a state_dict saved with torch.save, "
                             "read tensors-only). Nothing is downloaded.")(func)


def input_options(func: Callable) -> Callable:
    """Options that give the example inputs used for tracing and checking."""
    decorators = [
        click.option("--input-shape", "input_shapes", multiple=True, metavar="SHAPE[:DTYPE]",
                     help="A random example input, e.g. 1,3,224,224 or 1,16:int64. Repeat for several inputs."),
        click.option("--inputs", "inputs_file", type=click.Path(path_type=Path), metavar="FILE.pt",
                     help="A saved tensor, tuple of tensors (positional) or dict (keyword arguments)."),
    ]
    return functools.reduce(lambda f, d: d(f), reversed(decorators), func)


def report_options(func: Callable) -> Callable:
    """--json/--verbose: how the report and errors are printed (every command has them)."""
    decorators = [
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout."),
        click.option("--verbose", is_flag=True, help="Show full tracebacks for errors."),
    ]
    return functools.reduce(lambda f, d: d(f), reversed(decorators), func)


def output_options(func: Callable | None = None, *, default: str = "MODEL.out.pt beside MODEL") -> Callable:
    """-o/--force/--json/--verbose; ``@output_options(default="MODEL.folded.pt")`` names the default output."""

    def decorate(f: Callable) -> Callable:
        decorators = [
            # No dir_okay check: an existing folder as -o is an OutputError (exit 8) like any unwritable path.
            click.option("-o", "--output", type=click.Path(path_type=Path), metavar="FILE",
                         help=f"Where to write the result (default: {default})."),
            click.option("--force", is_flag=True, help="Overwrite an existing output file (never the input)."),
            report_options,
        ]
        return functools.reduce(lambda g, d: d(g), reversed(decorators), f)

    return decorate(func) if func is not None else decorate


class _Tolerance(click.FloatRange):
    name = "float"  # shown as FLOAT [x>=0], not FLOAT RANGE


TOLERANCE = _Tolerance(min=0)
ATOL_HELP = "Absolute tolerance of the check (default by dtype; fp32: 1e-5)."
RTOL_HELP = "Tolerance of the check relative to max|output| (default by dtype; fp32: 1e-4)."


def tolerance_options(func: Callable) -> Callable:
    """--atol/--rtol: the tolerances of the command's numerical check (None: the dtype's defaults)."""
    decorators = [click.option("--atol", type=TOLERANCE, help=ATOL_HELP),
                  click.option("--rtol", type=TOLERANCE, help=RTOL_HELP)]
    return functools.reduce(lambda f, d: d(f), reversed(decorators), func)


def handle_errors(func: Callable) -> Callable:
    """Turn normsurgeon errors into one line on stderr (or JSON) and the documented exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json, verbose = kwargs.get("as_json", False), kwargs.get("verbose", False)
        try:
            return func(*args, **kwargs)
        except (NormSurgeonError, RecursionError, MemoryError) as caught:
            error = caught if isinstance(caught, NormSurgeonError) else resource_error(caught)
            if verbose:
                stderr_console.print(traceback.format_exc(), markup=False)
            if as_json:
                click.echo(render_json({"error": str(error), "error_type": type(error).__name__, "passed": False}))
            stderr_console.print(f"error: {error}", markup=False)
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            stderr_console.print(INTERRUPTED, markup=False)
            sys.exit(130)

    return wrapper


# The modules that read files: a RecursionError or MemoryError whose innermost normsurgeon frame is in one
# of them came from a file that is too deep or too big.
_READERS = frozenset({"loading.py", "data.py", "inputs.py", "strict_unpickler.py", "pickle_safety.py", "verdict.py",
                      "pt2_safety.py", "static_lookup.py", "runtime.py"})


def resource_error(exc: BaseException) -> NormSurgeonError:
    """A RecursionError or MemoryError as one line: a LoadError naming the file when it came from reading one.

    Reading means the innermost normsurgeon frame on the traceback is in one of the modules that read
    files (normsurgeon/io/loading.py, data.py, inputs.py, the pickle checks; onnx/runtime.py); the file
    is the ``path`` (or ``source``) argument of the innermost such frame that has one. Anywhere else
    (running or editing the model) it is a plain NormSurgeonError (exit 1).
    """
    reading, file = False, None
    tb = exc.__traceback__
    while tb is not None:  # outermost to innermost: what counts is the last normsurgeon frame
        frame = tb.tb_frame
        filename = frame.f_code.co_filename.replace(os.sep, "/")
        if "/normsurgeon/" in filename:
            reading = filename.rsplit("/", 1)[-1] in _READERS and "/normsurgeon/io/" in filename or \
                filename.endswith("/normsurgeon/onnx/runtime.py")
            for name in ("path", "source", "inputs_file", "data_path") if reading else ():
                value = frame.f_locals.get(name)
                if isinstance(value, (str, Path)):
                    file = value
                    break
        tb = tb.tb_next
    recursion = isinstance(exc, RecursionError)
    if reading:
        where = f"{file}" if file is not None else "an input file"
        if recursion:
            return LoadError(f"{where}: nested too deeply to read (RecursionError; a hostile or corrupt file?); "
                             "re-save it")
        return LoadError(f"{where}: reading it needs more memory than there is (MemoryError; a hostile or corrupt "
                         "file?); re-save it, or pass a smaller file")
    if recursion:
        return NormSurgeonError("the model or its inputs are nested too deeply to process (RecursionError); "
                                "pass a flatter model or inputs")
    return NormSurgeonError("ran out of memory (MemoryError) while processing the model; free memory, or pass a "
                            "smaller model or smaller inputs")


INTERRUPTED = "interrupted: the input is unchanged, and the output was written completely or not at all"



def emit(report: Any, *, as_json: bool, title: str, facts: dict[str, str], extra: dict[str, Any]) -> None:
    """Print a report (human or JSON); when its check failed, one ``error:`` line too, and exit 6."""
    if as_json:
        click.echo(render_json({**report.to_dict(), **extra}))
    else:
        print_report(report, report_console(highlight=False, soft_wrap=True), title=title, facts=facts)
    if not report.passed:
        stderr_console.print(f"error: {failed_check_message(report)}", markup=False)
        sys.exit(6)


def failed_check_message(report: Any) -> str:
    """One line for a report whose numerical check failed: which check, which output, by how much."""
    check = next((c for c in report.checks if not c.passed), None)
    if check is None:
        return "the numerical check failed; see the report above"
    output = next((o for o in check.outputs if not o.passed), None)
    where = f" on output {output.name!r}" if output is not None else ""
    if output is not None and output.detail:  # it did not run (e.g. onnxruntime refused the inputs)
        detail = " ".join(output.detail.split())
        detail = detail if len(detail) <= 200 else detail[:197] + "..."
        return f"check '{check.label}' failed{where} ({detail}); see the report above"
    return (f"check '{check.label}' failed{where} (max|diff| {check.max_abs_diff:.3g} > {check.atol:g} + "
            f"{check.rtol:g}*max|output|); see the report above, and loosen --atol/--rtol only if the "
            "difference is expected")


TARGETS = ("portable", "ort", "ort-cpu")  # normsurgeon.onnx.optimize.Target's values (not imported: keeps --help fast)
target_option = click.option(
    "--target", type=click.Choice(TARGETS), default="portable", show_default=True,
    help="portable: standard ONNX ops only, for any runtime. ort: also onnxruntime's fused norm ops "
         "(SimplifiedLayerNormalization below opset 23, LayerNormalization below 17, and each residual "
         "Add + norm as com.microsoft SkipLayerNormalization / SkipSimplifiedLayerNormalization: for CUDA). "
         "ort-cpu: the fused norms without the Skip pairs, which onnxruntime's CPU kernels run 2-6x slower "
         "(a residual Add read by a norm alone is written as Sum, which onnxruntime's own fusion leaves).")
