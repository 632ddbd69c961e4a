"""Read what a pickle would import before unpickling it, and refuse what is not plain torch.

The safety model of normsurgeon's loaders (:mod:`normsurgeon.io.loading`):

Unpickling runs code: a pickle names globals (``module.name``) that the unpickler imports and
may call. So before a file is unpickled, every global it references is listed with
``pickletools`` (nothing is imported or executed) and classified:

* allowed: what torch's weights-only unpickler allows already; torch classes and torch
  constants (dtypes, memory formats); torch's C operator functions (``torch._C._nn.gelu``) and
  the functions of ``torch.nn.functional``; ``nn.Module`` subclasses from importable non-stdlib
  modules; plain classes from the same top-level package as one of those modules (a
  transformers model's config class and enums).
* refused: anything else, in particular every stdlib reference (``os.system``,
  ``builtins.eval``, ``subprocess.Popen``), torch's Python functions (``torch.load``) and torch
  classes with side effects (files, sockets, processes: ``torch.distributed``, ``torch.hub``, ...).
  When anything is refused, nothing the file names is imported either.

A file with a refused reference raises :class:`UnsafePickleError` naming what it references;
otherwise it is loaded with ``torch.load(weights_only=True)`` and the accepted objects as
extra safe globals, so torch's own unpickler still guards the load. ``trust_pickle=True`` (the
CLI's ``--trust-pickle``) skips the checks (plain ``torch.load``).

``torch.export.load`` is not weights-only (it unpickles payloads with ``weights_only=False``,
parses symbolic expressions with ``sympy.sympify`` and ``exec``s guard code), so a ``.pt2``
archive is checked first too: its pickled payloads by the rules above, its graph's call
targets, its symbolic expressions and its guards by :mod:`normsurgeon.io.pt2_safety`.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import io
import pickletools
import re
import sys
import types
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from normsurgeon.errors import LoadError, UnsafePickleError

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
        fix = "pass the .pt or .pt2 file itself" if expected == EXPECTED_FORMS else "pass the .pt file itself"
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


def check_pickle(path: Path, *, allow_classes: bool) -> list[tuple[Any, str]]:
    """Refuse ``path`` unless every global it references is allowed; return the accepted ones.

    The result, ``(object, "module.name")`` pairs, is meant for
    ``torch.serialization.safe_globals`` so that the weights-only unpickler accepts exactly what
    was checked here. ``allow_classes=False`` (tensor files) accepts only torch's defaults.
    Raises UnsafePickleError for a refused reference, LoadError for an unreadable file or an
    unimportable class.
    """
    scan = _scan_file(path)
    verdict = classify(scan.refs, allow_classes=allow_classes)
    if verdict.refused:
        if not allow_classes and not classify(scan.refs, allow_classes=True).refused:  # a model, not a tensor file
            raise LoadError(f"{path}: holds a model ({listing(list(verdict.refused))}), not example inputs; "
                            f"{TENSOR_FORMS}")
        what = "not torch types or nn.Module classes" if allow_classes else "not tensors or torch types"
        raise refusal(path, verdict.refused, what)
    if scan.problem:
        raise LoadError(scan.problem if allow_classes else scan.problem.replace(EXPECTED_FORMS, TENSOR_FORMS))
    raise_for_missing(path, verdict.missing)
    return [(obj, key) for key, obj in verdict.accepted.items()]


# --------------------------------------------------------------------------- scanning

_STRING_OPS = frozenset(
    {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
)
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_NO_PUSH_OPS = frozenset({"PROTO", "FRAME", "MARK", "STOP", "POP", "POP_MARK"})
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


def _scan_file(path: Path) -> PickleScan:
    """Scan a torch.save zip (its data.pkl) or a legacy/plain pickle file."""
    with open(path, "rb") as f:
        is_zip = f.read(2) == b"PK"
    if is_zip:
        try:
            with zipfile.ZipFile(path) as zf:
                return scan_zip_pickles(zf, str(path))
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
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
        elif name not in _NO_PUSH_OPS:
            pushed.append(None)


# --------------------------------------------------------------------------- classification

# torch modules whose classes have side effects (files, sockets, processes) when constructed.
_TORCH_DENIED_MODULES = (
    "torch.distributed",
    "torch._C._distributed",
    "torch.utils.tensorboard",
    "torch.package",
    "torch.multiprocessing",
    "torch.hub",
    "torch.utils.cpp_extension",
    "torch.utils.data",
    "torch.serialization",
    "torch.jit",
    "torch.backends",
    "torch.testing",
)
_TORCH_DENIED_NAME = re.compile(
    r"file|writer|store|server|socket|process|thread|library|import|exec|compile|spawn|popen|"
    r"fork|^_?set_|seed|hub|load|save|print|dlpack|autocast|anomaly",
    re.IGNORECASE,
)
# Namespaces of torch's C operator functions (torch.tanh, torch._C._nn.gelu, ...).
_TORCH_OP_MODULES = frozenset(
    {"torch", "torch._C._nn", "torch._C._linalg", "torch._C._special", "torch._C._fft", "torch._C._nested",
     "torch._C._sparse"}
)
_TORCH_VALUE_TYPES = (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)
# Stdlib bases a plain class may have without looking like a wrapper around OS access.
_HARMLESS_STDLIB_BASES = frozenset({"builtins", "enum", "abc", "collections", "typing", "dataclasses", "numbers"})
_DISPLAY_MODULES = {"posix": "os", "nt": "os"}


class _Unimportable(Exception):
    """A module or attribute named by a pickle cannot be imported."""


@dataclass
class Verdict:
    """What a pickle references, sorted into accepted, refused and unimportable."""

    accepted: dict[str, Any] = field(default_factory=dict)  # "module.name" -> object to allowlist
    refused: list[str] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)  # ("module.name", why)


def classify(refs: Iterable[tuple[str, str]], *, allow_classes: bool) -> Verdict:
    """Sort ``refs`` into accepted, refused and missing by the rules in the module docstring.

    Stdlib and malformed references are refused by name alone; non-stdlib modules are imported
    only when nothing was refused outright, so a hostile file cannot make us import its modules.
    ``allow_classes=False`` refuses everything torch's weights-only unpickler does not allow.
    """
    verdict = Verdict()
    allowed = _default_allowed()
    to_import: list[tuple[str, str]] = []
    for module, name in refs:
        if f"{module}.{name}" in allowed:
            continue
        if not allow_classes or not _valid_ref(module, name) or _is_stdlib(module):
            verdict.refused.append(_display(module, name))
        else:
            to_import.append((module, name))
    if verdict.refused:
        return verdict  # refuse without importing anything named by this file
    _classify_imported(to_import, verdict)
    return verdict


def _classify_imported(refs: list[tuple[str, str]], verdict: Verdict) -> None:
    """Second pass: import non-stdlib references and apply the torch / nn.Module / package rules."""
    packages: set[str] = set()
    plain: list[tuple[str, str, Any]] = []
    for module, name in refs:
        try:
            obj = _resolve(module, name)
        except _Unimportable as exc:
            verdict.missing.append((f"{module}.{name}", str(exc)))
            continue
        owner = getattr(obj, "__module__", None) or ""
        if _top(module) == "torch":
            ok = _torch_object_ok(module, name, obj)
        elif _is_module_class(obj) and not _is_stdlib(owner):
            packages.update({_top(module), _top(owner)})
            ok = True
        elif isinstance(obj, type) and not _is_stdlib(owner):
            plain.append((module, name, obj))
            continue
        else:
            ok = False
        _record(verdict, module, name, obj, ok)
    # Plain classes are judged last: they pass only beside an nn.Module from the same package.
    for module, name, obj in plain:
        same_package = _top(module) in packages and _top(obj.__module__) in packages
        _record(verdict, module, name, obj, same_package and not _risky_bases(obj))


def _record(verdict: Verdict, module: str, name: str, obj: Any, ok: bool) -> None:
    if ok:
        verdict.accepted[f"{module}.{name}"] = obj
    else:
        verdict.refused.append(_display(module, name))


def _default_allowed() -> set[str]:
    """Keys torch's weights-only unpickler accepts without help (defaults + safe_globals)."""
    from torch import _weights_only_unpickler as wou

    keys = set(wou._get_allowed_globals())
    for entry in torch.serialization.get_safe_globals():
        if isinstance(entry, tuple):
            keys.add(entry[1])
        else:
            keys.add(f"{entry.__module__}.{entry.__qualname__}")
    return keys


def _resolve(module: str, name: str) -> Any:
    """Import ``module`` (never a stdlib one: callers refuse those first) and get ``name``."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise _Unimportable(one_line(exc, 100)) from exc
    except Exception as exc:  # the package itself failed while importing
        raise _Unimportable(f"importing {module} failed: {type(exc).__name__}: {one_line(exc, 80)}") from exc
    if not hasattr(mod, name):
        raise _Unimportable(f"module {module} has no attribute {name}")
    return getattr(mod, name)


def _torch_object_ok(module: str, name: str, obj: Any) -> bool:
    """The torch rule: classes, constants, C operators and torch.nn.functional functions."""
    if _is_module_class(obj) or isinstance(obj, _TORCH_VALUE_TYPES):
        return True
    owner = getattr(obj, "__module__", None) or ""
    if any(m.startswith(_TORCH_DENIED_MODULES) for m in (module, owner)) or _TORCH_DENIED_NAME.search(name):
        return False
    if isinstance(obj, type):
        return _top(owner) == "torch" and not _risky_bases(obj)
    if isinstance(obj, types.BuiltinFunctionType):
        return owner in _TORCH_OP_MODULES and not name.startswith("_")
    if isinstance(obj, types.FunctionType):
        return owner == "torch.nn.functional"
    return False


def _is_module_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, nn.Module) and not _risky_bases(obj)


def _risky_bases(cls: type) -> bool:
    """True when ``cls`` inherits from a stdlib class other than plain containers/enums."""
    for base in cls.__mro__[1:]:
        base_module = getattr(base, "__module__", "") or ""
        if _is_stdlib(base_module) and _top(base_module) not in _HARMLESS_STDLIB_BASES:
            return True
    return False


def _valid_ref(module: str, name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module)) and name.isidentifier()


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def _is_stdlib(module: str) -> bool:
    return _top(module) in sys.stdlib_module_names or _top(module) == "__builtin__"


def _display(module: str, name: str) -> str:
    """``posix.system`` is shown as ``os.system``, the name users know."""
    return f"{_DISPLAY_MODULES.get(module, module)}.{name}"


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
    if _top(ref) == "__main__":
        raise LoadError(
            f"{path}: the pickle references {names}, a class defined in the script that saved "
            "it; move the class into an importable module (see --import-path DIR) or save a "
            "state_dict and pass --factory module:callable"
        )
    raise LoadError(
        f"{path}: cannot import {names} named by the pickle ({why}); run from the directory "
        f"that holds the {_top(ref)!r} package or pass --import-path DIR"
    )
