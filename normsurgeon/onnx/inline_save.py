"""Write an ONNX model with its weights inline, one initializer at a time; read one without loading them.

``ir.save(model, path)`` builds the whole ModelProto, weights included, then serializes it: about
three times the weight bytes at once (the model's own tensors, their copies in the proto, the
serialized bytes). Here the weights first go to an external-data file (written tensor by
tensor), the small proto without them is written, and then each weight is appended as its own
``graph { initializer { … } }`` field. Protobuf merges repeated occurrences of a message field,
so every reader (onnx, onnxruntime) sees one graph with all its initializers; the file is an
ordinary single-file .onnx. Peak memory: the largest tensor, twice.

:func:`weights_in_place` is the reverse: the file's protobuf structure walked field by field (raw bytes skipped,
never read) into a small model whose large initializers refer to their own bytes inside the file as external data.
onnxruntime memory-maps external data (and a verification session, :func:`~normsurgeon.onnx.runtime.session`,
does not prepack it), so a session made from it holds the weights once, without the copy of every inline tensor
that parsing the whole file makes.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import onnx
import onnx_ir as ir

_MODEL_GRAPH = 7  # ModelProto.graph
_GRAPH_INITIALIZER = 5  # GraphProto.initializer
_TENSOR_RAW_DATA = 9  # TensorProto.raw_data
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
# Initializers at least this big are referenced in place; smaller ones (shapes, axes) stay inline, where
# onnxruntime's shape inference reads them.
IN_PLACE_MIN_BYTES = 64 * 2**10
_DATA = "weights.data"
_IN_FLIGHT = 64 * 2**20


def save_inline(model: ir.Model, path: Path, *, staging_dir: Path) -> None:
    """Write ``model`` to ``path`` as one .onnx file with inline weights, streaming them through a temporary
    external-data file in ``staging_dir`` (a folder with room for the weights, e.g. beside the target)."""
    with tempfile.TemporaryDirectory(prefix=".onnx-inline.", dir=staging_dir) as staging:
        staged = Path(staging) / "model.onnx"
        # one tensor in flight at a time: onnx_ir's default keeps up to 1 GiB of serialized tensors in flight
        ir.save(model, staged, external_data=_DATA, max_workers=1, max_in_flight_bytes=_IN_FLIGHT)
        proto = onnx.load(str(staged), load_external_data=False)
        external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        inline = [t for t in proto.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(inline)
        if _has_external(proto):  # a weight in a subgraph or function: not streamed, saved the plain way
            ir.save(model, path)
            return
        with open(path, "wb") as out, open(Path(staging) / _DATA, "rb") as data:
            out.write(proto.SerializeToString())
            for tensor in external:
                _append_initializer(out, tensor, data)


def _append_initializer(out, tensor: onnx.TensorProto, data) -> None:
    """Append ``graph { initializer { tensor } }`` to a serialized model in ``out``, its bytes read from the
    external-data file ``data``. The bytes never enter a protobuf message (a message keeps every byte string set on
    it in its arena until the whole model is freed): the tensor's small fields are serialized alone and its
    ``raw_data`` field is written after them, straight from the file."""
    where = {entry.key: entry.value for entry in tensor.external_data}
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
    head = tensor.SerializeToString()
    data.seek(int(where.get("offset", 0)))
    raw = data.read(int(where["length"]))
    raw_field = _tag(_TENSOR_RAW_DATA) + _varint(len(raw))
    tensor_length = len(head) + len(raw_field) + len(raw)
    initializer = _tag(_GRAPH_INITIALIZER) + _varint(tensor_length)
    graph_length = len(initializer) + tensor_length
    out.write(_tag(_MODEL_GRAPH) + _varint(graph_length) + initializer + head + raw_field)
    out.write(raw)


def _tag(number: int) -> bytes:
    return _varint((number << 3) | _LENGTH_DELIMITED)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def weights_in_place(path: Path, *, location: str, min_bytes: int = IN_PLACE_MIN_BYTES) -> bytes:
    """The model in ``path`` serialized again with every inline main-graph initializer of ``min_bytes`` or more
    turned into external data at its own offset in the file, named ``location`` (``path``'s name, for a session
    whose external-data folder is ``path``'s). Nothing else changes; the raw bytes are never read. A file that is
    not protobuf raises ValueError."""
    with open(path, "rb") as file:
        def tensor(span: tuple[int, int]) -> bytes:
            return _tensor_in_place(file, span, location, min_bytes)

        def graph(span: tuple[int, int]) -> bytes:
            return _rewrite_fields(file, span, _GRAPH_INITIALIZER, tensor)

        return _rewrite_fields(file, (0, file.seek(0, io.SEEK_END)), _MODEL_GRAPH, graph)


@dataclass(frozen=True)
class _Field:
    """One protobuf field of a file: its number, where its bytes (key included) are, and where a length-delimited
    value's payload is (offset, length)."""

    number: int
    start: int
    stop: int
    value: tuple[int, int] | None

    def read(self, file: BinaryIO) -> bytes:
        file.seek(self.start)
        return file.read(self.stop - self.start)


def _fields(file: BinaryIO, stop: int, *, start: int) -> Iterator[_Field]:
    """The fields between ``start`` and ``stop``; the caller may move ``file`` while it holds one."""
    position = start
    while position < stop:
        file.seek(position)
        key = _read_varint(file)
        number, wire = key >> 3, key & 7
        value = None
        if wire == _VARINT:
            _read_varint(file)
        elif wire in (_FIXED64, _FIXED32):
            file.seek(8 if wire == _FIXED64 else 4, io.SEEK_CUR)
        elif wire == _LENGTH_DELIMITED:
            length = _read_varint(file)
            value = (file.tell(), length)
            file.seek(length, io.SEEK_CUR)
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {position}: not an ONNX model")
        field = _Field(number, position, file.tell(), value)
        if field.stop > stop:
            raise ValueError(f"the field at byte {position} runs past its message: a truncated or foreign file")
        position = field.stop
        yield field


def _rewrite_fields(file: BinaryIO, message: tuple[int, int], number: int,
                    rewrite: Callable[[tuple[int, int]], bytes]) -> bytes:
    """The bytes of the message at ``message`` (offset, length) with each length-delimited field ``number``
    replaced by ``rewrite`` of its payload's span; every other field copied as it is."""
    out = io.BytesIO()
    offset, length = message
    for field in _fields(file, offset + length, start=offset):
        if field.number == number and field.value is not None:
            payload = rewrite(field.value)
            out.write(_tag(number) + _varint(len(payload)) + payload)
        else:
            out.write(field.read(file))
    return out.getvalue()


def _tensor_in_place(file: BinaryIO, tensor: tuple[int, int], location: str, min_bytes: int) -> bytes:
    """A TensorProto's bytes; when its raw_data has ``min_bytes`` or more, without it and with an external-data
    reference to where it sits in the file instead."""
    head, raw = io.BytesIO(), None
    offset, length = tensor
    for field in _fields(file, offset + length, start=offset):
        if field.number == _TENSOR_RAW_DATA and field.value is not None and field.value[1] >= min_bytes:
            raw = field.value
        else:
            head.write(field.read(file))
    if raw is None:
        file.seek(offset)
        return file.read(length)
    proto = onnx.TensorProto.FromString(head.getvalue())
    proto.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(raw[0])), ("length", str(raw[1]))):
        entry = proto.external_data.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def _read_varint(file: BinaryIO) -> int:
    value = shift = 0
    while True:
        byte = file.read(1)
        if not byte:
            raise ValueError("the file ends inside a protobuf field: a truncated or foreign file")
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("a protobuf varint longer than 10 bytes: not an ONNX model")


def _has_external(proto: onnx.ModelProto) -> bool:
    """Whether any tensor left in ``proto`` (nested graphs, functions, attributes) refers to external data."""
    try:
        from onnx.external_data_helper import _get_all_tensors
    except ImportError:  # another onnx layout: assume there is (the caller then saves the plain way)
        return True
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _get_all_tensors(proto))
