"""A save_pretrained folder's safetensors weights, read and written one tensor at a time.

:class:`ShardedCheckpoint` reads the index (``model.safetensors.index.json``, or the one
``model.safetensors``) and every shard's header, so that any tensor can be read alone without
loading its shard. :class:`ShardWriter` writes shards whose headers are fixed up front (the names,
dtypes and shapes are known before the first tensor is computed) and whose tensors then arrive in
any order, each written at its offset: a model edited one block at a time is written without ever
holding a whole shard.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from normsurgeon.errors import LoadError

from .pickle_safety import one_line

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # a larger header is not a safetensors file
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor of a checkpoint lies: its shard (a file name in the folder), dtype and shape."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


class ShardedCheckpoint:
    """The safetensors weights of a save_pretrained folder: names, where each lies, and reads of single tensors."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.index_metadata: dict = {}
        self.entries: dict[str, TensorEntry] = {}
        self.file_metadata: dict[str, dict[str, str]] = {}
        for file in self._files():
            header = read_header(folder / file)
            self.file_metadata[file] = header.pop("__metadata__", None) or {}
            for name, info in header.items():
                self.entries[name] = _entry(folder / file, file, name, info)

    @property
    def sharded(self) -> bool:
        return (self.folder / INDEX).is_file()

    def _files(self) -> list[str]:
        if not self.sharded:
            if not (self.folder / SINGLE).is_file():
                raise LoadError(f"{self.folder}: no {SINGLE} or {INDEX}; streaming needs safetensors weights "
                                "(re-save with save_pretrained(..., safe_serialization=True))")
            return [SINGLE]
        try:
            index = json.loads((self.folder / INDEX).read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise LoadError(f"{self.folder / INDEX}: not a safetensors index ({one_line(exc, 80)}); re-save the "
                            "model with save_pretrained") from exc
        self.index_metadata = index.get("metadata") or {}
        files = sorted(set(weight_map.values()))
        for file in files:
            if not isinstance(file, str) or Path(file).name != file or not (self.folder / file).is_file():
                raise LoadError(f"{self.folder / INDEX}: names shard {file!r}, which is not a file in that folder")
        return files

    def files(self) -> list[str]:
        """The shard file names, in order."""
        return sorted(self.file_metadata)

    def read(self, names: Iterable[str] | Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """The named tensors, read from their shards (each a fresh CPU tensor); given a mapping of names to
        shapes, only each tensor's leading part of that shape is read (the first rows of an embedding)."""
        from safetensors import safe_open

        shapes = names if isinstance(names, Mapping) else dict.fromkeys(names)
        by_file: dict[str, list[str]] = {}
        for name in shapes:
            by_file.setdefault(self.entries[name].file, []).append(name)
        tensors = {}
        for file, wanted in by_file.items():
            with safe_open(str(self.folder / file), framework="pt", device="cpu") as handle:
                for name in wanted:
                    shape = shapes[name]
                    whole = shape is None or tuple(shape) == self.entries[name].shape
                    tensors[name] = handle.get_tensor(name) if whole else \
                        handle.get_slice(name)[tuple(slice(0, size) for size in shape)]
        return tensors


def read_header(path: Path) -> dict:
    """A safetensors file's JSON header (tensor name -> dtype, shape, data_offsets; and ``__metadata__``)."""
    with open(path, "rb") as f:
        head = f.read(8)
        (length,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
        if not 0 < length <= min(MAX_HEADER_BYTES, path.stat().st_size - 8):
            raise LoadError(f"{path}: not a safetensors file (header length {length}); re-save it")
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError) as exc:
            raise LoadError(f"{path}: unreadable safetensors header ({one_line(exc, 80)}); re-save it") from exc
    if not isinstance(header, dict):
        raise LoadError(f"{path}: safetensors header is not an object; re-save it")
    return header


def _entry(path: Path, file: str, name: str, info: object) -> TensorEntry:
    if not isinstance(info, dict) or info.get("dtype") not in _DTYPES or not isinstance(info.get("shape"), list):
        raise LoadError(f"{path}: tensor {name!r} has a dtype or shape normsurgeon does not read ({one_line(info, 80)})")
    return TensorEntry(file, _DTYPES[info["dtype"]], tuple(int(size) for size in info["shape"]))


class ShardWriter:
    """Writes safetensors shards into ``folder`` whose layout (file -> name -> entry) is fixed up front.

    Each shard file is created at its full size with its header; :meth:`write` puts a tensor at its
    offset, in any order; :meth:`close` refuses a shard with a tensor never written.
    """

    def __init__(self, folder: Path, layout: Mapping[str, Mapping[str, TensorEntry]],
                 metadata: Mapping[str, Mapping[str, str]]) -> None:
        self.folder = folder
        self.where: dict[str, tuple[str, int, TensorEntry]] = {}  # name -> shard, offset, entry
        self._missing: set[str] = set()
        for file, tensors in layout.items():
            header: dict[str, object] = {"__metadata__": dict(metadata.get(file) or {"format": "pt"})}
            offset = 0
            for name, entry in tensors.items():
                header[name] = {"dtype": _NAMES[entry.dtype], "shape": list(entry.shape),
                                "data_offsets": [offset, offset + entry.nbytes]}
                offset += entry.nbytes
            encoded = json.dumps(header, separators=(",", ":")).encode()
            encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
            with open(folder / file, "wb") as f:
                f.write(struct.pack("<Q", len(encoded)) + encoded)
                f.truncate(8 + len(encoded) + offset)
            start = 8 + len(encoded)
            for name, entry in tensors.items():
                self.where[name] = (file, start + header[name]["data_offsets"][0], entry)  # type: ignore[index]
                self._missing.add(name)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` as ``name`` (its dtype and shape must be those of the layout)."""
        file, offset, entry = self.where[name]
        if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise ValueError(f"{name}: {tensor.dtype} {tuple(tensor.shape)} does not fit the layout's "
                             f"{entry.dtype} {entry.shape}")
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        with open(self.folder / file, "r+b") as f:
            f.seek(offset)
            f.write(memoryview(data))
        self._missing.discard(name)

    def close(self) -> None:
        """Refuse a layout with a tensor never written (its bytes would be zeros)."""
        if self._missing:
            raise RuntimeError(f"{len(self._missing)} tensors were never written (e.g. {sorted(self._missing)[0]})")
