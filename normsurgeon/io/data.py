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

import reprlib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LoadError, UsageError, first_line
from ..inputs import PlainInputs
from ..trace import call_model
from ..walk import check_nesting

Batch = PlainInputs  # a batch of data: the tuple or dict of arguments the model is called with
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
        check_nesting(source, "the data")
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

    loaded = load_tensors(path, trust_pickle=trust_pickle)
    check_nesting(loaded, str(path))  # a cycle or absurd depth: one line; a DAG is fine (walks visit it once)
    return as_batches(loaded, str(path))


def _from_npz(path: Path) -> Batch:
    import numpy as np

    _check_npz_sizes(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: torch.from_numpy(archive[name].copy()) for name in archive.files}
    except (ValueError, OSError, TypeError, zipfile.BadZipFile, EOFError) as exc:
        raise LoadError(f"{path}: not a readable .npz of numeric arrays ({first_line(exc, 160)}); "
                        "save it with numpy.savez") from exc
    except MemoryError as exc:
        raise LoadError(f"{path}: its arrays need more memory than there is; pass a smaller .npz") from exc
    if not arrays:
        raise LoadError(f"{path}: the .npz holds no arrays; save the input arrays with numpy.savez")
    positional = [f"arr_{i}" for i in range(len(arrays))]
    if sorted(arrays) == sorted(positional):
        return tuple(arrays[name] for name in positional)
    return arrays


# A .npz may inflate to this many times its own size, or to NPZ_MIN_BOUND bytes, whichever is more:
# np.savez stores arrays as they are (ratio 1), savez_compressed shrinks real data a few times; a
# file that would inflate beyond this is a zip bomb, refused before anything is inflated.
NPZ_MAX_RATIO = 64
NPZ_MIN_BOUND = 256 * 2**20


def npz_bound(file_size: int) -> int:
    """The most bytes the arrays of a ``file_size``-byte .npz may take once read."""
    return max(NPZ_MIN_BOUND, NPZ_MAX_RATIO * file_size)


def _check_npz_sizes(path: Path) -> None:
    """Refuse, before numpy reads anything, a .npz whose members or array headers claim more than it can hold.

    The zip directory's inflated sizes must add up to at most :func:`npz_bound` of the file size,
    and each ``.npy`` header's shape x itemsize must fit in its member (numpy allocates the
    array from the header before reading it; zipfile stops inflating at the directory's size).
    """
    import math

    file_size = path.stat().st_size
    bound = npz_bound(file_size)
    try:
        with zipfile.ZipFile(path) as archive:
            total = 0
            for info in archive.infolist():
                total += info.file_size
                if total > bound:
                    raise LoadError(
                        f"{path}: member {info.filename} inflates to {_bytes(info.file_size)} "
                        f"({_bytes(total)} so far), "
                        f"more than the {_bytes(bound)} a {_bytes(file_size)} .npz may hold (a zip bomb?); "
                        "save the arrays with numpy.savez (uncompressed)"
                    )
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as member:
                    shape, dtype = _npy_header(member)
                if dtype.hasobject:
                    continue  # np.load(allow_pickle=False) refuses it with its own message
                claimed = math.prod(shape) * dtype.itemsize
                if claimed > info.file_size:
                    raise LoadError(
                        f"{path}: array {info.filename[:-4]} claims shape {tuple(shape)} {dtype} = {_bytes(claimed)}, "
                        f"but its member holds {_bytes(info.file_size)} (a hostile or corrupt file?); "
                        "save the arrays with numpy.savez"
                    )
    except LoadError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, TypeError, NotImplementedError,
            RuntimeError) as exc:
        raise LoadError(f"{path}: not a readable .npz of numeric arrays ({first_line(exc, 160, named=True)}); "
                        "save it with numpy.savez") from exc


def _npy_header(member: Any) -> tuple[tuple[int, ...], Any]:
    """(shape, dtype) from the header of a .npy stream, read with numpy's bounded header parser."""
    from numpy.lib import format as npy_format

    version = npy_format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = npy_format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, _, dtype = npy_format.read_array_header_2_0(member)
    else:
        try:  # version 3.0 (utf-8 field names): numpy's own reader, where it has one
            from numpy.lib._format_impl import _read_array_header
        except ImportError:
            from numpy.lib.format import _read_array_header  # type: ignore[attr-defined,no-redef]
        shape, _, dtype = _read_array_header(member, version)
    return tuple(int(d) for d in shape), dtype


def _bytes(n: int) -> str:
    """1536 -> '1.5 KiB'; 8796093022208 -> '8 TiB'."""
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{n} bytes" if unit == "bytes" else f"{value:.3g} {unit}"
        value /= 1024
    return f"{n} bytes"


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
    if all(_same_value(v, values[0]) for v in values):  # a non-tensor argument shared by every batch
        return values[0]
    raise TypeError("non-tensor arguments differ between batches")


def _same_value(a: Any, b: Any) -> bool:
    """``a == b`` for nested arguments, iteratively and each pair of containers once (a DAG stays linear)."""
    pending, compared = [(a, b)], set()
    while pending:
        x, y = pending.pop()
        if x is y:
            continue
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)):
                return False
            continue
        if type(x) is not type(y):
            return False
        if isinstance(x, (list, tuple)):
            if len(x) != len(y):
                return False
            if (id(x), id(y)) not in compared:
                compared.add((id(x), id(y)))
                pending.extend(zip(x, y))
            continue
        if isinstance(x, dict):
            if list(x) != list(y):
                return False
            if (id(x), id(y)) not in compared:
                compared.add((id(x), id(y)))
                pending.extend((x[k], y[k]) for k in x)
            continue
        try:
            if not bool(x == y):
                return False
        except Exception:
            return False
    return True


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    def cut(value: Any) -> Any:
        return value[start:stop] if isinstance(value, torch.Tensor) and value.dim() > 0 else value

    if isinstance(batch, dict):
        return {k: cut(v) for k, v in batch.items()}
    return tuple(cut(v) for v in batch)


def describe_shapes(batch: Batch) -> str:
    """'(8, 3, 32, 32)' or 'input_ids (2, 16) int64, mask (2, 16)' for error messages."""

    def one(value: Any) -> str:
        if isinstance(value, (list, tuple, dict)):  # not repr: a nested (or shared, or deep) structure has no end
            return f"a {type(value).__name__} of {len(value)} items"
        if not isinstance(value, torch.Tensor):
            return reprlib.repr(value)
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
        expected = expected_input(model)
        hint = f"; {expected}" if expected else ""
        raise UsageError(
            f"the {what} does not fit the model: a batch of shape {describe_shapes(batch)} failed "
            f"({first_line(exc, named=True)}){hint}; pass data shaped for the model"
        ) from exc


def to_model(batch: Batch, model: nn.Module) -> Batch:
    """Float tensors to the model's device and floating dtype; other values as they are."""
    from .inputs import to_model_dtype_and_device

    return to_model_dtype_and_device(batch, model)
