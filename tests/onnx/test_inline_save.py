"""The streamed inline save: one ordinary .onnx file, the same model as ir.save writes, weights one at a time."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from torch import nn

from normsurgeon.onnx.export import export_onnx
from normsurgeon.onnx.inline_save import save_inline


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
