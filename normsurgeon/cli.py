"""The ``normsurgeon`` command line: the group, its Ctrl-C watcher and the commands it registers.

Each command is a file in ``normsurgeon/commands/``; what they share (options, error handling,
output) is :mod:`normsurgeon.cli_options`, and their common flow :mod:`normsurgeon.commands.common`.

Exit codes: 0 done and checked; 1 unexpected normsurgeon error; 2 usage; 3 unreadable input;
4 unsafe pickle refused; 5 model not in a state the command can work on; 6 numerical check
failed; 7 export failed; 8 output not written; 130 interrupted. See docs/errors.md.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from typing import Any, Iterator

import click

from .cli_options import INTERRUPTED, stderr_console
from .interrupt import cli_import_interruptible

__all__ = ["INTERRUPTED", "main"]


class NormSurgeonGroup(click.Group):
    """The top-level group: click's own usage errors follow normsurgeon's convention too.

    Click prints a usage block and ``Error: ...`` over several lines; normsurgeon prints one line,
    ``error: <what>; see 'normsurgeon CMD --help'``, and exits 2 (docs/errors.md).
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        """In the order they were added (the order of a workflow), not alphabetical."""
        return list(self.commands)

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        prog_name = prog_name or "normsurgeon"
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        with _watching_for_ctrl_c() as seen:
            try:
                result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            except click.ClickException as error:
                stderr_console.print(f"error: {_click_message(error)}", markup=False)
                sys.exit(error.exit_code)
            except (click.Abort, KeyboardInterrupt):  # Ctrl-C while click parses, or while a command imports
                stderr_console.print(INTERRUPTED, markup=False)
                sys.exit(130)
            except Exception:
                if seen:  # a Ctrl-C inside an extension's import surfaces as its ImportError
                    stderr_console.print(INTERRUPTED, markup=False)
                    sys.exit(130)
                raise
        sys.exit(result if isinstance(result, int) else 0)


@contextlib.contextmanager
def _watching_for_ctrl_c() -> Iterator[list[bool]]:
    """A list that gets an entry when SIGINT arrives; Python's own handler still raises KeyboardInterrupt.

    The previous handler comes back on exit, so ``main()`` called again in one process watches again.
    """
    seen: list[bool] = []

    def on_sigint(signum: int, frame: Any) -> None:
        seen.append(True)
        signal.default_int_handler(signum, frame)

    previous = None
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        try:
            previous = signal.signal(signal.SIGINT, on_sigint)
        except ValueError:  # not the main thread: no handler to install
            pass
    try:
        yield seen
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _click_message(error: click.ClickException) -> str:
    """'Missing option '--to'.' -> "missing option '--to'; see 'normsurgeon convert --help'"."""
    message = " ".join(error.format_message().split()).rstrip(".")
    if message[:1].isupper() and message[1:2].islower():
        message = message[0].lower() + message[1:]
    ctx = getattr(error, "ctx", None)
    if isinstance(error, click.UsageError) and ctx is not None:
        message += f"; see '{ctx.command_path} --help'"
    return message


@click.group(cls=NormSurgeonGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="normsurgeon")
def main() -> None:
    """Surgery on the normalization layers of trained PyTorch models.

    Every command prints what it changed, what it skipped and why, and a numerical check of the
    result against the original model; --json prints the same as JSON. MODEL is a pickled
    nn.Module (torch.save(model)), a state_dict with --factory, or a .pt2 ExportedProgram.
    The input file is never changed; outputs are written atomically.

    Errors are one line, 'error: <what>; <fix>'. Exit codes: 0 done and checked, 2 usage,
    3 unreadable file, 4 unsafe pickle refused, 5 model not ready (e.g. training mode),
    6 numerical check failed, 7 export failed, 8 output not written, 130 interrupted
    (docs/errors.md). Run 'normsurgeon COMMAND --help' for a command's options and examples.
    """


def _register_commands() -> None:
    with cli_import_interruptible():  # the commands import onnx, onnxruntime, rich ...
        from .commands import COMMANDS
    for command in COMMANDS:
        main.add_command(command)


_register_commands()
