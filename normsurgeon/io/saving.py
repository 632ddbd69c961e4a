"""Write results atomically, never over a file the command reads, and never leave a temp file.

What :func:`write_atomically` guarantees:

* **Refusals** (:class:`~normsurgeon.errors.OutputError`, before anything is written): a target that
  is one of ``protect`` (every file the command reads: MODEL, ``--inputs``, ``--data``,
  ``--init-data``; a folder protects each file in it), also when the two names are a symlink or a
  hard link to each other, even with ``force``; an existing target that is not a regular file (a
  fifo, a character or block device, a socket, also behind a symlink), even with ``force``; an
  existing target without ``force`` (a dangling symlink exists); a missing, non-directory or
  read-only parent directory; a directory as target.
* **Anonymous temp file** (Linux, a file system with ``O_TMPFILE``, /proc mounted): the output is
  written to a nameless file in the target's directory (``open(dir, O_TMPFILE)``); the writer
  gets ``/proc/self/fd/N`` as its path. It has no name until it is complete and fsynced, so an
  exception, Ctrl-C, ``kill -9``, the OOM killer or a power cut before that leaves nothing behind.
* **Never replace without force**: without ``force`` the finished file is hard-linked to the target
  name (``linkat``), which fails if anything appeared under that name meanwhile; that file is left
  as it is and the error says so. With ``force`` it is linked under a random dot-name beside the
  target and renamed over it (``os.replace``): a reader sees the old file or the complete new one.
  Only in the instant between that link and the rename does a named temp exist.
* **Fallback**: where ``O_TMPFILE`` is unsupported (other systems, some file systems, no /proc), and
  for writers that need a real path (:func:`named_temp`, used by the ONNX export's external-data
  files), the output goes to ``.NAME.<64 random bits>.tmp`` beside the target, created with
  ``O_EXCL``, fsynced, then linked (without ``force``) or renamed (with it) into place. It is
  removed on any exception, Ctrl-C included; a ``kill -9``, an OOM kill or a power cut during the
  write can leave it behind. On a file system without hard links, the fallback without ``force``
  checks the target again and renames, so a file that appears in between can be replaced.
* **Full disk**: ENOSPC, EFBIG (a file-size limit) and EDQUOT, also when torch.save reports them as
  a RuntimeError of its stream writer, are one line: ``no space left on device ...; free space or
  choose another path with -o``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from normsurgeon.errors import OutputError, first_line

# errno values that mean "the data does not fit": disk full, file-size limit, quota.
FULL_DISK_ERRNOS = frozenset(e for e in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", None)) if e is not None)
# How torch.save's C++ stream writer reports a write that failed (it keeps no errno).
_TORCH_WRITE_FAILURES = ("file write failed", "failed writing file", "iostream error", "unexpected pos")
# errno values of os.link on a file system that has no hard links.
_NO_HARD_LINKS = frozenset(e for e in (errno.EPERM, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", None),
                                       errno.ENOSYS, errno.EINVAL) if e is not None)


def default_output_path(input_path: Path, tag: str, suffix: str | None = None) -> Path:
    """``model.pt`` -> ``model.folded.pt`` for tag "folded"; ``suffix`` (".onnx") replaces ".pt" (an
    empty tag with a suffix: ``model.onnx``).

    A Hugging Face save_pretrained directory (given as the folder, its config.json or its
    weights) gives ``<folder>.folded.pt`` beside the folder; ``timm:NAME`` gives ``NAME.folded.pt``.
    """
    from .huggingface import pretrained_dir_of
    from .timm_models import PREFIX, is_timm_spec

    if is_timm_spec(input_path):  # timm:NAME -> NAME.folded.pt in the current directory
        input_path, suffix = Path(str(input_path)[len(PREFIX):] + ".pt"), suffix or ".pt"
    input_path = Path(input_path)
    folder = pretrained_dir_of(input_path) if input_path.exists() else None
    if folder is not None:
        input_path, suffix = folder.with_name(folder.name + ".pt"), suffix or ".pt"
    if suffix is None:
        suffix = input_path.suffix
    elif suffix and not suffix.startswith("."):
        suffix = "." + suffix
    return input_path.with_name(f"{input_path.stem}{'.' + tag if tag else ''}{suffix}")


def files_read(*paths: str | Path | None) -> list[Path]:
    """The ``protect`` list of a command: the paths it reads (MODEL, --inputs, --data ...), Nones dropped."""
    return [Path(p) for p in paths if p is not None]


def write_atomically(
    path: Path,
    write: Callable[[Path], None],
    *,
    force: bool = False,
    protect: Sequence[Path] = (),
) -> Path:
    """Call ``write(temp_path)``, then put the finished file in place at ``path``; returns ``path``.

    See the module docstring for what is guaranteed. ``temp_path`` is ``/proc/self/fd/N`` for an
    anonymous temp file (open it by that path: ``torch.save``, ``torch.export.save``, ``open``,
    ``onnx`` saves all do), or a hidden named file beside ``path`` in the fallback; a writer that
    needs a real directory entry calls :func:`named_temp` on it first. Refuses (OutputError) to
    write over any of ``protect`` (even with ``force``), over an existing file without ``force``,
    over anything that is not a regular file, or into a missing or read-only directory. On any
    exception, KeyboardInterrupt included, the temp file is removed and ``path`` is untouched (or,
    for an interrupt that lands after the rename, is the complete new file).
    """
    path = check_output_path(path, force=force, protect=protect)
    temp = _Temp(path)
    try:
        given = _create(temp)
        write(given)
        _fsync(temp)
        _copy_mode(temp, path)
        _refuse_protected(path, protect)  # again: nothing read may have been moved there meanwhile
        _commit(temp, path, force=force)
    except BaseException as exc:
        _discard(temp)
        if isinstance(exc, OutputError):
            raise
        full = _full_disk(exc)
        if full is not None:
            raise OutputError(f"no space left on device: could not write {path} ({full}); free space or choose "
                              "another path with -o") from exc
        if isinstance(exc, OSError):
            raise OutputError(f"could not write {path}: {_reason(exc)}; check free space and permissions") from exc
        raise
    finally:
        _release(temp)
    _fsync_directory(path.parent)
    return path


def named_temp(tmp: Path) -> Path:
    """A real directory entry for the temp file that :func:`write_atomically` passed as ``tmp``.

    For writers that must rename a file onto the temp (``os.replace(staged, named_temp(tmp))``) or
    that find sibling files through its directory. An anonymous temp file gets a hidden name
    beside the target (which, like the fallback's, a ``kill -9`` can leave behind), and that name
    is what is put in place at the end; a path that already is a name is returned as it is.
    """
    temp = _OPEN.get(str(tmp))
    if temp is None or temp.name is not None:
        return Path(tmp) if temp is None else temp.name  # type: ignore[return-value]
    _link_under_new_name(temp)
    return temp.name  # type: ignore[return-value]


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
            f"cannot pickle the model to {path} ({first_line(exc, 160, named=True)}); save it "
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
            f"cannot save the state_dict to {path} ({first_line(exc, 160, named=True)}); it must "
            "map names to tensors"
        ) from exc


# --------------------------------------------------------------------------- the temp file


@dataclass(eq=False)
class _Temp:
    """The file being written: anonymous (``fd``, in ``dir_fd``) until it has a ``name``."""

    target: Path
    fd: int | None = None  # the O_TMPFILE, while open
    dir_fd: int | None = None  # the target's directory, for linkat
    name: Path | None = None  # its hidden name beside the target, once it has one
    given: str | None = None  # the path the writer got, while registered in _OPEN


_OPEN: dict[str, _Temp] = {}  # the path a writer got -> its temp file, while write_atomically runs


def _anonymous_files_supported() -> bool:
    """O_TMPFILE and a /proc to link it through (Linux); a test can turn it off to try the fallback."""
    return hasattr(os, "O_TMPFILE") and os.link in os.supports_dir_fd and os.path.isdir("/proc/self/fd")


def _create(temp: _Temp) -> Path:
    """Make the empty, private (0600) temp file and return the path the writer gets.

    An anonymous file where the system can make one, else a new dot-file (``O_EXCL``: never an
    existing file). Its name is chosen before it exists, so that an interrupt at any point after
    it is created (even inside the call that creates it) finds it and removes it.
    """
    path = temp.target
    if _anonymous_files_supported():
        try:
            temp.fd = os.open(path.parent, os.O_TMPFILE | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as exc:
            if exc.errno in FULL_DISK_ERRNOS or exc.errno == errno.EACCES:
                raise OutputError(f"cannot write {path}: {_reason(exc)}; check the directory's permissions and "
                                  "free space") from exc
            temp.fd = None  # this file system has no O_TMPFILE (EOPNOTSUPP, EISDIR, EINVAL): the fallback
        if temp.fd is not None:
            flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
            temp.dir_fd = os.open(path.parent, flags)
            temp.given = f"/proc/self/fd/{temp.fd}"
            _OPEN[temp.given] = temp
            return Path(temp.given)
    tmp = _temp_name(path)
    temp.name = tmp
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
    except OSError as exc:
        temp.name = None  # not ours: never remove a file this call did not create
        raise OutputError(f"cannot write {path}: {_reason(exc)}; check the directory's permissions") from exc
    os.close(fd)
    temp.given = str(tmp)
    _OPEN[temp.given] = temp
    return tmp


def _link_under_new_name(temp: _Temp) -> None:
    """Give the anonymous file a hidden name beside the target (a new one: never an existing file)."""
    for _ in range(8):
        name = _temp_name(temp.target)
        try:
            os.link(f"/proc/self/fd/{temp.fd}", name.name, dst_dir_fd=temp.dir_fd, follow_symlinks=True)
        except FileExistsError:
            continue
        temp.name = name
        return
    raise OutputError(f"cannot write {temp.target}: could not name a temp file beside it; choose another path with -o")


def _commit(temp: _Temp, path: Path, *, force: bool) -> None:
    """Put the finished temp file at ``path``: linked (never replacing) without force, renamed with it."""
    if temp.name is None and not force:
        try:  # linkat: atomic, and fails if anything has appeared at path meanwhile
            os.link(f"/proc/self/fd/{temp.fd}", path.name, dst_dir_fd=temp.dir_fd, follow_symlinks=True)
        except FileExistsError:
            raise _appeared(path) from None
        return
    if temp.name is None:
        _link_under_new_name(temp)
    _close(temp)  # from here on the name is the file
    name = temp.name
    assert name is not None
    if force:
        os.replace(name, path)
        return
    try:
        os.link(name, path, follow_symlinks=False)
    except FileExistsError:
        raise _appeared(path) from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if os.path.lexists(path):  # no hard links here: check once more, then rename (documented race)
            raise _appeared(path) from None
        os.replace(name, path)
        return
    with contextlib.suppress(OSError):
        os.unlink(name)
    temp.name = None


def _appeared(path: Path) -> OutputError:
    return OutputError(f"{path} appeared while the output was being written and was left as it is; pass --force "
                       "to overwrite it, or choose another path with -o")


def _close(temp: _Temp) -> None:
    fd, temp.fd = temp.fd, None  # forget it first: an interrupt inside close must not close a reused fd
    if fd is not None:
        os.close(fd)


def _discard(temp: _Temp) -> None:
    """After a failure: the anonymous file vanishes when closed; a named one is removed."""
    with contextlib.suppress(OSError):
        _close(temp)
    name, temp.name = temp.name, None
    if name is not None:
        with contextlib.suppress(OSError):
            name.unlink()


def _release(temp: _Temp) -> None:
    """Close what is still open (the anonymous file once linked, the directory) and unregister."""
    if temp.given is not None:
        _OPEN.pop(temp.given, None)
    with contextlib.suppress(OSError):
        _close(temp)
    dir_fd, temp.dir_fd = temp.dir_fd, None
    if dir_fd is not None:
        with contextlib.suppress(OSError):
            os.close(dir_fd)


def _fsync(temp: _Temp) -> None:
    if temp.name is None and temp.fd is not None:
        os.fsync(temp.fd)
        return
    with open(temp.name, "rb+") as f:  # type: ignore[arg-type]
        os.fsync(f.fileno())


def _fsync_directory(directory: Path) -> None:
    """Persist the rename; best effort (not every platform can open a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _copy_mode(temp: _Temp, target: Path) -> None:
    """The temp file is 0600: give the output the old file's mode, or the umask default."""
    try:
        mode = os.stat(target).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    if temp.name is None and temp.fd is not None:
        os.fchmod(temp.fd, mode)
    else:
        os.chmod(temp.name, mode)  # type: ignore[arg-type]


def _temp_name(path: Path) -> Path:
    """A dot-file beside ``path`` with 64 random bits in its name (so no other writer picks it)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def _full_disk(exc: BaseException) -> str | None:
    """What says the disk (or a size or quota limit) is full in ``exc`` or its causes, or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in FULL_DISK_ERRNOS:
            return _reason(current)
        if isinstance(current, RuntimeError) and any(s in str(current) for s in _TORCH_WRITE_FAILURES):
            return "torch.save stopped part way" + _size_limit_note()
        current = current.__cause__ or current.__context__
    return None


def _size_limit_note() -> str:
    """'; the file-size limit (ulimit -f) is 65536 bytes' where one is set (torch's error keeps no errno)."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, AttributeError, OSError, ValueError):
        return ""
    return "" if limit == resource.RLIM_INFINITY else f"; the file-size limit (ulimit -f) is {limit} bytes"


# --------------------------------------------------------------------------- checks


def _reason(exc: OSError) -> str:
    """'No space left on device' rather than '[Errno 28] ...: /tmp/.x.tmp'."""
    return exc.strerror or first_line(exc, 160)


def _same_file(a: Path, b: Path) -> bool:
    """True when a and b name the same file (symlinks and hard links included)."""
    with contextlib.suppress(OSError):
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    with contextlib.suppress(OSError, RuntimeError):
        return a.resolve() == b.resolve()
    return os.path.abspath(a) == os.path.abspath(b)


def _protected_files(protect: Iterable[Path | None]) -> Iterable[Path]:
    """Each path to protect; a folder (``--data DIR``) protects every file in it too."""
    for protected in protect:
        if protected is None:
            continue
        protected = Path(protected)
        yield protected
        if protected.is_dir():
            with contextlib.suppress(OSError):
                yield from (p for p in protected.iterdir() if not p.is_dir())


def _refuse_protected(path: Path, protect: Sequence[Path]) -> None:
    for protected in _protected_files(protect):
        if _same_file(path, protected):
            raise OutputError(
                f"refusing to write {path}: it is the input file {protected}, which is never "
                "overwritten (not even with --force); choose another output path with -o"
            )


_KINDS = ((stat.S_ISFIFO, "fifo (named pipe)"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
          (stat.S_ISSOCK, "socket"))


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
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {_reason(exc)}; choose another path with -o") from exc
    if stat.S_ISLNK(info.st_mode):
        try:
            info = os.stat(path)  # what the link points to
        except OSError:  # a dangling symlink: it exists, and --force replaces the link itself
            if not force:
                raise OutputError(f"{path} exists (a symlink to {os.readlink(path)}, which does not exist); pass "
                                  "--force to overwrite") from None
            return
    if stat.S_ISDIR(info.st_mode):
        raise OutputError(f"cannot write {path}: it is a directory; pass a file path with -o")
    for test, kind in _KINDS:
        if test(info.st_mode):
            raise OutputError(f"refusing to write {path}: it is a {kind}, not a regular file, and is never replaced "
                              "(not even with --force); choose another path with -o")
    if not force:
        raise OutputError(f"{path} exists; pass --force to overwrite")


def _is_parametrized(model: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m) for m in model.modules())
