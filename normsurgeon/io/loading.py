"""Load models, checkpoints and example inputs without executing untrusted code.

Three forms of model are read: a pickled ``nn.Module`` (``torch.save(model)``), a state_dict
plus a ``--factory module:callable`` that builds the architecture, and a ``.pt2`` exported
program (``torch.export.save``). Every error is one line that names the problem and the fix.

Loading is safe by default: a pickle is scanned and refused unless everything it references is
allowed, then read by a strict unpickler (:mod:`normsurgeon.io.pickle_safety` describes the
safety model; docs/security.md the threat model), and a ``.pt2`` archive is checked before
``torch.export.load`` reads it (:mod:`normsurgeon.io.pt2_safety`). ``trust_pickle=True`` skips
the checks and says so in :attr:`LoadedModel.notes`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
import types
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from normsurgeon.errors import LoadError, UnsafePickleError, UsageError

from .pickle_safety import (
    EXPECTED_FORMS,
    TENSOR_FORMS,
    TRUST_FLAG,
    check_file,
    check_pickle,
    listing,
    one_line,
    refuse_zip_bombs,
    scan_pickle_globals,
)
from . import strict_unpickler
from .huggingface import (
    config_file,
    is_safetensors,
    load_pretrained_dir,
    load_safetensors,
    model_for_safetensors,
    pretrained_dir_of,
)
from .pt2_safety import check_pt2_archive
from .timm_models import PREFIX as TIMM_PREFIX
from .timm_models import build_timm, is_timm_spec
from .verdict import installed_packages_first
from ..walk import iter_leaves, refuse_unwalkable

__all__ = ["TRUST_FLAG", "LoadedModel", "import_callable", "load_model", "load_tensors", "scan_pickle_globals"]

_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")
_WEIGHT_FORMS = "expected weights saved with safetensors or torch.save(model.state_dict())"


@dataclass
class LoadedModel:
    """A model read from disk, with where and in which form it came."""

    model: nn.Module  # for .pt2: exported_program.module()
    source: Path
    form: Literal["module", "state_dict+factory", "exported_program", "pretrained_dir", "timm", "safetensors+config"]
    exported_program: torch.export.ExportedProgram | None = None
    notes: list[str] = field(default_factory=list)  # e.g. "loaded with --trust-pickle"


# --------------------------------------------------------------------------- public API


def load_model(
    path: str | Path,
    *,
    factory: str | None = None,
    trust_pickle: bool = False,
    import_paths: Sequence[str | Path] = (),
    weights: str | Path | None = None,
    config: str | Path | None = None,
) -> LoadedModel:
    """Load a pickled module, a state_dict (``.pt`` or safetensors) plus ``factory``, a ``.pt2``
    exported program, a Hugging Face ``save_pretrained`` directory, ``timm:NAME`` with ``weights``,
    or a safetensors file with ``config`` (a transformers config.json, or the folder holding it).

    The file is checked before torch reads it, so an untrusted checkpoint cannot run code
    unless ``trust_pickle`` is set. ``import_paths`` (and the cwd) are put on sys.path while
    loading, after the installed packages, so the model's own classes and the factory can be imported.
    A model whose module graph no walk could finish (a cycle, ``Sequential(m, m)`` nested 60 deep)
    is refused in linear time, before anything calls ``eval()`` on it or runs it.
    """
    if config is not None:
        loaded = _load_with_config(Path(str(path)), Path(config), factory, weights)
    elif is_timm_spec(path):
        model, notes = _load_timm(str(path), Path(weights) if weights is not None else None)
        loaded = LoadedModel(model=model, source=Path(weights or str(path)[len(TIMM_PREFIX):]), form="timm", notes=notes)
    else:
        if weights is not None:
            raise UsageError("--weights goes with MODEL timm:NAME; for a state_dict file use MODEL FILE --factory")
        loaded = _load(Path(path), factory=factory, trust_pickle=trust_pickle, import_paths=import_paths)
    try:
        refuse_unwalkable(loaded.model, loaded.source)
    except (AttributeError, TypeError) as exc:  # a module whose pickled state lacks what nn.Module needs
        raise LoadError(f"{loaded.source}: holds an incomplete module ({one_line(exc, 100)}); re-save the model") from exc
    return loaded


def _load_timm(spec: str, weights: Path | None) -> tuple[nn.Module, list[str]]:
    """Build ``timm:NAME`` and load ``weights`` (safetensors or a tensors-only state_dict) strictly."""
    model, version = build_timm(spec)
    if weights is None:
        return model.eval(), [f"{spec}: no --weights given, so the weights are timm's random initialisation"]
    load_strict(model, load_state_dict_file(weights), weights, spec)
    return model.eval(), [f"{spec} built by timm {version}, weights from {weights}"]


def _load_with_config(path: Path, config: Path, factory: str | None, weights: str | Path | None) -> LoadedModel:
    """A safetensors file loaded strictly into the transformers model ``config`` describes."""
    if factory is not None or weights is not None:
        raise UsageError(f"give {'--factory' if factory is not None else '--weights'} or --config, not both: "
                         "--config builds a transformers model for the .safetensors MODEL")
    if is_timm_spec(path) or not path.is_file() or not is_safetensors(path):
        raise UsageError(f"--config goes with a .safetensors MODEL (weights without the architecture); {path} is "
                         "not one: pass a save_pretrained folder or other MODEL without --config")
    config = config_file(config)
    model, state_dict = model_for_safetensors(path, config)
    load_strict(model, state_dict, path, f"--config {config} ({type(model).__name__})",
                fix="pass the config.json these weights were saved with")
    return LoadedModel(model=model.eval(), source=path, form="safetensors+config",
                       notes=[f"{type(model).__name__} built from {config}, weights from {path}"])


def load_state_dict_file(path: str | Path) -> Mapping[str, Any]:
    """A state_dict from safetensors or a weights-only torch.save file (a checkpoint dict's usual keys too)."""
    path = Path(path)
    check_file(path, expected=_WEIGHT_FORMS)
    obj = load_safetensors(path) if is_safetensors(path) else _torch_load(path, trust_pickle=False, allow_classes=False)
    state_dict = _find_state_dict(obj)
    if state_dict is None:
        raise LoadError(f"{path}: holds {_describe(obj)}, not a state_dict; {_WEIGHT_FORMS}")
    return state_dict


def _load(path: Path, *, factory: str | None, trust_pickle: bool, import_paths: Sequence[str | Path]) -> LoadedModel:
    folder = pretrained_dir_of(path) if path.exists() else None
    if folder is not None and factory is None:
        return LoadedModel(model=load_pretrained_dir(folder), source=folder, form="pretrained_dir")
    check_file(path)
    if is_safetensors(path):  # tensors only: nothing to trust
        notes: list[str] = []
        with _import_paths(import_paths):
            model, form = _interpret(load_safetensors(path), path, factory, import_paths, notes)
        return LoadedModel(model=model, source=path, form=form, notes=notes)
    notes = [_trust_note()] if trust_pickle else []
    kind = _sniff(path)
    with _import_paths(import_paths):
        if kind == "pt2":
            return _load_pt2(path, trust_pickle=trust_pickle, notes=notes)
        obj = _torch_load(path, trust_pickle=trust_pickle, allow_classes=True, import_paths=import_paths)
        model, form = _interpret(obj, path, factory, import_paths, notes)
    return LoadedModel(model=model, source=path, form=form, notes=notes)


def load_tensors(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """Load example inputs: a tensor, or a tuple/list/dict holding tensors.

    Weights-only (no classes beyond torch's defaults), since an inputs file has no reason to
    reference a module; a file without any tensor is an error rather than a silent no-op.
    """
    path = Path(path)
    check_file(path, expected=TENSOR_FORMS)
    if _sniff(path, expected=TENSOR_FORMS) == "pt2":
        raise LoadError(
            f"{path}: is a torch.export program, not a tensor file; pass a .pt written with "
            "torch.save(tensor), torch.save((x, y)) or torch.save({'x': x})"
        )
    obj = _torch_load(path, trust_pickle=trust_pickle, allow_classes=False)
    if not _contains_tensor(obj):
        raise LoadError(f"{path}: holds {_describe(obj)} and no tensor; {TENSOR_FORMS}")
    return obj


def import_callable(spec: str, *, import_paths: Sequence[str | Path] = ()) -> Callable[..., Any]:
    """Import ``"package.module:callable"`` with the cwd and ``import_paths`` on sys.path (after the
    installed packages, so a local file cannot stand in for a library).

    This is how ``--factory`` names the function or class that rebuilds a state_dict's model;
    a bad spec, module or attribute gets an error that says which part to fix.
    """
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


# --------------------------------------------------------------------------- file kinds


def _sniff(path: Path, *, expected: str = EXPECTED_FORMS) -> Literal["pt2", "torch_zip", "pickle"]:
    """Tell a .pt2 archive, a torch.save zip and a legacy pickle apart from their bytes."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK"):
        return _sniff_zip(path, expected=expected)
    if head[:1] == b"\x80":
        return "pickle"
    if path.suffix.lower() == ".onnx" or head[:1] == b"\x08":  # ModelProto starts with field 1, ir_version
        raise LoadError(f"{path}: an ONNX file where a PyTorch model was expected; 'normsurgeon optimize' takes "
                        ".onnx files, and 'normsurgeon verify MODEL FILE.onnx' takes the PyTorch model first")
    raise LoadError(f"{path}: not a torch.save or torch.export file ({_describe_bytes(head)}); {expected}")


def _sniff_zip(path: Path, *, expected: str = EXPECTED_FORMS) -> Literal["pt2", "torch_zip"]:
    """A .pt2 archive or a torch.save zip; TorchScript and other zips are errors."""
    try:
        with zipfile.ZipFile(path) as zf:
            refuse_zip_bombs(path, zf)
            names = zf.namelist()
            if _is_pt2_archive(zf, names) or path.suffix == ".pt2":
                return "pt2"
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:  # ValueError: undecodable member names
        raise LoadError(
            f"{path}: truncated or corrupt zip archive ({one_line(exc)}); re-save or re-download the file"
        ) from exc
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        raise LoadError(
            f"{path}: is a TorchScript archive (torch.jit.save); re-save the model with "
            "torch.save(model) or torch.export.save"
        )
    if not any(n.endswith("data.pkl") for n in names):
        raise LoadError(f"{path}: a zip archive without data.pkl, not a torch.save file; {expected}")
    return "torch_zip"


def _is_pt2_archive(zf: zipfile.ZipFile, names: list[str]) -> bool:
    for name in names:
        if name.endswith("serialized_exported_program.json"):
            return True
        if name.rsplit("/", 1)[-1] == "archive_format" and zf.read(name).strip() == b"pt2":
            return True
    return False


def _describe_bytes(head: bytes) -> str:
    """'it looks like text: ...' or 'it starts with bytes ...' for a file of unknown kind."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it starts with bytes {head[:8]!r}"
    if all(c.isprintable() or c.isspace() for c in text):
        return f"it looks like text: {one_line(text, 40)!r}"
    return f"it starts with bytes {head[:8]!r}"


# --------------------------------------------------------------------------- import paths


@contextlib.contextmanager
def _import_paths(extra: Sequence[str | Path]) -> Iterator[None]:
    """For a while, sys.path is the installed packages, then the cwd, then ``extra``.

    The cwd and ``extra`` come last, so the model's own modules can be imported from them but a
    file there (``transformers.py``) never shadows an installed package.
    """
    for entry in extra:
        if not Path(entry).is_dir():
            raise UsageError(
                f"--import-path {entry}: no such directory; pass a directory that holds your model's package"
            )
    with installed_packages_first(extra):
        yield


def _import_for_factory(module_name: str) -> types.ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise LoadError(
            f"--factory: cannot import module {module_name} ({one_line(exc)}); run from the "
            "project root or pass --import-path DIR"
        ) from exc
    except Exception as exc:  # the user's module failed while importing
        raise LoadError(
            f"--factory: importing {module_name} failed ({type(exc).__name__}: {one_line(exc)}); fix that module"
        ) from exc


# --------------------------------------------------------------------------- torch.load


def _torch_load(path: Path, *, trust_pickle: bool, allow_classes: bool,
                import_paths: Sequence[str | Path] = ()) -> Any:
    """torch.load through the strict unpickler after the verdict, or plainly when the user trusts the file."""
    expected = EXPECTED_FORMS if allow_classes else TENSOR_FORMS
    if trust_pickle:
        return _call_torch_load(path, pickle_module=None, expected=expected)
    policy = check_pickle(path, allow_classes=allow_classes, user_paths=import_paths)
    return _call_torch_load(path, pickle_module=strict_unpickler.pickle_module(policy), expected=expected)


def _call_torch_load(path: Path, *, pickle_module: Any, expected: str = EXPECTED_FORMS) -> Any:
    try:
        if pickle_module is None:
            return torch.load(path, weights_only=False, map_location="cpu")
        return torch.load(path, weights_only=False, map_location="cpu", pickle_module=pickle_module)
    except strict_unpickler.StorageTooLarge as exc:
        raise LoadError(f"{path}: {one_line(exc, 160)} (a hostile or corrupt file?); re-save the model, or pass "
                        f"{TRUST_FLAG} if you trust this file") from exc
    except strict_unpickler.Refused as exc:
        raise UnsafePickleError(f"{path}: refusing to unpickle: {one_line(exc, 160)}; nothing of it was run. "
                                f"Re-run with {TRUST_FLAG} if you trust this file.") from exc
    except (ModuleNotFoundError, AttributeError) as exc:
        raise LoadError(
            f"{path}: cannot import a class the pickle needs ({one_line(exc, 120)}); run from the "
            "project root or pass --import-path DIR"
        ) from exc
    except RecursionError as exc:
        raise LoadError(f"{path}: nested too deeply to read; {expected}") from exc
    except MemoryError as exc:
        raise LoadError(f"{path}: reading it needs more memory than there is; {expected}") from exc
    except Exception as exc:
        raise LoadError(
            f"{path}: torch.load failed ({type(exc).__name__}: {one_line(exc, 160)}); {expected}"
        ) from exc


def _trust_note() -> str:
    return f"loaded with {TRUST_FLAG}: the file was unpickled without safety checks"


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
        raise LoadError(f"{path}: holds {_describe(obj)}, not a model; {EXPECTED_FORMS}")
    if factory is None:
        raise UsageError(
            f"{path}: holds a state_dict (weights without the architecture); pass --factory "
            "module:callable that builds the model (or --config DIR for a transformers model's weights)"
        )
    model = _build_with_factory(factory, import_paths)
    load_strict(model, state_dict, path, f"--factory {factory}")
    return model, "state_dict+factory"


def _is_state_dict(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    return all(
        isinstance(k, str) and (isinstance(v, torch.Tensor) or k.endswith("_extra_state")) for k, v in obj.items()
    )


def _find_state_dict(obj: Any) -> Mapping[str, Any] | None:
    """The object itself, or the state_dict under a usual checkpoint key."""
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            if _is_state_dict(obj.get(key)):
                return obj[key]
    return None


def _build_with_factory(factory: str, import_paths: Sequence[str | Path]) -> nn.Module:
    """Call the factory (load_model already holds ``import_paths`` on sys.path)."""
    build = import_callable(factory, import_paths=import_paths)
    try:
        model = build()
    except Exception as exc:
        raise LoadError(
            f"--factory {factory} failed ({type(exc).__name__}: {one_line(exc, 160)}); fix the factory"
        ) from exc
    if not isinstance(model, nn.Module):
        raise LoadError(
            f"--factory {factory} returned {_describe(model)}, not an nn.Module; it must build the model"
        )
    return model


_FACTORY_FIX = "pass the factory that built this checkpoint"


def load_strict(model: nn.Module, state_dict: Mapping[str, Any], path: Path, built_by: str, *,
                fix: str = _FACTORY_FIX) -> None:
    """load_state_dict(strict=True), with mismatches explained in one line ending in ``fix``.

    torch's own load runs first: modules may convert old key layouts on load (weight norm's
    weight_g/weight_v become parametrizations), which a comparison of key sets would refuse.
    """
    try:
        model.load_state_dict(state_dict, strict=True)
        return
    except RuntimeError as exc:
        error = exc
    expected, given = set(model.state_dict()), set(state_dict)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        parts = [f"missing keys {listing(missing)}"] if missing else []
        parts += [f"unexpected keys {listing(unexpected)}"] if unexpected else []
        detail = "; ".join(parts)
        hint = _prefix_hint(expected, given) or fix
    else:
        detail = "; ".join(line.strip() for line in str(error).splitlines()[1:] if line.strip()) or str(error)
        hint = fix
    raise LoadError(
        f"{path}: state_dict does not fit the model from {built_by}: {one_line(detail, 200)}; {hint}"
    ) from error


def _prefix_hint(expected: set[str], given: set[str]) -> str | None:
    if given and all(k.startswith("module.") for k in given) and {k[7:] for k in given} == expected:
        return "the keys carry a 'module.' prefix (saved from DataParallel): strip it and save again"
    return None


def _describe(obj: Any) -> str:
    """A short description of a loaded object for error messages."""
    if isinstance(obj, Mapping):
        keys = [repr(k) for k in obj]
        return f"a {type(obj).__name__} with keys {listing(keys)}" if keys else "an empty dict"
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    name = type(obj).__name__
    return f"an {name}" if name[:1].lower() in "aeiou" else f"a {name}"


def _contains_tensor(obj: Any) -> bool:
    """Whether a loaded object holds a tensor anywhere (walk.iter_leaves: iterative, each container once)."""
    return any(isinstance(leaf, torch.Tensor) for leaf in iter_leaves(obj))


# --------------------------------------------------------------------------- .pt2


@contextlib.contextmanager
def _deserialization_errors() -> Iterator[list[BaseException]]:
    """The errors ``torch.export.load`` logs (with a traceback on stderr) before it falls back to an older format."""
    caught: list[BaseException] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info and record.exc_info[1] is not None:
                caught.append(record.exc_info[1])

    logger = logging.getLogger("torch.export")  # torch gives it a stderr handler of its own
    handlers, propagate = list(logger.handlers), logger.propagate
    logger.handlers, logger.propagate = [Keep()], False
    try:
        yield caught
    finally:
        logger.handlers, logger.propagate = handlers, propagate


def _load_pt2(path: Path, *, trust_pickle: bool, notes: list[str]) -> LoadedModel:
    """torch.export.load after checking the archive (torch's loader is not weights-only)."""
    if not trust_pickle:
        check_pt2_archive(path)
    try:
        with _deserialization_errors() as deserializing:
            program = torch.export.load(str(path))
            module = program.module()
    except Exception as exc:
        cause = deserializing[0] if deserializing else exc  # torch logs the real error, then tries an older format
        unregistered = re.search(r"Deserializing (\S+) in pytree is not registered", str(cause))
        if unregistered:
            raise LoadError(
                f"{path}: the program's inputs or outputs use {unregistered[1]}, a type this process has not "
                f"registered with torch's pytree; re-export it returning plain tensors (transformers: "
                f"return_dict=False), or in Python import {unregistered[1].rsplit('.', 1)[0]} before loading"
            ) from exc
        raise LoadError(
            f"{path}: torch.export.load failed ({type(cause).__name__}: {one_line(cause, 160)}); "
            "re-export it with torch.export.save from this torch version"
        ) from exc
    return LoadedModel(model=module, source=path, form="exported_program", exported_program=program, notes=notes)
