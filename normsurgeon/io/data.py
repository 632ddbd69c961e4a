"""Calibration / init data: batches of model inputs from a tensor, a file or a folder of files.

A *batch* is what the model is called with: a tuple of positional arguments or a dict of
keyword arguments. What a source holds becomes batches like this:

* a tensor -> one batch ``(tensor,)``; a tuple -> one batch of positional arguments;
  a dict -> one batch of keyword arguments; a list -> one batch per element;
* a ``.pt``/``.pth`` file (read weights-only, see :func:`normsurgeon.io.loading.load_tensors`)
  holds any of the above; a ``.npz`` holds arrays (``np.savez(x)`` -> positional,
  ``np.savez(input_ids=...)`` -> keyword); a folder -> the batches of its files, by name.

``batch_size`` re-batches: all batches are concatenated along dim 0 and cut into chunks of
that size (a last, smaller chunk is dropped when there is a full one, because BatchNorm's
cumulative average weighs every batch equally).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from ..errors import LoadError, UsageError
from ..trace import call_model

Batch = Union[tuple, dict]
DATA_SUFFIXES = (".pt", ".pth", ".npz")


@dataclass
class Batches:
    """Batches ready to call a model with, and where they came from."""

    batches: list[Batch]
    description: str
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.batches)


def load_batches(source: Any, *, trust_pickle: bool = False, batch_size: int | None = None) -> Batches:
    """Batches from a tensor/tuple/dict/list in memory, a tensor file, or a folder of them."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        batches = _from_folder(path, trust_pickle) if path.is_dir() else _from_file(path, trust_pickle)
        description = f"data from {path}"
    else:
        batches = as_batches(source, "the data")
        description = "data given in Python"
    result = Batches(batches, description)
    if batch_size is not None:
        _rebatch(result, batch_size)
    samples = sum(batch_length(b) or 0 for b in result.batches)
    result.description += f" ({len(result.batches)} batch(es), {samples} samples)"
    return result


def as_batches(obj: Any, label: str) -> list[Batch]:
    """Turn a loaded object into a list of batches (see the module docstring)."""
    if isinstance(obj, torch.Tensor):
        return [(obj,)]
    if isinstance(obj, tuple):
        return [obj]
    if isinstance(obj, dict):
        return [dict(obj)]
    if isinstance(obj, list):
        batches: list[Batch] = []
        for item in obj:
            if isinstance(item, list):
                item = tuple(item)
            batches.extend(as_batches(item, label))
        if not batches:
            raise LoadError(f"{label} is an empty list; give at least one batch of tensors")
        return batches
    raise LoadError(f"{label} holds a {type(obj).__name__}; expected a tensor, a tuple/list or a dict of tensors")


def _from_file(path: Path, trust_pickle: bool) -> list[Batch]:
    if not path.exists():
        raise LoadError(f"{path}: no such file or folder; check the --data path")
    if path.suffix == ".npz":
        return [_from_npz(path)]
    from .loading import load_tensors

    return as_batches(load_tensors(path, trust_pickle=trust_pickle), str(path))


def _from_npz(path: Path) -> Batch:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: torch.from_numpy(archive[name].copy()) for name in archive.files}
    except (ValueError, OSError) as exc:
        raise LoadError(f"{path}: not a readable .npz of numeric arrays ({exc}); save it with numpy.savez") from exc
    if not arrays:
        raise LoadError(f"{path}: the .npz holds no arrays; save the input arrays with numpy.savez")
    positional = [f"arr_{i}" for i in range(len(arrays))]
    if sorted(arrays) == sorted(positional):
        return tuple(arrays[name] for name in positional)
    return arrays


def _from_folder(path: Path, trust_pickle: bool) -> list[Batch]:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
    if not files:
        raise LoadError(
            f"{path}: the folder holds no data files ({', '.join(DATA_SUFFIXES)}); "
            "save batches there with torch.save or numpy.savez"
        )
    batches: list[Batch] = []
    for file in files:
        batches.extend(_from_file(file, trust_pickle))
    return batches


def batch_length(batch: Batch) -> int | None:
    """The size of dim 0 of the batch's first tensor (None when it has no tensor)."""
    values = batch.values() if isinstance(batch, dict) else batch
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def _rebatch(data: Batches, size: int) -> None:
    if size < 1:
        raise UsageError(f"batch size {size}: must be at least 1")
    whole = _concatenate(data.batches)
    total = batch_length(whole) or 0
    chunks = [_slice(whole, start, min(start + size, total)) for start in range(0, total, size)]
    if len(chunks) > 1 and total % size:
        chunks.pop()
        data.notes.append(f"dropped the last {total % size} samples (a partial batch of the {size} asked for)")
    data.batches = chunks


def _concatenate(batches: list[Batch]) -> Batch:
    first = batches[0]
    try:
        if isinstance(first, dict):
            return {k: _cat([b[k] for b in batches]) for k in first}
        return tuple(_cat([b[i] for b in batches]) for i in range(len(first)))
    except (KeyError, IndexError, TypeError, RuntimeError) as exc:
        raise LoadError(f"cannot re-batch the data: its batches differ in structure or shape ({exc}); drop --batch-size") from exc


def _cat(values: list[Any]) -> Any:
    if all(isinstance(v, torch.Tensor) and v.dim() > 0 for v in values):
        return torch.cat(values)
    if all(v == values[0] for v in values):  # a non-tensor argument shared by every batch
        return values[0]
    raise TypeError("non-tensor arguments differ between batches")


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    def cut(value: Any) -> Any:
        return value[start:stop] if isinstance(value, torch.Tensor) and value.dim() > 0 else value

    if isinstance(batch, dict):
        return {k: cut(v) for k, v in batch.items()}
    return tuple(cut(v) for v in batch)


def describe_shapes(batch: Batch) -> str:
    """'(8, 3, 32, 32)' or 'input_ids (2, 16) int64, mask (2, 16)' for error messages."""

    def one(value: Any) -> str:
        if not isinstance(value, torch.Tensor):
            return repr(value)
        dtype = "" if value.dtype == torch.float32 else f" {str(value.dtype).removeprefix('torch.')}"
        return f"{tuple(value.shape)}{dtype}"

    if isinstance(batch, dict):
        return ", ".join(f"{k} {one(v)}" for k, v in batch.items())
    return ", ".join(one(v) for v in batch)


def expected_input(model: nn.Module) -> str | None:
    """What the model's first layer says about its input, e.g. 'Linear expects (N, 32)'."""
    first = next((m for m in model.modules()
                  if next(m.children(), None) is None and any(True for _ in m.parameters(recurse=False))), None)
    if isinstance(first, nn.modules.conv._ConvNd) and not first.transposed:
        spatial = ", ".join("L" if len(first.kernel_size) == 1 else f"S{i}" for i in range(len(first.kernel_size)))
        return f"its first layer {type(first).__name__} expects (N, {first.in_channels}, {spatial})"
    if isinstance(first, nn.modules.conv._ConvNd):
        return f"its first layer {type(first).__name__} expects {first.in_channels} channels on dim 1"
    if isinstance(first, nn.Linear):
        return f"its first layer Linear expects (..., {first.in_features})"
    if isinstance(first, nn.Embedding):
        return f"its first layer Embedding expects integer ids below {first.num_embeddings}"
    return None


def check_fits(model: nn.Module, batch: Batch, *, what: str = "data") -> Any:
    """Run the model once (no grad) on ``batch``; a clear UsageError naming both shapes if it fails."""
    try:
        with torch.no_grad():
            return call_model(model, batch)
    except Exception as exc:  # the user's data does not fit the user's model
        lines = str(exc).strip().splitlines()
        expected = expected_input(model)
        hint = f"; {expected}" if expected else ""
        raise UsageError(
            f"the {what} does not fit the model: a batch of shape {describe_shapes(batch)} failed "
            f"({type(exc).__name__}: {lines[0] if lines else ''}){hint}; pass data shaped for the model"
        ) from exc


def to_model(batch: Batch, model: nn.Module) -> Batch:
    """Float tensors to the model's device and floating dtype; other values as they are."""
    from .inputs import to_model_dtype_and_device

    return to_model_dtype_and_device(batch, model)
