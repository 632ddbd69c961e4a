"""Decide what a pickle may use, from the names it references, before anything of it is imported or run.

The verdict has two stages:

1. **Static** (nothing imported): every ``module.name`` the file references is judged by name,
   by what this process has already imported, and by reading the source of the module it names
   (:mod:`normsurgeon.io.static_lookup`):

   * torch's weights-only allowlist (tensor and storage rebuild functions, dtypes, containers);
   * from torch, only an explicit list: ``nn.Module`` subclasses written in ``torch/nn``
     (``nn.Conv2d``, ...), the weight/spectral-norm hook classes, and torch operator functions
     (``torch.tanh``, ``torch.nn.functional.gelu``) as stored values, never as calls; nothing
     else from torch (``torch.fx.GraphModule`` generates and runs code, ``torch._inductor`` loads
     native libraries, ``torch.jit``, ``torch.distributed``, ...);
   * from the standard library, only a reviewed handful (``functools.partial``,
     ``argparse.Namespace``, ...); never a ``__main__`` module of a package;
   * from any other package, a name the module's source defines as a ``class``.
     ``kernels``' pickled function modules (transformers 5) get a vetted rebuild that never imports.

2. **Import** (only when nothing was refused): the modules that define the accepted classes are
   imported, from the file the static stage read, and the classes must be ``nn.Module``
   subclasses, enums, or plain classes of a package that has one of those modules.

The result is a :class:`normsurgeon.io.strict_unpickler.Policy` for the strict unpickler, which
then builds only those classes, without their own ``__new__``/``__setstate__``/``__reduce__``.
"""

from __future__ import annotations

import enum
import importlib
import os
import re
import sys
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import static_lookup
from .strict_unpickler import KERNELS_REBUILD_STANDIN, Policy, torch_allowed_globals


@dataclass
class Verdict:
    """What a pickle references, sorted into accepted, refused and unimportable."""

    accepted: dict[str, Any] = field(default_factory=dict)  # "module.name" -> object
    refused: list[str] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)  # ("module.name", why)
    classes: set[type] = field(default_factory=set)
    callables: set[int] = field(default_factory=set)

    def policy(self) -> Policy:
        return Policy(globals=dict(self.accepted), callables=set(self.callables), classes=set(self.classes))


def classify(refs: Iterable[tuple[str, str]], *, allow_classes: bool,
             user_paths: Sequence[str | Path] = ()) -> Verdict:
    """Judge ``refs`` by the rules in the module docstring.

    ``allow_classes=False`` (tensor files, .pt2 members) accepts only torch's weights-only
    allowlist. Nothing is imported unless every reference passed the static stage.
    """
    verdict, pending = _static_stage(refs, allow_classes, user_paths)
    if verdict.refused or verdict.missing or not pending:
        return verdict
    _import_and_judge(pending, verdict, user_paths)
    return verdict


def statically_a_model(refs: Iterable[tuple[str, str]], user_paths: Sequence[str | Path] = ()) -> bool:
    """True when the static stage alone would accept ``refs`` as a model file (imports nothing)."""
    verdict, _ = _static_stage(refs, True, user_paths)
    return not verdict.refused and not verdict.missing


def _static_stage(refs: Iterable[tuple[str, str]], allow_classes: bool,
                  user_paths: Sequence[str | Path]) -> tuple[Verdict, list[_Pending]]:
    """Stage 1 over every reference: accepted, refused or missing now, or pending the import stage."""
    verdict, pending = Verdict(), []
    allowed = torch_allowed_globals()
    for module, name in refs:
        key = f"{module}.{name}"
        if key in allowed:
            _accept(verdict, key, allowed[key], callable_=True)
        elif not allow_classes:
            verdict.refused.append(display(module, name))
        else:
            _judge_statically(module, name, verdict, pending, user_paths)
    return verdict, pending


# --------------------------------------------------------------------------- stage 1: by name and source


@dataclass
class _Pending:
    module: str
    name: str
    source: static_lookup.ModuleSource | None  # None: the module is already imported


_STDLIB_REVIEWED: dict[str, Any] = {}  # filled below: "module.name" -> object (REDUCE-able when in _VETTED)
_TORCH_PLAIN_CLASSES = (
    "torch.nn.utils.weight_norm.WeightNorm",
    "torch.nn.utils.spectral_norm.SpectralNorm",
    "torch.nn.utils.spectral_norm.SpectralNormLoadStateDictPreHook",
    "torch.nn.utils.spectral_norm.SpectralNormStateDictHook",
)
# Namespaces of torch's C operator functions (torch.tanh, torch._C._nn.gelu, ...), stored as values.
_TORCH_OP_MODULES = frozenset(
    {"torch", "torch._C._nn", "torch._C._linalg", "torch._C._special", "torch._C._fft", "torch._C._VariableFunctions"}
)
# Stored functions are never called on load, but a model's forward may call what it holds.
_TORCH_SIDE_EFFECT_NAME = re.compile(r"file|save|load|library|seed|print|thread|process|hub|import|exec|compile",
                                     re.IGNORECASE)
_TORCH_NN_DENIED = frozenset({"torch.nn.parallel.distributed"})
_KERNELS_REBUILD = "kernels._internals.layer.layer._rebuild_kernel_func"
_TORCH_NN_DIRS = tuple(os.path.join(os.path.dirname(torch.__file__), *sub, "") for sub in (("nn",), ("ao", "nn")))
_DISPLAY_MODULES = {"posix": "os", "nt": "os"}


def _judge_statically(module: str, name: str, verdict: Verdict, pending: list[_Pending],
                      user_paths: Sequence[str | Path]) -> None:
    key = f"{module}.{name}"
    if not _valid_ref(module, name) or any(part.startswith("__") for part in module.split(".")[1:]):
        verdict.refused.append(display(module, name))
    elif key == _KERNELS_REBUILD:
        _accept(verdict, key, KERNELS_REBUILD_STANDIN, callable_=True)
    elif key in _stdlib_reviewed():
        obj = _stdlib_reviewed()[key]
        _accept(verdict, key, obj, class_=isinstance(obj, type))  # the functions are vetted replacements
    elif _top(module) == "torch":
        _judge_torch(module, name, verdict)
    elif _is_stdlib(module):
        verdict.refused.append(display(module, name))
    elif module in sys.modules:
        pending.append(_Pending(module, name, None))
    else:
        _judge_source(module, name, verdict, pending, user_paths)


def _judge_source(module: str, name: str, verdict: Verdict, pending: list[_Pending],
                  user_paths: Sequence[str | Path]) -> None:
    """A module not imported yet: find its source without importing and look for ``class name``."""
    if module == "__main__":
        verdict.missing.append((f"{module}.{name}", "defined in the script that saved the file"))
        return
    source = static_lookup.locate(module, static_lookup.search_path(user_paths))
    if source is None:
        verdict.missing.append((f"{module}.{name}", f"no module named {module!r}"))
    elif not static_lookup.defines_class(source, name):
        verdict.refused.append(display(module, name))
    else:
        pending.append(_Pending(module, name, source))


def _judge_torch(module: str, name: str, verdict: Verdict) -> None:
    """torch: an explicit list, looked up in modules torch has already imported (never imported here)."""
    key = f"{module}.{name}"
    loaded = sys.modules.get(module)
    obj = vars(loaded).get(name) if loaded is not None else None  # vars(): no module __getattr__
    if obj is None:
        verdict.refused.append(key)
    elif key in _TORCH_PLAIN_CLASSES or _is_torch_nn_module_class(obj):
        _accept(verdict, key, obj, class_=True)
    elif _is_torch_operator(module, obj):
        _accept(verdict, key, obj)  # a stored value (e.g. an activation function), never called on load
    else:
        verdict.refused.append(key)


def _is_torch_nn_module_class(obj: Any) -> bool:
    """An nn.Module subclass whose code is torch.nn's own (or torch.ao.nn's), not torch.fx or torch.jit.

    DistributedDataParallel is in torch/nn but restores itself by joining a process group.
    """
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)) or obj.__module__ in _TORCH_NN_DENIED:
        return False
    owner = sys.modules.get(obj.__module__)
    filename = os.path.abspath(getattr(owner, "__file__", "") or "")
    return filename.startswith(_TORCH_NN_DIRS)


def _is_torch_operator(module: str, obj: Any) -> bool:
    """A torch function a model may hold as an attribute (an activation); never one that touches files."""
    if _TORCH_SIDE_EFFECT_NAME.search(getattr(obj, "__name__", "")):
        return False
    if isinstance(obj, types.BuiltinFunctionType):
        return module in _TORCH_OP_MODULES and not obj.__name__.startswith("_")
    if isinstance(obj, types.FunctionType):
        return module == "torch.nn.functional" and obj.__module__ == "torch.nn.functional"
    return False


def _stdlib_reviewed() -> dict[str, Any]:
    """Standard-library names a model pickle may use, each handled by reviewed code."""
    if not _STDLIB_REVIEWED:
        import argparse
        import copyreg
        import functools

        _STDLIB_REVIEWED.update({
            "functools.partial": functools.partial,  # vetted: only of an allowed function
            "copyreg._reconstructor": copyreg._reconstructor,  # vetted: object.__new__ of an accepted class
            "argparse.Namespace": argparse.Namespace,  # a plain attribute bag (training checkpoints)
        })
    return _STDLIB_REVIEWED


# --------------------------------------------------------------------------- stage 2: import and check


def _import_and_judge(pending: list[_Pending], verdict: Verdict, user_paths: Sequence[str | Path]) -> None:
    """Import the modules the static stage vetted, then check what each name really is."""
    resolved: list[tuple[_Pending, Any]] = []
    with installed_packages_first(user_paths):
        for item in pending:
            try:
                obj = _import_vetted(item)
            except _Unimportable as exc:
                verdict.missing.append((f"{item.module}.{item.name}", str(exc)))
                continue
            resolved.append((item, obj))
    packages = {_top(item.module) for item, obj in resolved if _is_module_class(obj)}
    packages |= {_top(obj.__module__) for item, obj in resolved if _is_module_class(obj)}
    for item, obj in resolved:
        key = f"{item.module}.{item.name}"
        if _is_module_class(obj) or _is_enum(obj):
            _accept(verdict, key, obj, class_=True)
        elif isinstance(obj, type) and _top(item.module) in packages and _top(obj.__module__) in packages:
            _accept(verdict, key, obj, class_=True)  # a plain class of the model's package (its config)
        else:
            verdict.refused.append(display(item.module, item.name))


class _Unimportable(Exception):
    """A module named by a pickle cannot be imported, or is not the file that was checked."""


def _import_vetted(item: _Pending) -> Any:
    try:
        module = importlib.import_module(item.module)
    except Exception as exc:  # the package itself failed while importing
        raise _Unimportable(f"importing {item.module} failed: {type(exc).__name__}: {exc}") from exc
    if item.source is not None and item.source.origin is not None:
        imported_from = Path(getattr(module, "__file__", "") or "").resolve()
        if imported_from != item.source.origin.resolve():
            raise _Unimportable(f"{item.module} was imported from {imported_from}, not the checked "
                                f"{item.source.origin}")
    obj = vars(module).get(item.name)
    if obj is None:
        raise _Unimportable(f"module {item.module} has no attribute {item.name}")
    return obj


class installed_packages_first:  # noqa: N801  (used as a context manager, like contextlib's)
    """While active, sys.path has the installed packages first and the cwd and ``user_paths`` last."""

    def __init__(self, user_paths: Sequence[str | Path] = ()) -> None:
        self._user_paths = user_paths
        self._saved: list[str] = []

    def __enter__(self) -> None:
        self._saved = list(sys.path)
        sys.path[:] = static_lookup.search_path(self._user_paths)
        importlib.invalidate_caches()

    def __exit__(self, *exc: object) -> None:
        sys.path[:] = self._saved


# --------------------------------------------------------------------------- helpers


def _accept(verdict: Verdict, key: str, obj: Any, *, callable_: bool = False, class_: bool = False) -> None:
    verdict.accepted[key] = obj
    if callable_:
        verdict.callables.add(id(obj))
    if class_ and isinstance(obj, type):
        verdict.classes.add(obj)


def _is_module_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, nn.Module) and not _is_stdlib(obj.__module__)


def _is_enum(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, enum.Enum) and not _is_stdlib(obj.__module__)


def _valid_ref(module: str, name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module)) and name.isidentifier()


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def _is_stdlib(module: str) -> bool:
    return _top(module) in sys.stdlib_module_names or _top(module) == "__builtin__"


def display(module: str, name: str) -> str:
    """``posix.system`` is shown as ``os.system``, the name users know."""
    return f"{_DISPLAY_MODULES.get(module, module)}.{name}"
