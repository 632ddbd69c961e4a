"""Load models, checkpoints and example inputs without executing untrusted code.

Loading is safe by default. Before a pickle is unpickled, every global it references is
listed with ``pickletools`` (nothing is executed) and classified:

* allowed: what torch's weights-only unpickler allows already; torch classes and torch
  constants (dtypes, memory formats); torch's C operator functions (``torch._C._nn.gelu``) and
  the functions of ``torch.nn.functional``; ``nn.Module`` subclasses from importable non-stdlib
  modules; plain classes from the same top-level package as one of those modules (a
  transformers model's config class and enums).
* refused: anything else, in particular every stdlib reference (``os.system``,
  ``builtins.eval``, ``subprocess.Popen``) and torch's Python functions (``torch.load``).

A file with a refused reference raises :class:`UnsafePickleError` naming what it references;
otherwise it is loaded with ``torch.load(weights_only=True)`` and the accepted objects as
extra safe globals. ``trust_pickle=True`` skips the checks (plain ``torch.load``).

``torch.export.load`` is not weights-only (it unpickles payloads with ``weights_only=False``,
parses symbolic expressions with ``sympy.sympify`` and ``exec``s guard code), so a ``.pt2``
archive is checked first too: its pickled payloads, its graph's call targets, its symbolic
expressions and its guards must all be plain torch data.
"""

from __future__ import annotations

import _compat_pickle
import ast
import contextlib
import importlib
import io
import json
import os
import pickle
import pickletools
import re
import sys
import tokenize
import types
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import torch
from torch import nn

from normsurgeon.errors import LoadError, UnsafePickleError, UsageError

TRUST_FLAG = "--trust-pickle"
_EXPECTED = (
    "expected a pickled nn.Module (torch.save(model)), a state_dict with --factory "
    "module:callable, or a .pt2 from torch.export.save"
)
_MAX_LISTED = 6
_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")


@dataclass
class LoadedModel:
    """A model read from disk, with where and in which form it came."""

    model: nn.Module  # for .pt2: exported_program.module()
    source: Path
    form: Literal["module", "state_dict+factory", "exported_program"]
    exported_program: torch.export.ExportedProgram | None = None
    notes: list[str] = field(default_factory=list)  # e.g. "loaded with --trust-pickle"


# --------------------------------------------------------------------------- public API


def load_model(
    path: str | Path,
    *,
    factory: str | None = None,
    trust_pickle: bool = False,
    import_paths: Sequence[str | Path] = (),
) -> LoadedModel:
    """Load a pickled module, a state_dict plus ``factory``, or a ``.pt2`` exported program."""
    path = Path(path)
    _check_file(path)
    kind = _sniff(path)
    notes = [_trust_note()] if trust_pickle else []
    with _import_paths(import_paths):
        if kind == "pt2":
            return _load_pt2(path, trust_pickle=trust_pickle, notes=notes)
        obj = _torch_load(path, trust_pickle=trust_pickle, allow_classes=True)
        model, form = _interpret(obj, path, factory, import_paths, notes)
    return LoadedModel(model=model, source=path, form=form, notes=notes)


def load_tensors(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """Load example inputs: a tensor, or a tuple/list/dict holding tensors (weights-only)."""
    path = Path(path)
    _check_file(path)
    if _sniff(path) == "pt2":
        raise LoadError(
            f"{path}: is a torch.export program, not a tensor file; pass a .pt written with "
            "torch.save(tensor), torch.save((x, y)) or torch.save({'x': x})"
        )
    obj = _torch_load(path, trust_pickle=trust_pickle, allow_classes=False)
    if not _contains_tensor(obj):
        raise LoadError(
            f"{path}: holds {_describe(obj)} and no tensor; --inputs expects a tensor, or a "
            "tuple/list/dict of tensors saved with torch.save"
        )
    return obj


def scan_pickle_globals(path: str | Path) -> list[tuple[str, str]]:
    """List the (module, name) globals a torch.save file or plain pickle references.

    Nothing is executed: the opcodes are read with ``pickletools``. Python 2 names are mapped
    the way unpickling maps them (``__builtin__.eval`` -> ``builtins.eval``).
    """
    path = Path(path)
    _check_file(path)
    scan = _scan_file(path)
    if scan.problem:
        raise LoadError(scan.problem)
    return scan.refs


def import_callable(spec: str, *, import_paths: Sequence[str | Path] = ()) -> Callable[..., Any]:
    """Import ``"package.module:callable"`` with the cwd and ``import_paths`` on sys.path."""
    match = re.fullmatch(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)", spec)
    if not match:
        raise UsageError(
            f"--factory {spec!r}: expected 'package.module:callable' (e.g. mymodels:build_model)"
        )
    module_name, attr_path = match.groups()
    with _import_paths(import_paths):
        module = _import_for_factory(module_name)
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise LoadError(
                f"--factory {spec}: module {module_name} has no attribute {attr_path}; "
                "check the name after ':'"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise LoadError(f"--factory {spec}: {module_name}:{attr_path} is not callable; name a function or class")
    return obj


# --------------------------------------------------------------------------- small helpers


def _one_line(text: object, limit: int = 240) -> str:
    """Collapse whitespace so an embedded message keeps ours on one line."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _listing(items: Sequence[str]) -> str:
    """'a, b, c' with at most _MAX_LISTED items and a count of the rest."""
    shown = ", ".join(items[:_MAX_LISTED])
    rest = len(items) - _MAX_LISTED
    return f"{shown} and {rest} more" if rest > 0 else shown


def _trust_note() -> str:
    return f"loaded with {TRUST_FLAG}: the file was unpickled without safety checks"


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def _is_stdlib(module: str) -> bool:
    return _top(module) in sys.stdlib_module_names or _top(module) == "__builtin__"


def _describe(obj: Any) -> str:
    """A short description of a loaded object for error messages."""
    if isinstance(obj, Mapping):
        keys = [repr(k) for k in obj]
        return f"a {type(obj).__name__} with keys {_listing(keys)}" if keys else "an empty dict"
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    name = type(obj).__name__
    return f"an {name}" if name[:1].lower() in "aeiou" else f"a {name}"


def _contains_tensor(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, Mapping):
        return any(_contains_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_contains_tensor(v) for v in obj)
    return False


# --------------------------------------------------------------------------- files


def _check_file(path: Path) -> None:
    """Missing, directory or empty files get a clear LoadError before anything else."""
    if not path.exists():
        raise LoadError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise LoadError(f"{path}: is a directory, not a model file; pass the .pt or .pt2 file itself")
    if path.stat().st_size == 0:
        raise LoadError(f"{path}: file is empty; {_EXPECTED}")


def _sniff(path: Path) -> Literal["pt2", "torch_zip", "pickle"]:
    """Tell a .pt2 archive, a torch.save zip and a legacy pickle apart from their bytes."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK"):
        return _sniff_zip(path)
    if head[:1] == b"\x80":
        return "pickle"
    raise LoadError(f"{path}: not a torch.save or torch.export file ({_describe_bytes(head)}); {_EXPECTED}")


def _sniff_zip(path: Path) -> Literal["pt2", "torch_zip"]:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if _is_pt2_archive(zf, names) or (path.suffix == ".pt2"):
                return "pt2"
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise LoadError(
            f"{path}: truncated or corrupt zip archive ({_one_line(exc)}); re-save or re-download the file"
        ) from exc
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        raise LoadError(
            f"{path}: is a TorchScript archive (torch.jit.save); re-save the model with "
            "torch.save(model) or torch.export.save"
        )
    if not any(n.endswith("data.pkl") for n in names):
        raise LoadError(f"{path}: a zip archive without data.pkl, not a torch.save file; {_EXPECTED}")
    return "torch_zip"


def _is_pt2_archive(zf: zipfile.ZipFile, names: list[str]) -> bool:
    for name in names:
        if name.endswith("serialized_exported_program.json"):
            return True
        if name.rsplit("/", 1)[-1] == "archive_format" and zf.read(name).strip() == b"pt2":
            return True
    return False


def _describe_bytes(head: bytes) -> str:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it starts with bytes {head[:8]!r}"
    if text.isprintable() or all(c.isprintable() or c.isspace() for c in text):
        return f"it looks like text: {_one_line(text, 40)!r}"
    return f"it starts with bytes {head[:8]!r}"


# --------------------------------------------------------------------------- import paths


@contextlib.contextmanager
def _import_paths(extra: Sequence[str | Path]) -> Iterator[None]:
    """Put ``extra`` and the cwd at the front of sys.path (like ``python -m``) for a while."""
    entries = []
    for entry in extra:
        entry_path = Path(entry)
        if not entry_path.is_dir():
            raise UsageError(
                f"--import-path {entry}: no such directory; pass a directory that holds your model's package"
            )
        entries.append(str(entry_path.resolve()))
    entries.append(os.getcwd())
    for entry in reversed(entries):
        sys.path.insert(0, entry)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        for entry in entries:
            with contextlib.suppress(ValueError):
                sys.path.remove(entry)


def _import_for_factory(module_name: str) -> types.ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise LoadError(
            f"--factory: cannot import module {module_name} ({_one_line(exc)}); run from the "
            "project root or pass --import-path DIR"
        ) from exc
    except Exception as exc:  # the user's module failed while importing
        raise LoadError(
            f"--factory: importing {module_name} failed ({type(exc).__name__}: {_one_line(exc)}); fix that module"
        ) from exc


# --------------------------------------------------------------------------- pickle scanning

_STRING_OPS = frozenset(
    {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
)
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_NO_PUSH_OPS = frozenset({"PROTO", "FRAME", "MARK", "STOP", "POP", "POP_MARK"})
# A legacy (non-zip) torch.save file is five pickles followed by raw storage bytes.
_LEGACY_PICKLES = 5


@dataclass
class _Scan:
    """Globals found in one file, and why the scan stopped early (if it did)."""

    refs: list[tuple[str, str]] = field(default_factory=list)
    problem: str | None = None

    def add(self, other: _Scan) -> None:
        self.refs.extend(r for r in other.refs if r not in self.refs)
        self.problem = self.problem or other.problem


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


def _scan_stream(stream: IO[bytes], label: str, *, max_pickles: int = 1) -> _Scan:
    """Scan up to ``max_pickles`` consecutive pickles; the first one must parse."""
    scan = _Scan()
    for index in range(max_pickles):
        start = stream.tell()
        if not stream.read(1):
            break
        stream.seek(start)
        try:
            for ref in _ops_globals(stream):
                if ref not in scan.refs:
                    scan.refs.append(ref)
        except Exception as exc:  # pickletools raises ValueError, UnicodeDecodeError, ...
            if index == 0:
                scan.problem = f"{label}: not a valid pickle ({_one_line(exc, 80)}); {_EXPECTED}"
            break
    return scan


def _scan_zip_pickles(zf: zipfile.ZipFile, label: str) -> _Scan:
    """Scan every ``.pkl`` member of a torch.save (or TorchScript) zip archive."""
    scan = _Scan()
    members = [n for n in zf.namelist() if n.endswith(".pkl")]
    if not members:
        return _Scan(problem=f"{label}: zip archive without a pickle (data.pkl); {_EXPECTED}")
    for member in members:
        scan.add(_scan_stream(io.BytesIO(zf.read(member)), f"{label}:{member}"))
    return scan


def _scan_file(path: Path) -> _Scan:
    """Scan a torch.save zip (its data.pkl) or a legacy/plain pickle file."""
    with open(path, "rb") as f:
        is_zip = f.read(2) == b"PK"
    if is_zip:
        try:
            with zipfile.ZipFile(path) as zf:
                return _scan_zip_pickles(zf, str(path))
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            return _Scan(problem=f"{path}: truncated or corrupt zip archive ({_one_line(exc, 80)}); re-save the file")
    with open(path, "rb") as f:
        return _scan_stream(f, str(path), max_pickles=_LEGACY_PICKLES)


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
class _Verdict:
    """What a pickle references, sorted into accepted, refused and unimportable."""

    accepted: dict[str, Any] = field(default_factory=dict)  # "module.name" -> object to allowlist
    refused: list[str] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)  # ("module.name", why)


def _display(module: str, name: str) -> str:
    return f"{_DISPLAY_MODULES.get(module, module)}.{name}"


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
        raise _Unimportable(_one_line(exc, 100)) from exc
    except Exception as exc:  # the package itself failed while importing
        raise _Unimportable(f"importing {module} failed: {type(exc).__name__}: {_one_line(exc, 80)}") from exc
    if not hasattr(mod, name):
        raise _Unimportable(f"module {module} has no attribute {name}")
    return getattr(mod, name)


def _risky_bases(cls: type) -> bool:
    """True when ``cls`` inherits from a stdlib class other than plain containers/enums."""
    for base in cls.__mro__[1:]:
        base_module = getattr(base, "__module__", "") or ""
        if _is_stdlib(base_module) and _top(base_module) not in _HARMLESS_STDLIB_BASES:
            return True
    return False


def _is_module_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, nn.Module) and not _risky_bases(obj)


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


def _valid_ref(module: str, name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module)) and name.isidentifier()


def _classify(refs: Iterable[tuple[str, str]], *, allow_classes: bool) -> _Verdict:
    """Sort refs into accepted/refused/missing; imports only when nothing is refused outright."""
    verdict = _Verdict()
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


def _classify_imported(refs: list[tuple[str, str]], verdict: _Verdict) -> None:
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
    for module, name, obj in plain:
        same_package = _top(module) in packages and _top(obj.__module__) in packages
        _record(verdict, module, name, obj, same_package and not _risky_bases(obj))


def _record(verdict: _Verdict, module: str, name: str, obj: Any, ok: bool) -> None:
    if ok:
        verdict.accepted[f"{module}.{name}"] = obj
    else:
        verdict.refused.append(_display(module, name))


def _refusal(path: Path, names: Sequence[str], what: str, verb: str = "unpickle") -> UnsafePickleError:
    return UnsafePickleError(
        f"{path}: refusing to {verb}: it references {_listing(list(names))} ({what}); nothing was "
        f"executed. Re-run with {TRUST_FLAG} if you trust this file."
    )


def _raise_for(path: Path, scan: _Scan, verdict: _Verdict, *, allow_classes: bool) -> None:
    """Turn a scan + verdict into the one error that explains it best."""
    if verdict.refused:
        what = "not torch types or nn.Module classes" if allow_classes else "not tensors or torch types"
        raise _refusal(path, verdict.refused, what)
    if scan.problem:
        raise LoadError(scan.problem)
    if verdict.missing:
        ref, why = verdict.missing[0]
        names = _listing([m for m, _ in verdict.missing])
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


# --------------------------------------------------------------------------- torch.load


def _torch_load(path: Path, *, trust_pickle: bool, allow_classes: bool) -> Any:
    """torch.load after the safety scan (weights-only), or plainly when the user trusts the file."""
    if trust_pickle:
        return _call_torch_load(path, weights_only=False, safe=[])
    scan = _scan_file(path)
    verdict = _classify(scan.refs, allow_classes=allow_classes)
    _raise_for(path, scan, verdict, allow_classes=allow_classes)
    safe = [(obj, key) for key, obj in verdict.accepted.items()]
    return _call_torch_load(path, weights_only=True, safe=safe)


def _call_torch_load(path: Path, *, weights_only: bool, safe: list[tuple[Any, str]]) -> Any:
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, weights_only=weights_only, map_location="cpu")
    except (ModuleNotFoundError, AttributeError) as exc:
        raise LoadError(
            f"{path}: cannot import a class the pickle needs ({_one_line(exc, 120)}); run from the "
            "project root or pass --import-path DIR"
        ) from exc
    except pickle.UnpicklingError as exc:
        hint = f"re-run with {TRUST_FLAG} if you trust this file" if weights_only else "re-save the file"
        raise LoadError(f"{path}: the weights-only loader rejected it ({_one_line(exc, 160)}); {hint}") from exc
    except Exception as exc:
        raise LoadError(
            f"{path}: torch.load failed ({type(exc).__name__}: {_one_line(exc, 160)}); {_EXPECTED}"
        ) from exc


# --------------------------------------------------------------------------- interpreting


def _interpret(
    obj: Any, path: Path, factory: str | None, import_paths: Sequence[str | Path], notes: list[str]
) -> tuple[nn.Module, Literal["module", "state_dict+factory"]]:
    """Decide what the unpickled object is: a module, a state_dict (needs a factory), or junk."""
    if isinstance(obj, nn.Module):
        if factory:
            notes.append("--factory ignored: the file holds a full module")
        return obj, "module"
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), nn.Module):
        notes.append("took the module stored under the checkpoint's 'model' key")
        return obj["model"], "module"
    state_dict = _find_state_dict(obj)
    if state_dict is None:
        raise LoadError(f"{path}: holds {_describe(obj)}, not a model; {_EXPECTED}")
    if factory is None:
        raise UsageError(
            f"{path}: holds a state_dict (weights without the architecture); pass --factory "
            "module:callable that builds the model"
        )
    model = _build_with_factory(factory, import_paths)
    _load_strict(model, state_dict, path, factory)
    return model, "state_dict+factory"


def _is_state_dict(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    return all(
        isinstance(k, str) and (isinstance(v, torch.Tensor) or k.endswith("_extra_state")) for k, v in obj.items()
    )


def _find_state_dict(obj: Any) -> Mapping[str, Any] | None:
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            if _is_state_dict(obj.get(key)):
                return obj[key]
    return None


def _build_with_factory(factory: str, import_paths: Sequence[str | Path]) -> nn.Module:
    build = import_callable(factory, import_paths=import_paths)
    try:
        with _import_paths(import_paths):
            model = build()
    except Exception as exc:
        raise LoadError(
            f"--factory {factory} failed ({type(exc).__name__}: {_one_line(exc, 160)}); fix the factory"
        ) from exc
    if not isinstance(model, nn.Module):
        raise LoadError(
            f"--factory {factory} returned {_describe(model)}, not an nn.Module; it must build the model"
        )
    return model


def _load_strict(model: nn.Module, state_dict: Mapping[str, Any], path: Path, factory: str) -> None:
    """load_state_dict(strict=True), with mismatches explained in one line."""
    expected, given = set(model.state_dict()), set(state_dict)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        parts = [f"missing keys {_listing(missing)}"] if missing else []
        parts += [f"unexpected keys {_listing(unexpected)}"] if unexpected else []
        raise LoadError(
            f"{path}: state_dict does not fit the model from --factory {factory}: "
            f"{'; '.join(parts)}; {_prefix_hint(expected, given)}"
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:] if line.strip()) or str(exc)
        raise LoadError(
            f"{path}: state_dict does not fit the model from --factory {factory}: {_one_line(detail, 200)}; "
            "pass the factory that built this checkpoint"
        ) from exc


def _prefix_hint(expected: set[str], given: set[str]) -> str:
    if given and all(k.startswith("module.") for k in given) and {k[7:] for k in given} == expected:
        return "the keys carry a 'module.' prefix (saved from DataParallel): strip it and save again"
    return "pass the factory that built this checkpoint"


# --------------------------------------------------------------------------- .pt2


def _load_pt2(path: Path, *, trust_pickle: bool, notes: list[str]) -> LoadedModel:
    """torch.export.load after checking the archive (torch's loader is not weights-only)."""
    if not trust_pickle:
        _check_pt2_archive(path)
    try:
        program = torch.export.load(str(path))
        module = program.module()
    except Exception as exc:
        raise LoadError(
            f"{path}: torch.export.load failed ({type(exc).__name__}: {_one_line(exc, 160)}); "
            "re-export it with torch.export.save from this torch version"
        ) from exc
    return LoadedModel(model=module, source=path, form="exported_program", exported_program=program, notes=notes)


_PT2_METADATA = frozenset({"archive_format", "archive_version", "version", "byteorder", "serialization_id"})


def _check_pt2_archive(path: Path) -> None:
    """Refuse a .pt2 whose pickles, graph targets, expressions or guards are not plain torch."""
    refs: list[tuple[str, str]] = []
    issues: list[str] = []
    try:
        with zipfile.ZipFile(path) as zf:
            raw = _pt2_raw_payloads(zf)
            for name in zf.namelist():
                if name.endswith(".json"):
                    issues += _pt2_json_issues(zf.read(name))
                elif not _pt2_skipped(name, raw):
                    member = _scan_pt2_member(zf.read(name), f"{path}:{name}")
                    refs += [r for r in member.refs if r not in refs]
                    issues += [f"unreadable pickle {name}"] if member.problem else []
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise LoadError(f"{path}: corrupt .pt2 archive ({_one_line(exc, 120)}); re-export the model") from exc
    verdict = _classify(refs, allow_classes=True)
    if verdict.refused or issues:
        what = "not torch types, torch operators or nn.Module classes"
        raise _refusal(path, verdict.refused + issues, what, verb="load")
    _raise_for(path, _Scan(), verdict, allow_classes=True)


def _pt2_raw_payloads(zf: zipfile.ZipFile) -> set[str]:
    """Members that the payload configs declare as raw tensor bytes (never unpickled)."""
    raw: set[str] = set()
    for name in zf.namelist():
        if not name.endswith("_config.json"):
            continue
        config = json.loads(zf.read(name)).get("config", {})
        folder = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
        for entry in config.values():
            if isinstance(entry, dict) and entry.get("use_pickle") is False and entry.get("path_name"):
                raw.add(folder + entry["path_name"])
    return raw


def _pt2_skipped(name: str, raw: set[str]) -> bool:
    base = name.rsplit("/", 1)[-1]
    if name.endswith("/") or name in raw or base in _PT2_METADATA:
        return True
    return "extra_files/" in name or "/aotinductor/" in name


def _scan_pt2_member(data: bytes, label: str) -> _Scan:
    if data.startswith(b"PK"):
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            return _scan_zip_pickles(inner, label)
    return _scan_stream(io.BytesIO(data), label, max_pickles=_LEGACY_PICKLES)


def _pt2_json_issues(blob: bytes) -> list[str]:
    """Unsafe call targets, sympy expressions and guard code in a serialized program."""
    try:
        doc = json.loads(blob)
    except ValueError:
        return []
    issues: list[str] = []
    for key, value, holder in _walk_json(doc):
        if key == "target" and isinstance(value, str) and {"inputs", "outputs"} <= holder.keys():
            if not _safe_target(value):
                issues.append(f"graph call {value}")
        elif key == "expr_str" and isinstance(value, str) and not _safe_sympy(value):
            issues.append(f"expression {_one_line(value, 60)!r}")
        elif key == "guards_code" and isinstance(value, list):
            issues += [f"guard {_one_line(g, 60)!r}" for g in value if not (isinstance(g, str) and _safe_guard(g))]
    return issues


def _walk_json(node: Any) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                yield key, value, item
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


_OP_TARGET = re.compile(r"torch\.ops\.(?!(?:load_library|import_module|loaded_libraries)\.)\w+\.\w+(?:\.\w+)?")
_TORCH_TARGET = re.compile(
    r"torch\.(?:_?sym_\w+|_check\w*|_assert\w*|_C\._set_grad_enabled|amp\.autocast_mode\._(?:enter|exit)_autocast)"
)
_OPERATOR_NAMES = frozenset(
    "add sub mul truediv floordiv mod pow neg pos abs eq ne lt le gt ge and_ or_ xor not_ invert inv "
    "lshift rshift getitem matmul truth index".split()
)


def _safe_target(target: str) -> bool:
    """Graph call targets torch.export emits: operators, sym helpers, math and _operator."""
    if "__" in target:
        return False
    module, _, name = target.rpartition(".")
    return bool(
        _OP_TARGET.fullmatch(target)
        or _TORCH_TARGET.fullmatch(target)
        or (module == "_operator" and name in _OPERATOR_NAMES)
        or (module == "math" and re.fullmatch(r"[a-z]\w*", name))
    )


_SYMPY_NAMES = frozenset(
    "Symbol Integer Float Rational Add Mul Pow Mod Max Min Abs floor ceiling sqrt exp log Eq Ne Lt Le "
    "Gt Ge Equality Unequality StrictLessThan StrictGreaterThan LessThan GreaterThan And Or Not Xor "
    "BooleanTrue BooleanFalse true false True False Piecewise ExprCondPair ITE oo zoo nan Infinity "
    "NegativeInfinity NaN ComplexInfinity Half One Zero NegativeOne pi E int_oo IntInfinity "
    "NegativeIntInfinity FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv "
    "LShift RShift PowByNatural FloatPow FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator "
    "TruncToFloat TruncToInt RoundToInt RoundDecimal ToFloat Identity".split()
)
_SYMPY_STRING = re.compile(r"'(?:[A-Za-z_]\w*|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)'")
_SYMPY_OPS = frozenset("( ) , + - * / // % ** < > <= >= == != & | ~ ^ =".split())


def _safe_sympy(expr: str) -> bool:
    """True for srepr-style arithmetic: known sympy/torch names, symbol names, plain literals."""
    try:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(expr).readline)]
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return False
    for i, tok in enumerate(tokens):
        nxt = tokens[i + 1].string if i + 1 < len(tokens) else ""
        if tok.type == tokenize.NAME:
            if not (tok.string in _SYMPY_NAMES or nxt == "=" or re.fullmatch(r"[a-z]+\d+", tok.string)
                    or re.fullmatch(r"(?:OpaqueUnaryFn|BitwiseFn)_[a-z_]+", tok.string)):
                return False
        elif tok.type == tokenize.STRING:
            if not _SYMPY_STRING.fullmatch(tok.string):
                return False
        elif tok.type == tokenize.OP:
            if tok.string not in _SYMPY_OPS:
                return False
        elif tok.type not in (tokenize.NUMBER, tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER):
            return False
    return True


_GUARD_NAMES = frozenset(
    {"L", "args", "math", "inf", "IsNonOverlappingAndDenseIndicator", "cast_symbool_to_symint_guardless"}
)
_GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel", "shape"})
_GUARD_NODES = (
    ast.Expression, ast.Compare, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Subscript, ast.Call, ast.Attribute,
    ast.Name, ast.Constant, ast.Load, ast.operator, ast.unaryop, ast.boolop, ast.cmpop, ast.Tuple,
)


def _safe_guard(code: str) -> bool:
    """Guards are exec'd by ep.module(): allow only size/stride arithmetic on the inputs."""
    try:
        tree = ast.parse(code, mode="eval")
    except SyntaxError:
        return False
    for node in ast.walk(tree):
        if not isinstance(node, _GUARD_NODES):
            return False
        if isinstance(node, ast.Name) and node.id not in _GUARD_NAMES:
            return False
        if isinstance(node, ast.Attribute) and not _safe_guard_attribute(node):
            return False
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and not node.value.isidentifier():
            return False
    return True


def _safe_guard_attribute(node: ast.Attribute) -> bool:
    if node.attr.startswith("_"):
        return False
    is_math = isinstance(node.value, ast.Name) and node.value.id == "math"
    return is_math or node.attr in _GUARD_METHODS
