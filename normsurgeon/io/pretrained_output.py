"""Write a changed transformers model back as a save_pretrained directory, only where it reloads the same.

transformers rebuilds a model from its class and config, then loads the weights by name: a layer
the surgery changed in a way the class cannot express (a BatchNorm folded into a conv that
transformers builds without a bias) silently reloads wrong. So the directory is written to a
hidden folder beside the target, reloaded there with ``from_pretrained`` (offline), and run on
the example inputs; only when the reloaded model matches the changed one is the folder renamed
into place. Otherwise nothing is written there and :class:`DoesNotRoundTrip` says why.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normsurgeon.errors import OutputError

from ..check import compare_outputs
from ..report import Check
from ..trace import call_model
from .huggingface import offline


class DoesNotRoundTrip(OutputError):
    """A save_pretrained directory of this model would not reload as the same model (``why`` says how)."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"not writing {path}: {why}; write a file instead, e.g. -o {path.with_suffix('.pt')} "
                         "or export it to .onnx")
        self.why = why


def wants_directory(output: Path | None, loaded_form: str) -> bool:
    """A save_pretrained model gets a directory unless ``-o`` names a file (it has a suffix)."""
    return loaded_form == "pretrained_dir" and (output is None or output.suffix == "")


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


def save_pretrained_checked(model: nn.Module, path: Path, example_inputs: tuple | dict, *, force: bool,
                            protect: list[Path]) -> Check:
    """``model.save_pretrained(path)``, proven by reloading it: returns the check, or raises DoesNotRoundTrip."""
    check_directory_target(path, force=force, protect=protect)
    staging = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        model.save_pretrained(staging)
        check = _reload_check(model, staging, example_inputs)
        if not check.passed:
            raise DoesNotRoundTrip(path, (
                f"a save_pretrained directory of the changed model reloads different (by {check.max_abs_diff:.3g}: "
                f"{type(model).__name__} cannot hold what the surgery changed, e.g. a bias a fold gave a conv built "
                "without one)"))
        _put_in_place(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return check


def _reload_check(model: nn.Module, folder: Path, example_inputs: tuple | dict) -> Check:
    with offline():
        reloaded = type(model).from_pretrained(str(folder), local_files_only=True).eval()
    reloaded.to(next(model.parameters()).device)
    with torch.no_grad():
        want: Any = call_model(model, example_inputs)
        got: Any = call_model(reloaded, example_inputs)
    return compare_outputs(want, got, atol=None, rtol=None, label="save_pretrained reloaded vs written")


def _put_in_place(staging: Path, path: Path) -> None:
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
