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
_LENGTH_DELIMITED = 2
_DATA = "weights.data"


def save_inline(model: ir.Model, path: Path, *, staging_dir: Path) -> None:
    """Write ``model`` to ``path`` as one .onnx file with inline weights, streaming them through a temporary
    external-data file in ``staging_dir`` (a folder with room for the weights, e.g. beside the target)."""
    with tempfile.TemporaryDirectory(prefix=".onnx-inline.", dir=staging_dir) as staging:
        staged = Path(staging) / "model.onnx"
        ir.save(model, staged, external_data=_DATA)
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
                out.write(_initializer_field(_read_inline(tensor, data)))


def _read_inline(tensor: onnx.TensorProto, data) -> bytes:
    """``tensor`` with its bytes read from the external-data file put inline, serialized."""
    where = {entry.key: entry.value for entry in tensor.external_data}
    data.seek(int(where.get("offset", 0)))
    tensor.raw_data = data.read(int(where["length"]))
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
    return tensor.SerializeToString()


def _initializer_field(tensor_bytes: bytes) -> bytes:
    """``graph { initializer { tensor } }`` as ModelProto bytes, to append to a serialized model."""
    graph = _field(_GRAPH_INITIALIZER, tensor_bytes)
    return _field(_MODEL_GRAPH, graph)


def _field(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | _LENGTH_DELIMITED) + _varint(len(payload)) + payload


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
