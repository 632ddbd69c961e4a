"""Read what a pickle references before unpickling it, refuse what is not allowed, and say why.

The safety model of normsurgeon's loaders (:mod:`normsurgeon.io.loading`; docs/security.md):

1. **Scan** (this module): every global the file references is listed from its opcodes with
   ``pickletools``; nothing is imported or executed. Opcodes that resolve globals some other
   way (the copyreg extension registry) are refused outright.
2. **Verdict** (:mod:`normsurgeon.io.verdict`): the references are judged by name and by reading
   the source of the modules they name, without importing them; only when everything passed are
   the modules of the accepted classes imported.
3. **Strict unpickling** (:mod:`normsurgeon.io.strict_unpickler`): torch.load reads the archive
   with an unpickler that builds only the accepted classes, with reviewed code, and storages no
   larger than the file.

A file with a refused reference raises :class:`UnsafePickleError` naming what it references.
``trust_pickle=True`` (the CLI's ``--trust-pickle``) skips all of it (plain ``torch.load``).
``.pt2`` archives are checked by :mod:`normsurgeon.io.pt2_safety`.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickletools
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from normsurgeon.errors import LoadError, UnsafePickleError

from .strict_unpickler import Policy
from .verdict import Verdict, classify, statically_a_model

__all__ = ["Verdict", "classify", "check_pickle", "scan_pickle_globals", "refusal", "raise_for_missing"]

TRUST_FLAG = "--trust-pickle"
EXPECTED_FORMS = (
    "expected a pickled nn.Module (torch.save(model)), a state_dict with --factory "
    "module:callable, or a .pt2 from torch.export.save"
)
TENSOR_FORMS = "expected a tensor, or a tuple/list/dict of tensors, saved with torch.save"
_MAX_LISTED = 6


# --------------------------------------------------------------------------- messages and files


def one_line(text: object, limit: int = 240) -> str:
    """Collapse whitespace and cut at ``limit``, so an embedded message keeps ours on one line."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def listing(items: Sequence[str]) -> str:
    """``'a, b, c'`` with at most a few items and a count of the rest, to keep errors short."""
    shown = ", ".join(items[:_MAX_LISTED])
    rest = len(items) - _MAX_LISTED
    return f"{shown} and {rest} more" if rest > 0 else shown


def check_file(path: Path, *, expected: str = EXPECTED_FORMS) -> None:
    """Raise a clear LoadError for a missing, directory or empty file before anything reads it.

    ``expected`` says what the file should hold (a model by default; TENSOR_FORMS for inputs).
    """
    if not path.exists():
        raise LoadError(f"{path}: no such file; check the path")
    if path.is_dir():
        fix = ("pass the .pt or .pt2 file itself, or a Hugging Face save_pretrained directory (config.json and "
               "model.safetensors)") if expected == EXPECTED_FORMS else "pass the .pt file itself"
        raise LoadError(f"{path}: is a directory, not a file; {fix}")
    if path.stat().st_size == 0:
        raise LoadError(f"{path}: file is empty; {expected}")


# --------------------------------------------------------------------------- entry points


def scan_pickle_globals(path: str | Path) -> list[tuple[str, str]]:
    """List the (module, name) globals a torch.save file or plain pickle references.

    Nothing is executed: the opcodes are read with ``pickletools``, so this is safe on an
    untrusted file. Python 2 names are mapped the way unpickling maps them
    (``__builtin__.eval`` -> ``builtins.eval``).
    """
    path = Path(path)
    check_file(path)
    scan = _scan_file(path)
    if scan.problem:
        raise LoadError(scan.problem)
    return scan.refs


def check_pickle(path: Path, *, allow_classes: bool, user_paths: Sequence[str | Path] = ()) -> Policy:
    """Refuse ``path`` unless every global it references is allowed; return the unpickling policy.

    The policy (:class:`normsurgeon.io.strict_unpickler.Policy`) lets the strict unpickler build
    exactly what was checked here, with storages bounded by the bytes the file holds.
    ``allow_classes=False`` (tensor files) accepts only torch's weights-only allowlist.
    Raises UnsafePickleError for a refused reference, LoadError for an unreadable file or a
    class that cannot be imported.
    """
    scan = _scan_file(path)
    if scan.problem and not scan.refs:
        raise LoadError(scan.problem if allow_classes else scan.problem.replace(EXPECTED_FORMS, TENSOR_FORMS))
    verdict = classify(scan.refs, allow_classes=allow_classes, user_paths=user_paths)
    if verdict.refused:
        if not allow_classes and statically_a_model(scan.refs, user_paths):  # a model, not a tensor file
            raise LoadError(f"{path}: holds a model ({listing(list(verdict.refused))}), not example inputs; "
                            f"{TENSOR_FORMS}")
        what = "not torch types or nn.Module classes" if allow_classes else "not tensors or torch types"
        raise refusal(path, verdict.refused, what)
    if scan.problem:
        raise LoadError(scan.problem if allow_classes else scan.problem.replace(EXPECTED_FORMS, TENSOR_FORMS))
    raise_for_missing(path, verdict.missing)
    policy = verdict.policy()
    policy.storage_bytes, policy.total_storage_bytes = _storage_bounds(path)
    return policy


def _storage_bounds(path: Path) -> tuple[Any, int]:
    """How many bytes each storage may claim: its archive member's size (zip), or the file's size."""
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):
        return (lambda key: None), size
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
    members = {info.filename.rsplit("/data/", 1)[-1]: info.file_size for info in infos
               if "/data/" in info.filename or info.filename.startswith("data/")}
    return (lambda key: members.get(str(key), 0)), sum(members.values())


# --------------------------------------------------------------------------- scanning

_STRING_OPS = frozenset(
    {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
)
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_NO_PUSH_OPS = frozenset({"PROTO", "FRAME", "STOP"})
_MARK = object()
# A legacy (non-zip) torch.save file is five pickles followed by raw storage bytes.
LEGACY_PICKLES = 5


@dataclass
class PickleScan:
    """Globals found in one file (in order, without repeats), and why the scan stopped early."""

    refs: list[tuple[str, str]] = field(default_factory=list)
    problem: str | None = None

    def add_refs(self, refs: Iterable[tuple[str, str]]) -> None:
        """Append the refs not seen yet."""
        for ref in refs:
            if ref not in self.refs:
                self.refs.append(ref)

    def merge(self, other: PickleScan) -> None:
        """Take another scan's refs, and its problem unless this scan has one already."""
        self.add_refs(other.refs)
        self.problem = self.problem or other.problem


def scan_stream(stream: IO[bytes], label: str, *, max_pickles: int = 1) -> PickleScan:
    """Scan up to ``max_pickles`` consecutive pickles; only the first one must parse.

    Bytes after the first pickle may be raw storage (legacy torch.save), so a later parse error
    ends the scan quietly. ``label`` names the source in the problem message.
    """
    scan = PickleScan()
    for index in range(max_pickles):
        start = stream.tell()
        if not stream.read(1):
            break
        stream.seek(start)
        try:
            scan.add_refs(_ops_globals(stream))
        except Exception as exc:  # pickletools raises ValueError, UnicodeDecodeError, ...
            if index == 0:
                scan.problem = f"{label}: not a valid pickle ({one_line(exc, 80)}); {EXPECTED_FORMS}"
            break
    return scan


def scan_zip_pickles(zf: zipfile.ZipFile, label: str) -> PickleScan:
    """Scan every ``.pkl`` member of a torch.save (or TorchScript) zip archive."""
    scan = PickleScan()
    members = [n for n in zf.namelist() if n.endswith(".pkl")]
    if not members:
        return PickleScan(problem=f"{label}: zip archive without a pickle (data.pkl); {EXPECTED_FORMS}")
    for member in members:
        scan.merge(scan_stream(io.BytesIO(zf.read(member)), f"{label}:{member}"))
    return scan


def refuse_zip_bombs(path: Path, zf: zipfile.ZipFile) -> None:
    """Refuse a compressed member that would inflate beyond the size of the whole file (torch.save
    never compresses), before anything inflates it."""
    size = path.stat().st_size
    for info in zf.infolist():
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > size:
            raise LoadError(f"{path}: archive member {info.filename} inflates to {info.file_size} bytes, more than "
                            f"the {size}-byte file (a zip bomb?); re-save it with torch.save, or pass "
                            f"{TRUST_FLAG} if you trust this file")


def _scan_file(path: Path) -> PickleScan:
    """Scan a torch.save zip (its data.pkl) or a legacy/plain pickle file."""
    with open(path, "rb") as f:
        is_zip = f.read(2) == b"PK"
    if is_zip:
        try:
            with zipfile.ZipFile(path) as zf:
                refuse_zip_bombs(path, zf)
                return scan_zip_pickles(zf, str(path))
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:  # ValueError: undecodable names
            problem = f"{path}: truncated or corrupt zip archive ({one_line(exc, 80)}); re-save the file"
            return PickleScan(problem=problem)
    with open(path, "rb") as f:
        return scan_stream(f, str(path), max_pickles=LEGACY_PICKLES)


def _map_name(module: str, name: str) -> tuple[str, str]:
    """Python 2 names as pickle maps them on load (``commands.Popen`` -> ``subprocess.Popen``).

    Python's table is a superset of the one torch's weights-only unpickler uses.
    """
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _ops_globals(stream: IO[bytes]) -> Iterator[tuple[str, str]]:
    """Yield the globals of one pickle, following strings for STACK_GLOBAL; raises on bad bytes."""
    pushed: list[Any] = []
    memo: dict[int, Any] = {}
    for opcode, arg, _pos in pickletools.genops(stream):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            yield _map_name(module, attr)
            pushed.append(None)
        elif name in ("EXT1", "EXT2", "EXT4"):  # a global looked up in copyreg's registry, by number
            yield ("<copyreg extension>", str(arg))
            pushed.append(None)
        elif name == "STACK_GLOBAL":
            module, attr = (pushed[-2:] if len(pushed) >= 2 else [None, None])
            ok = isinstance(module, str) and isinstance(attr, str)
            yield _map_name(module, attr) if ok else ("<unknown>", "<STACK_GLOBAL>")
            pushed[-2:] = [None]
        elif name in _STRING_OPS:
            pushed.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
        elif name in _GET_OPS:
            pushed.append(memo.get(arg))
        elif name in _PUT_OPS or name == "MEMOIZE":
            memo[arg if name != "MEMOIZE" else len(memo)] = pushed[-1] if pushed else None
        elif name == "MARK":
            pushed.append(_MARK)
        elif name == "POP":  # modelled exactly: a hidden pair of strings must not pass for the real one
            if pushed:
                pushed.pop()
        elif name == "POP_MARK":
            while pushed and pushed.pop() is not _MARK:
                pass
        elif name not in _NO_PUSH_OPS:
            pushed.append(None)


# --------------------------------------------------------------------------- errors


def refusal(path: Path, names: Sequence[str], what: str, *, verb: str = "unpickle") -> UnsafePickleError:
    """The one-line error for a refused file: what it references, and how to load it anyway."""
    return UnsafePickleError(
        f"{path}: refusing to {verb}: it references {listing(list(names))} ({what}); nothing was "
        f"executed. Re-run with {TRUST_FLAG} if you trust this file."
    )


def raise_for_missing(path: Path, missing: Sequence[tuple[str, str]]) -> None:
    """Raise a LoadError that says how to make the unimportable classes importable (if any)."""
    if not missing:
        return
    ref, why = missing[0]
    names = listing([m for m, _ in missing])
    if ref.split(".", 1)[0] == "__main__":
        raise LoadError(
            f"{path}: the pickle references {names}, a class defined in the script that saved "
            "it; move the class into an importable module (see --import-path DIR) or save a "
            "state_dict and pass --factory module:callable"
        )
    raise LoadError(
        f"{path}: cannot import {names} named by the pickle ({why}); run from the directory "
        f"that holds the {ref.split('.', 1)[0]!r} package or pass --import-path DIR"
    )
