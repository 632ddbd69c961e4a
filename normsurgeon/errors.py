"""The errors normsurgeon raises on purpose, and the exit code the CLI gives each.

Every error carries a one-line message that names the problem and the fix. The CLI prints
``error: <message>`` and exits with the class's ``exit_code``; anything else is a bug.
"""

from __future__ import annotations

import re


class NormSurgeonError(Exception):
    """Base class: a problem with the user's input or model that normsurgeon explains."""

    exit_code = 1


class UsageError(NormSurgeonError):
    """Options that contradict each other or are missing (e.g. no example inputs)."""

    exit_code = 2


class LoadError(NormSurgeonError):
    """A file could not be read as a model, checkpoint or tensor file."""

    exit_code = 3


class UnsafePickleError(LoadError):
    """A pickle references callables outside the allowlist; nothing was executed."""

    exit_code = 4


class PreconditionError(NormSurgeonError):
    """The model is not in a state the pass can work on (e.g. training mode)."""

    exit_code = 5


class VerificationError(NormSurgeonError):
    """The transformed model does not match the original within tolerance."""

    exit_code = 6


class ExportError(NormSurgeonError):
    """A model could not be exported (to ONNX)."""

    exit_code = 7


class OutputError(NormSurgeonError):
    """An output file could not be written (exists, unwritable directory, ...)."""

    exit_code = 8


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colour codes (the exporter colours its messages)


def first_line(exc: BaseException, limit: int = 200, *, named: bool = False) -> str:
    """An exception's message as one line for ours: its first non-empty line, colour codes removed, cut
    after the last full sentence (or word) that fits in ``limit``; the class name if it has no message.

    ``named`` puts the class name first (``"RuntimeError: shapes cannot be multiplied"``), the way
    an error that wraps a user model's failure quotes it.
    """
    text = _ANSI.sub("", str(exc))
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = _shorten(line, limit)
    if not line:
        return type(exc).__name__
    return f"{type(exc).__name__}: {line}" if named else line


def _shorten(line: str, limit: int) -> str:
    """``line`` if it fits in ``limit``, else up to its last sentence end or word, then " ..."."""
    if len(line) <= limit:
        return line
    sentence = line[:limit].rfind(". ")
    if sentence > limit // 2:
        return line[: sentence + 1]
    room = line[: limit - 3]  # for " ..."
    word = room.rfind(" ")
    return (room[:word] if word > limit // 2 else room[:-1]).rstrip() + " ..."


EXIT_CODES: dict[str, int] = {
    cls.__name__: cls.exit_code
    for cls in (
        NormSurgeonError,
        UsageError,
        LoadError,
        UnsafePickleError,
        PreconditionError,
        VerificationError,
        ExportError,
        OutputError,
    )
}
