"""Write results atomically, and never over the input file.

Every output goes to a dot-prefixed temp file in the target's directory, is fsynced, and then
renamed over the target with ``os.replace``: a reader sees the old file or the complete new one,
never a half-written one, and an interrupted write (even Ctrl-C) leaves no temp file behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from normsurgeon.errors import OutputError


def default_output_path(input_path: Path, tag: str, suffix: str | None = None) -> Path:
    """``model.pt`` -> ``model.folded.pt`` for tag "folded"; ``suffix`` (".onnx") replaces ".pt"."""
    input_path = Path(input_path)
    if suffix is None:
        suffix = input_path.suffix
    elif suffix and not suffix.startswith("."):
        suffix = "." + suffix
    return input_path.with_name(f"{input_path.stem}.{tag}{suffix}")


def write_atomically(
    path: Path,
    write: Callable[[Path], None],
    *,
    force: bool = False,
    protect: Sequence[Path] = (),
) -> Path:
    """Call ``write(temp_path)``, then move the temp file over ``path``; returns ``path``.

    Refuses (OutputError) to write over any of ``protect`` (the input, even with ``force``), over
    an existing file without ``force``, or into a missing or read-only directory. On any
    exception, KeyboardInterrupt included, the temp file is removed and ``path`` is untouched
    (or, for an interrupt that lands after the rename, is the complete new file).
    """
    path = check_output_path(path, force=force, protect=protect)
    # The temp file's name is chosen before it exists, so that an interrupt at any point after it
    # is created (even inside the call that creates it) finds it and removes it.
    tmp = _temp_name(path)
    try:
        _create(tmp, path)
        write(tmp)
        _fsync(tmp)
        _copy_mode(tmp, path)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise OutputError(f"could not write {path}: {_reason(exc)}; check free space and permissions") from exc
        raise
    _fsync_directory(path.parent)
    return path


def check_output_path(path: Path, *, force: bool = False, protect: Sequence[Path] = ()) -> Path:
    """Raise the OutputError that writing ``path`` would raise, before any slow work is done.

    Commands call it as soon as they know the output path, so a typo in ``-o`` fails in a
    second, not after the work; :func:`write_atomically` checks again when it writes.
    """
    path = Path(path)
    _refuse_protected(path, protect)
    _check_target(path, force=force)
    return path


def save_module(model: nn.Module, path: Path, *, force: bool = False, protect: Sequence[Path] = ()) -> Path:
    """``torch.save(model)`` atomically; parametrized modules get an actionable OutputError."""
    try:
        return write_atomically(path, lambda tmp: torch.save(model, tmp), force=force, protect=protect)
    except OutputError:
        raise
    except Exception as exc:  # torch.save / pickle refused the module
        if _is_parametrized(model):
            raise OutputError(
                f"cannot save {path} as a full module: it has parametrizations (e.g. weight norm) "
                "that torch refuses to pickle; remove weight norm first (normsurgeon weightnorm "
                "remove) or save a state_dict"
            ) from exc
        raise OutputError(
            f"cannot pickle the model to {path} ({type(exc).__name__}: {_flat(exc)}); save it "
            "as a state_dict or export it to .pt2 instead"
        ) from exc


def save_state_dict(
    state_dict: Mapping[str, Any], path: Path, *, force: bool = False, protect: Sequence[Path] = ()
) -> Path:
    """``torch.save(state_dict)`` atomically (an nn.Module is saved as its state_dict)."""
    if isinstance(state_dict, nn.Module):
        state_dict = state_dict.state_dict()
    try:
        return write_atomically(path, lambda tmp: torch.save(state_dict, tmp), force=force, protect=protect)
    except OutputError:
        raise
    except Exception as exc:
        raise OutputError(
            f"cannot save the state_dict to {path} ({type(exc).__name__}: {_flat(exc)}); it must "
            "map names to tensors"
        ) from exc


# --------------------------------------------------------------------------- helpers


def _flat(exc: BaseException, limit: int = 160) -> str:
    """An exception's message on one line, so ours stays one line."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(exc: OSError) -> str:
    """'No space left on device' rather than '[Errno 28] ...: /tmp/.x.tmp'."""
    return _flat(exc.strerror or exc)


def _same_file(a: Path, b: Path) -> bool:
    """True when a and b name the same file (symlinks and hard links included)."""
    with contextlib.suppress(OSError):
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _refuse_protected(path: Path, protect: Sequence[Path]) -> None:
    for protected in protect:
        if _same_file(path, Path(protected)):
            raise OutputError(
                f"refusing to write {path}: it is the input file {protected}, which is never "
                "overwritten (not even with --force); choose another output path with -o"
            )


def _check_target(path: Path, *, force: bool) -> None:
    parent = path.parent
    if not parent.exists():
        raise OutputError(
            f"cannot write {path}: directory {parent} does not exist; create it or choose another path with -o"
        )
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: {parent} is not a directory; choose another path with -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: directory {parent} is not writable; choose another path with -o")
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a directory; pass a file path with -o")
    if path.exists() and not force:
        raise OutputError(f"{path} exists; pass --force to overwrite")


def _temp_name(path: Path) -> Path:
    """A dot-file beside ``path`` with 64 random bits in its name (so no other writer picks it)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def _create(tmp: Path, path: Path) -> None:
    """Create ``tmp`` empty and private (0600, like mkstemp); never opens an existing file."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {_reason(exc)}; check the directory's permissions") from exc
    os.close(fd)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_directory(directory: Path) -> None:
    """Persist the rename; best effort (not every platform can open a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _copy_mode(tmp: Path, target: Path) -> None:
    """mkstemp makes 0600 files: give the output the old file's mode, or the umask default."""
    if target.exists():
        mode = target.stat().st_mode & 0o7777
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    os.chmod(tmp, mode)


def _is_parametrized(model: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m) for m in model.modules())
