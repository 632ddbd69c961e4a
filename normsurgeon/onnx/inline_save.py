"""Write an ONNX model with its weights inline, one initializer at a time.

``ir.save(model, path)`` builds the whole ModelProto, weights included, then serializes it: about
three times the weight bytes at once (the model's own tensors, their copies in the proto, the
serialized bytes). Here the weights first go to an external-data file (written tensor by
tensor), the small proto without them is written, and then each weight is appended as its own
``graph { initializer { … } }`` field. Protobuf merges repeated occurrences of a message field,
so every reader (onnx, onnxruntime) sees one graph with all its initializers; the file is an
ordinary single-file .onnx. Peak memory: the largest tensor, twice.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

_MODEL_GRAPH = 7  # ModelProto.graph
_GRAPH_INITIALIZER = 5  # GraphProto.initializer
_TENSOR_RAW_DATA = 9  # TensorProto.raw_data
_LENGTH_DELIMITED = 2
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


def _has_external(proto: onnx.ModelProto) -> bool:
    """Whether any tensor left in ``proto`` (nested graphs, functions, attributes) refers to external data."""
    try:
        from onnx.external_data_helper import _get_all_tensors
    except ImportError:  # another onnx layout: assume there is (the caller then saves the plain way)
        return True
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _get_all_tensors(proto))
