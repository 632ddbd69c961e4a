"""Write a changed transformers model back as a save_pretrained directory, only where it reloads the same.

transformers rebuilds a model from its class and config, then loads the weights by name: a layer
the surgery changed in a way the class cannot express (a BatchNorm folded into a conv that
transformers builds without a bias, a norm converted to torch's own class, weight norm removed
from a conv the class weight-norms when it is built) silently reloads wrong or reloads as the
unchanged architecture. So the directory is written to a hidden folder beside the target, reloaded
there with ``from_pretrained`` (offline), and compared with the changed model: the same layer
classes at the same paths, every tensor loaded and equal, the same outputs on the example inputs.
Only then is the folder renamed into place; otherwise nothing is written there and
:class:`DoesNotRoundTrip` says why.

:func:`output_target` and :func:`write_model` are what a command uses: a save_pretrained input
gets a directory unless ``-o`` names a file; a default directory that would reload wrong becomes a
``.pt`` beside the folder (with a note), an explicit ``-o DIR`` is refused.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normsurgeon.errors import OutputError

from ..check import compare_outputs
from ..inputs import InputsLike
from ..report import Check, Report
from ..trace import call_model
from .huggingface import offline, quiet_transformers
from .saving import check_output_path, save_module


class DoesNotRoundTrip(OutputError):
    """A save_pretrained directory of this model would not reload as the same model (``why`` says how)."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"not writing {path}: {why}; write a file instead, e.g. -o {path.with_suffix('.pt')} "
                         "or export it to .onnx")
        self.why = why


@dataclass(frozen=True)
class OutputTarget:
    """Where a command writes its model: a save_pretrained directory (``directory``) or a file, at ``path``."""

    path: Path
    directory: bool
    fallback: Path  # the file written instead when a default directory would reload wrong
    explicit: bool  # -o named it: a directory that would reload wrong is refused, not replaced


def wants_directory(output: Path | None, loaded_form: str) -> bool:
    """A save_pretrained model gets a directory unless ``-o`` names a file (it has a suffix)."""
    return loaded_form == "pretrained_dir" and (output is None or output.suffix == "")


def output_target(output: Path | None, loaded_form: str, default: Path, *, force: bool,
                  protect: list[Path]) -> OutputTarget:
    """The output path, checked before any work: a directory for a save_pretrained model, else the file."""
    if wants_directory(output, loaded_form):
        path = output or default.with_suffix("")
        check_directory_target(path, force=force, protect=protect)
        return OutputTarget(path, True, default, output is not None)
    path = check_output_path(output or default, force=force, protect=protect)
    return OutputTarget(path, False, default, output is not None)


def write_model(report: Report, example_inputs: InputsLike, target: OutputTarget, *, force: bool,
                protect: list[Path]) -> Path:
    """Write ``report.model`` to ``target``; returns the path written.

    A directory is written only where it reloads the same (its check joins the report); by
    default one that would not is written as the fallback ``.pt``, with a note saying why.
    """
    path = target.path
    if target.directory:
        try:
            report.checks.append(save_pretrained_checked(report.model, path, example_inputs, force=force,
                                                         protect=protect))
            return path
        except DoesNotRoundTrip as refusal:
            if target.explicit:
                raise
            report.notes.append(f"wrote {target.fallback} instead of a save_pretrained directory: {refusal.why}")
            path = check_output_path(target.fallback, force=force, protect=protect)
    save_module(report.model, path, force=force, protect=protect)
    return path


def check_directory_target(path: Path, *, force: bool, protect: list[Path]) -> None:
    """The checks a file output gets (not an input, parent writable, exists only with --force), for a folder."""
    for protected in protect:
        if path.resolve() == Path(protected).resolve() or Path(protected).resolve().is_relative_to(path.resolve()):
            raise OutputError(f"refusing to write {path}: it holds the input {protected}; choose another path with -o")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: {path.parent} is not a writable directory; choose another path with -o")
    if path.exists() or path.is_symlink():
        if not force:
            raise OutputError(f"{path} exists; pass --force to replace it")
        if not path.is_dir() or path.is_symlink() or not (path / "config.json").exists():
            raise OutputError(f"refusing to replace {path}: it is not a save_pretrained directory; choose another path "
                              "with -o")


def save_pretrained_checked(model: nn.Module, path: Path, example_inputs: InputsLike, *, force: bool,
                            protect: list[Path]) -> Check:
    """``model.save_pretrained(path)``, proven by reloading it: returns the check, or raises DoesNotRoundTrip."""
    check_directory_target(path, force=force, protect=protect)
    staging = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        with offline(), quiet_transformers():  # what it would warn about, the checks below say
            model.save_pretrained(staging)
            reloaded = type(model).from_pretrained(str(staging), local_files_only=True).eval()
        lost = lost_in_reload(model, reloaded)
        check = _outputs_check(model, reloaded, example_inputs)
        if lost or not check.passed:
            why = lost or f"its outputs differ by {check.max_abs_diff:.3g}"
            raise DoesNotRoundTrip(path, f"a save_pretrained directory of the changed model reloads different ({why}: "
                                         f"{type(model).__name__} cannot hold what the surgery changed)")
        put_in_place(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return check


def lost_in_reload(written: nn.Module, reloaded: nn.Module) -> str | None:
    """What ``reloaded`` does not have of ``written``: other layer classes, tensors not loaded or unequal; None if nothing."""
    classes = _differences(_layer_classes(written), _layer_classes(reloaded))
    if classes:
        name, want, got = classes[0]
        return f"it rebuilds {got or 'nothing'} where the written model has {want or 'nothing'} at {name or 'the top'}" \
               f"{_more(classes)}"
    mine, theirs = written.state_dict(), reloaded.state_dict()
    dropped = [k for k in mine if k not in theirs]
    added = [k for k in theirs if k not in mine]
    if dropped or added:
        parts = ([f"{len(dropped)} written tensors are not loaded (e.g. {dropped[0]})"] if dropped else []) + \
                ([f"{len(added)} tensors are initialised afresh (e.g. {added[0]})"] if added else [])
        return ", ".join(parts)
    unequal = [k for k, v in mine.items() if not _same_tensor(v, theirs[k])]
    if unequal:
        return f"{len(unequal)} tensors reload with other values (e.g. {unequal[0]})"
    return None


def _layer_classes(model: nn.Module) -> dict[str, str]:
    return {name: type(module).__name__ for name, module in model.named_modules()}


def _differences(want: dict[str, str], got: dict[str, str]) -> list[tuple[str, str | None, str | None]]:
    names: Iterable[str] = dict.fromkeys([*want, *got])
    return [(n, want.get(n), got.get(n)) for n in names if want.get(n) != got.get(n)]


def _more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.detach().cpu(), b.detach().cpu())


def _outputs_check(model: nn.Module, reloaded: nn.Module, example_inputs: InputsLike) -> Check:
    reloaded.to(next(model.parameters()).device)
    with torch.no_grad():
        want: Any = call_model(model, example_inputs)
        got: Any = call_model(reloaded, example_inputs)
    return compare_outputs(want, got, atol=None, rtol=None, label="save_pretrained reloaded vs written")


def put_in_place(staging: Path, path: Path) -> None:
    """Rename the finished folder into place; an old one (--force) is moved aside first, then removed."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.{secrets.token_hex(8)}.old")
        os.rename(path, old)
    try:
        os.rename(staging, path)
    except OSError:
        if old is not None:
            os.rename(old, path)
        raise
    if old is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(old)
