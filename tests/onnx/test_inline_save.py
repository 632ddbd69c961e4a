"""The streamed inline save: one ordinary .onnx file, the same model as ir.save writes, weights one at a time; and
the reverse, an inline file's weights referenced in place for onnxruntime to map."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from torch import nn

from normsurgeon.errors import LoadError
from normsurgeon.onnx import runtime
from normsurgeon.onnx.export import export_onnx
from normsurgeon.onnx.inline_save import save_inline, weights_in_place


@pytest.fixture(scope="module")
def program():
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 8)).eval()
    x = torch.randn(3, 16)
    return torch.onnx.export(model, (x,), dynamo=True, optimize=True, report=False), model, x


def test_save_inline_writes_what_ir_save_writes(program, tmp_path) -> None:
    exported, model, x = program
    save_inline(exported.model, tmp_path / "streamed.onnx", staging_dir=tmp_path)
    ir.save(exported.model, tmp_path / "plain.onnx")
    streamed, plain = onnx.load(str(tmp_path / "streamed.onnx")), onnx.load(str(tmp_path / "plain.onnx"))
    assert [n.op_type for n in streamed.graph.node] == [n.op_type for n in plain.graph.node]
    mine = {t.name: onnx.numpy_helper.to_array(t) for t in streamed.graph.initializer}
    theirs = {t.name: onnx.numpy_helper.to_array(t) for t in plain.graph.initializer}
    assert mine.keys() == theirs.keys() and len(mine) >= 4
    assert all(np.array_equal(mine[k], theirs[k]) for k in mine)
    assert not list(tmp_path.glob(".onnx-inline.*")) and not list(tmp_path.glob("*.data"))  # one file, no leftovers
    session = ort.InferenceSession(str(tmp_path / "streamed.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert np.allclose(got, model(x).detach().numpy(), atol=1e-5)
    assert exported.model.graph.initializers  # the in-memory model still holds its weights
    assert all(v.const_value is not None and v.const_value.numpy().size for v in exported.model.graph.initializers.values())


def test_export_external_data_on_request(tmp_path, cli) -> None:
    model = nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.Linear(64, 8)).eval()
    path = tmp_path / "m.pt"
    torch.save(model, path)
    result = cli("export", path, "--input-shape", "2,16", "--external-data", "-o", tmp_path / "m.onnx", "--json")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m.onnx.data").stat().st_size >= 4 * (16 * 64 + 64 * 8)
    assert onnx.load(str(tmp_path / "m.onnx"), load_external_data=False).graph.initializer[0].data_location == 1
    inline = export_onnx(model, (torch.randn(2, 16),), tmp_path / "inline.onnx")
    assert inline.passed and not (tmp_path / "inline.onnx.data").exists()


def test_weights_in_place_points_at_each_tensors_own_bytes(program, tmp_path) -> None:
    exported, model, x = program
    path = tmp_path / "inline.onnx"
    save_inline(exported.model, path, staging_dir=tmp_path)
    view = onnx.ModelProto.FromString(weights_in_place(path, location="inline.onnx", min_bytes=1024))
    whole = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    raw = path.read_bytes()
    external = [t for t in view.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inline = [t for t in view.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert {t.name for t in view.graph.initializer} == whole.keys()
    assert external and all(whole[t.name].nbytes >= 1024 for t in external)  # the 16x64 and 64x8 weights
    assert inline and all(whole[t.name].nbytes < 1024 for t in inline)  # biases, norm weights stay inline
    for tensor in external:
        where = {entry.key: entry.value for entry in tensor.external_data}
        offset, length = int(where["offset"]), int(where["length"])
        assert where["location"] == "inline.onnx" and length == whole[tensor.name].nbytes
        assert raw[offset:offset + length] == whole[tensor.name].tobytes()  # the file's own bytes, where they are
    assert [n.op_type for n in view.graph.node] == [n.op_type for n in onnx.load(str(path)).graph.node]


def test_a_session_in_place_computes_what_the_file_computes(program, tmp_path) -> None:
    exported, model, x = program
    path = tmp_path / "inline.onnx"
    save_inline(exported.model, path, staging_dir=tmp_path)
    options = ort.SessionOptions()
    in_place = runtime.session_in_place(path, options)
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert in_place is not None
    feed = {plain.get_inputs()[0].name: x.numpy()}
    assert np.array_equal(in_place.run(None, feed)[0], plain.run(None, feed)[0])  # the same graph and bytes
    assert np.allclose(in_place.run(None, feed)[0], model(x).detach().numpy(), atol=1e-5)


def test_files_without_a_name_or_not_protobuf_are_read_the_ordinary_way(program, tmp_path) -> None:
    exported, _, x = program
    path = tmp_path / "inline.onnx"
    save_inline(exported.model, path, staging_dir=tmp_path)
    # an anonymous temp file (what write_atomically hands out): onnxruntime finds external data by directory
    anonymous = os.open(tmp_path, os.O_TMPFILE | os.O_RDWR)
    try:
        os.write(anonymous, path.read_bytes())
        assert runtime.session_in_place(f"/proc/self/fd/{anonymous}", ort.SessionOptions()) is None
        assert runtime.session(f"/proc/self/fd/{anonymous}").get_inputs()[0].name  # loaded from the file itself
    finally:
        os.close(anonymous)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not an ONNX model|truncated or foreign"):
        weights_in_place(garbage, location=garbage.name)
    assert runtime.session_in_place(garbage, ort.SessionOptions()) is None
    with pytest.raises(LoadError, match="onnxruntime cannot load it"):  # onnxruntime's own error, as before
        runtime.session(garbage)
