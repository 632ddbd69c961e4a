"""Ctrl-C while normsurgeon imports its heavy dependencies: the CLI's one line, a program's own exception.

A leaf module (standard library only), so that the package facade and the CLI can both use it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


def started_as_the_cli() -> bool:
    """Whether this process is the ``normsurgeon`` command starting (script or ``python -m``)."""
    program = os.path.basename(sys.argv[0]) if sys.argv else ""
    return program == "normsurgeon" or program == "-m"  # "-m" while python -m imports the package


@contextlib.contextmanager
def cli_import_interruptible() -> Iterator[None]:
    """Imports of torch, onnx, onnxruntime take seconds: a Ctrl-C then is the CLI's, not a crash.

    Started as the ``normsurgeon`` command, it prints one line and exits 130; a program that
    imports normsurgeon keeps its own KeyboardInterrupt.
    """
    try:
        yield
    except KeyboardInterrupt:
        if not started_as_the_cli():
            raise
        sys.stderr.write("interrupted: nothing was read or written\n")
        raise SystemExit(130) from None
