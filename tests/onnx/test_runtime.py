"""Verification sessions hold no second copy of a file's weights: onnxruntime maps them from the file and its CPU
MatMul reads them where they lie (no prepacked copy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from normsurgeon.onnx import runtime

SIDE = 2048  # one 16 MiB float32 weight


def _anonymous_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("/proc/self/status has no RssAnon")


def _matmul_file(path: Path, weight: np.ndarray) -> Path:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, SIDE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, SIDE])],
        [numpy_helper.from_array(weight, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_verification_session_holds_no_copy_of_the_weights(tmp_path: Path) -> None:
    weight = np.random.default_rng(0).standard_normal((SIDE, SIDE), dtype=np.float32)
    path = _matmul_file(tmp_path / "matmul.onnx", weight)
    x = np.random.default_rng(1).standard_normal((4, SIDE), dtype=np.float32)
    before = _anonymous_bytes()
    sess = runtime.session(path)
    ((_, y),) = runtime.run(sess, {"x": x})
    grown = _anonymous_bytes() - before
    np.testing.assert_allclose(y, x @ weight, rtol=1e-4, atol=1e-3)
    # Parsing the file or prepacking the weight would each add its 16 MiB; what grows is onnxruntime's own state.
    assert grown < weight.nbytes / 2, f"the session grew anonymous memory by {grown / 2**20:.1f} MiB"
