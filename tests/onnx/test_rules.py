"""The ONNX rewrite rules on hand-built graphs: each variant's structure, report and numbers.

Every graph is run through :func:`optimize_onnx`; each test asserts the op counts, the new
structure, the report entry, and (independently of the pass's own check) that onnxruntime with
its graph optimizations *off* gives the same outputs for the input and the output file.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from normsurgeon.onnx import runtime
from normsurgeon.onnx.optimize import optimize_onnx
from normsurgeon.report import Report, SkipReason

RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------- building graphs


def _array(*shape: int, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    return RNG.uniform(low, high, shape).astype(np.float32)


def _bn(name: str, x: str, y: str, channels: int, inits: dict[str, np.ndarray]) -> onnx.NodeProto:
    """A BatchNormalization with trained-looking stats (negative scales included)."""
    inits[f"{name}.gamma"] = _array(channels, low=-1.5, high=1.5)
    inits[f"{name}.beta"] = _array(channels)
    inits[f"{name}.mean"] = _array(channels)
    inits[f"{name}.var"] = _array(channels, low=0.3, high=2.0)
    inputs = [x, f"{name}.gamma", f"{name}.beta", f"{name}.mean", f"{name}.var"]
    return helper.make_node("BatchNormalization", inputs, [y], name=name, epsilon=1e-3)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, tuple],
    outputs: list[str],
    inits: dict[str, np.ndarray],
    opset: int = 18,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs.items()],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        [numpy_helper.from_array(array, name) for name, array in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    return model


def _optimize(tmp_path: Path, model: onnx.ModelProto, **options) -> tuple[Report, onnx.ModelProto]:
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, source)
    report = optimize_onnx(source, target, **options)
    assert report.check is not None and report.check.passed
    assert report.check.label == "optimized vs input (onnxruntime cpu)"
    _assert_same_outputs(source, target)
    return report, onnx.load(target)


def _assert_same_outputs(source: Path, target: Path) -> None:
    feeds = runtime.random_feeds(onnx.load(source), seed=1)
    expected = runtime.run(runtime.session(source, optimize=False), feeds)
    actual = dict(runtime.run(runtime.session(target, optimize=False), feeds))
    for name, array in expected:
        np.testing.assert_allclose(actual[name], array, rtol=1e-4, atol=1e-5)


def _ops(model: onnx.ModelProto) -> dict[str, int]:
    return dict(collections.Counter(node.op_type for node in model.graph.node))


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(node for node in model.graph.node if node.name == name)


def _attr(node: onnx.NodeProto, name: str):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


# --------------------------------------------------------------------------- folding into the producer


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("groups", [1, 2, 4], ids=["g1", "g2", "depthwise"])
def test_conv_then_bn_folds(tmp_path: Path, bias: bool, groups: int) -> None:
    inits = {"W": _array(4, 4 // groups, 3, 3)}
    conv_inputs = ["x", "W"]
    if bias:
        inits["B"] = _array(4)
        conv_inputs.append("B")
    nodes = [
        helper.make_node("Conv", conv_inputs, ["c"], name="conv", group=groups, pads=[1, 1, 1, 1]),
        _bn("bn", "c", "y", 4, inits),
    ]
    report, out = _optimize(tmp_path, _model(nodes, {"x": (1, 4, 6, 6)}, ["y"], inits))

    assert _ops(out) == {"Conv": 1}
    conv = _node(out, "conv")
    assert len(conv.input) == 3 and _attr(conv, "group") == groups
    assert [(c.action, c.module, c.into) for c in report.changes] == [("folded", "bn", "conv")]
    assert report.skipped == []


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("groups", [1, 2], ids=["g1", "g2"])
def test_convtranspose_then_bn_folds(tmp_path: Path, bias: bool, groups: int) -> None:
    out_per_group = 3
    inits = {"W": _array(4, out_per_group, 3, 3)}  # (C_in, C_out/g, k, k)
    inputs = ["x", "W"] + (["B"] if bias else [])
    if bias:
        inits["B"] = _array(out_per_group * groups)
    nodes = [
        helper.make_node("ConvTranspose", inputs, ["c"], name="deconv", group=groups, strides=[2, 2]),
        _bn("bn", "c", "y", out_per_group * groups, inits),
    ]
    report, out = _optimize(tmp_path, _model(nodes, {"x": (1, 4, 5, 5)}, ["y"], inits))

    assert _ops(out) == {"ConvTranspose": 1}
    assert len(_node(out, "deconv").input) == 3
    assert [(c.module, c.into) for c in report.changes] == [("bn", "deconv")]


@pytest.mark.parametrize("with_c", [True, False], ids=["C", "noC"])
@pytest.mark.parametrize("trans_b", [0, 1], ids=["transB0", "transB1"])
def test_gemm_then_bn_folds(tmp_path: Path, trans_b: int, with_c: bool) -> None:
    inits = {"B": _array(4, 5) if trans_b else _array(5, 4)}
    inputs = ["x", "B"] + (["C"] if with_c else [])
    if with_c:
        inits["C"] = _array(4)
    gemm = helper.make_node("Gemm", inputs, ["g"], name="gemm", transB=trans_b, alpha=0.5, beta=2.0)
    nodes = [gemm, _bn("bn", "g", "y", 4, inits)]
    report, out = _optimize(tmp_path, _model(nodes, {"x": (3, 5)}, ["y"], inits))

    assert _ops(out) == {"Gemm": 1}
    folded = _node(out, "gemm")
    assert len(folded.input) == 3 and _attr(folded, "transB") == trans_b
    assert _attr(folded, "beta") in (None, 1.0)  # beta is folded into C
    assert [(c.module, c.into) for c in report.changes] == [("bn", "gemm")]


@pytest.mark.parametrize("add", ["none", "bias_second", "bias_first"])
def test_matmul_then_bn_folds(tmp_path: Path, add: str) -> None:
    inits = {"W": _array(5, 4)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="matmul")]
    bn_input = "m"
    if add != "none":
        inits["b"] = _array(4)
        order = ["m", "b"] if add == "bias_second" else ["b", "m"]
        nodes.append(helper.make_node("Add", order, ["a"], name="add"))
        bn_input = "a"
    nodes.append(_bn("bn", bn_input, "y", 4, inits))
    report, out = _optimize(tmp_path, _model(nodes, {"x": (3, 5)}, ["y"], inits))

    assert _ops(out) == {"MatMul": 1, "Add": 1}
    assert [(c.module, c.into) for c in report.changes] == [("bn", "matmul")]


def test_matmul_transpose_bn_folds_token_layout(tmp_path: Path) -> None:
    """Linear on (B, T, C), then BN over C via Transpose(0, 2, 1): the feature axis reaches axis 1."""
    inits = {"W": _array(5, 4), "b": _array(4)}
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"], name="matmul"),
        helper.make_node("Add", ["b", "m"], ["a"], name="add"),
        helper.make_node("Transpose", ["a"], ["t"], name="transpose", perm=[0, 2, 1]),
        _bn("bn", "t", "y", 4, inits),
    ]
    report, out = _optimize(tmp_path, _model(nodes, {"x": (2, 3, 5)}, ["y"], inits))

    assert _ops(out) == {"MatMul": 1, "Add": 1, "Transpose": 1}
    assert report.changes[0].detail.startswith("into the preceding MatMul (through a Transpose)")


def test_matmul_rank3_bn_without_transpose_is_not_folded(tmp_path: Path) -> None:
    """BN's channel axis 1 is T here, not the MatMul's features: folding would be wrong."""
    inits = {"W": _array(5, 3)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="matmul"), _bn("bn", "m", "y", 3, inits)]
    report, out = _optimize(tmp_path, _model(nodes, {"x": (2, 3, 5)}, ["y"], inits))

    assert _ops(out)["BatchNormalization"] == 1
    (skip,) = report.skipped
    assert skip.reason is SkipReason.NO_FOLDABLE_NEIGHBOUR
    assert "rank 3" in skip.detail


# --------------------------------------------------------------------------- folding into the consumer


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("groups", "kernel"), [(1, 1), (1, 3), (2, 3)], ids=["1x1", "3x3-valid", "3x3-g2"])
def test_bn_then_unpadded_conv_folds(tmp_path: Path, groups: int, kernel: int, bias: bool) -> None:
    inits = {"W": _array(6, 4 // groups, kernel, kernel)}
    conv_inputs = ["n", "W"] + (["B"] if bias else [])
    if bias:
        inits["B"] = _array(6)
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        _bn("bn", "r", "n", 4, inits),
        helper.make_node("Conv", conv_inputs, ["y"], name="conv", group=groups, pads=[0, 0, 0, 0]),
    ]
    report, out = _optimize(tmp_path, _model(nodes, {"x": (1, 4, 6, 6)}, ["y"], inits))

    assert _ops(out) == {"Relu": 1, "Conv": 1}
    assert list(_node(out, "conv").input)[0] == _node(out, "relu").output[0]
    assert [(c.module, c.into) for c in report.changes] == [("bn", "conv")]
    assert report.changes[0].detail.startswith("into the following Conv")


@pytest.mark.parametrize("trans_b", [0, 1], ids=["transB0", "transB1"])
def test_bn_then_gemm_folds(tmp_path: Path, trans_b: int) -> None:
    inits = {"B": _array(3, 4) if trans_b else _array(4, 3), "C": _array(3)}
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        _bn("bn", "r", "n", 4, inits),
        helper.make_node("Gemm", ["n", "B", "C"], ["y"], name="gemm", transB=trans_b, alpha=0.7, beta=1.5),
    ]
    report, out = _optimize(tmp_path, _model(nodes, {"x": (2, 4)}, ["y"], inits))

    assert _ops(out) == {"Relu": 1, "Gemm": 1}
    assert [(c.module, c.into) for c in report.changes] == [("bn", "gemm")]


def test_bn_then_matmul_folds_into_matmul_and_add(tmp_path: Path) -> None:
    inits = {"W": _array(4, 3)}
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        _bn("bn", "r", "n", 4, inits),
        helper.make_node("MatMul", ["n", "W"], ["y"], name="matmul"),
    ]
    report, out = _optimize(tmp_path, _model(nodes, {"x": (2, 4)}, ["y"], inits))

    assert _ops(out) == {"Relu": 1, "MatMul": 1, "Add": 1}
    assert [(c.module, c.into) for c in report.changes] == [("bn", "matmul")]


def test_bn_feeding_two_unpadded_convs_folds_into_both(tmp_path: Path) -> None:
    inits = {"W1": _array(3, 4, 1, 1), "W2": _array(5, 4, 1, 1)}
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        _bn("bn", "r", "n", 4, inits),
        helper.make_node("Conv", ["n", "W1"], ["y1"], name="conv1"),
        helper.make_node("Conv", ["n", "W2"], ["y2"], name="conv2"),
    ]
    report, out = _optimize(tmp_path, _model(nodes, {"x": (1, 4, 5, 5)}, ["y1", "y2"], inits))

    assert _ops(out) == {"Relu": 1, "Conv": 2}
    assert sorted((c.module, c.into) for c in report.changes) == [("bn", "conv1"), ("bn", "conv2")]


@pytest.mark.parametrize("mode", ["edge", "reflect"])
def test_bn_then_copying_pad_then_conv_folds(tmp_path: Path, mode: str) -> None:
    """A conv with padding_mode="replicate"/"reflect" exports as Pad + unpadded Conv: exact to fold."""
    inits = {"W": _array(5, 4, 3, 3), "B": _array(5), "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)}
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        _bn("bn", "r", "n", 4, inits),
        helper.make_node("Pad", ["n", "pads"], ["p"], name="pad", mode=mode),
        helper.make_node("Conv", ["p", "W", "B"], ["y"], name="conv"),
    ]
    report, out = _optimize(tmp_path, _model(nodes, {"x": (1, 4, 6, 6)}, ["y"], inits))

    assert _ops(out) == {"Relu": 1, "Pad": 1, "Conv": 1}
    assert [(c.module, c.into) for c in report.changes] == [("bn", "conv")]


# --------------------------------------------------------------------------- what must not fold


def test_bn_then_zero_pad_then_conv_is_not_folded(tmp_path: Path) -> None:
    inits = {"W": _array(5, 4, 3, 3), "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)}
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        _bn("bn", "r", "n", 4, inits),
        helper.make_node("Pad", ["n", "pads"], ["p"], name="pad"),
        helper.make_node("Conv", ["p", "W"], ["y"], name="conv"),
    ]
    report, out = _optimize(tmp_path, _model(nodes, {"x": (1, 4, 6, 6)}, ["y"], inits))

    assert _ops(out)["BatchNormalization"] == 1
    (skip,) = report.skipped
    assert "after it: Pad 'pad' pads with constants (mode=constant)" in skip.detail


def test_bn_before_zero_padded_conv_is_not_folded(tmp_path: Path) -> None:
    inits = {"W": _array(4, 4, 3, 3)}
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        _bn("bn", "r", "n", 4, inits),
        helper.make_node("Conv", ["n", "W"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    report, out = _optimize(tmp_path, _model(nodes, {"x": (1, 4, 6, 6)}, ["y"], inits))

    assert _ops(out) == {"Relu": 1, "BatchNormalization": 1, "Conv": 1}
    assert report.changes == []
    (skip,) = report.skipped
    assert (skip.module, skip.reason) == ("bn", SkipReason.NO_FOLDABLE_NEIGHBOUR)
    assert "before it: its input comes from Relu 'relu'" in skip.detail
    assert "after it: Conv 'conv' zero-pads its input (pads=[1, 1, 1, 1])" in skip.detail


def test_conv_output_also_used_elsewhere_is_not_folded(tmp_path: Path) -> None:
    inits = {"W": _array(4, 4, 3, 3), "B": _array(4)}
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        _bn("bn", "c", "n", 4, inits),
        helper.make_node("Relu", ["n"], ["y"], name="relu"),
        helper.make_node("Sigmoid", ["c"], ["side"], name="side"),
    ]
    report, out = _optimize(tmp_path, _model(nodes, {"x": (1, 4, 6, 6)}, ["y", "side"], inits))

    assert _ops(out)["BatchNormalization"] == 1
    assert np.array_equal(_init(out, "W"), inits["W"])
    (skip,) = report.skipped
    assert skip.reason is SkipReason.NO_FOLDABLE_NEIGHBOUR
    assert "the output of Conv 'conv' also feeds Sigmoid 'side'" in skip.detail


def test_shared_weight_is_copied_not_changed_in_place(tmp_path: Path) -> None:
    inits = {"W": _array(4, 4, 3, 3)}
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv_a", pads=[1, 1, 1, 1]),
        _bn("bn", "c", "y", 4, inits),
        helper.make_node("Conv", ["x2", "W"], ["y2"], name="conv_b", pads=[1, 1, 1, 1]),
    ]
    model = _model(nodes, {"x": (1, 4, 6, 6), "x2": (1, 4, 6, 6)}, ["y", "y2"], inits)
    report, out = _optimize(tmp_path, model)

    assert _ops(out) == {"Conv": 2}
    conv_a, conv_b = _node(out, "conv_a"), _node(out, "conv_b")
    assert conv_b.input[1] == "W" and np.array_equal(_init(out, "W"), inits["W"])
    assert conv_a.input[1] != "W" and not np.allclose(_init(out, conv_a.input[1]), inits["W"])
    (change,) = report.changes
    assert (change.module, change.into) == ("bn", "conv_a")
    assert "weight 'W' is shared with Conv 'conv_b', so the folded node got its own copy" in change.detail


# --------------------------------------------------------------------------- absorbing an affine into a native norm


@pytest.mark.parametrize("order", ["norm_first", "factor_first"])
def test_mul_and_add_after_native_layernorm_are_absorbed(tmp_path: Path, order: str) -> None:
    inits = {"s": _array(8), "b": _array(8), "m": _array(8), "a": _array(8)}
    mul_inputs = ["n", "m"] if order == "norm_first" else ["m", "n"]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "s", "b"], ["n"], name="ln", axis=-1),
        helper.make_node("Mul", mul_inputs, ["p"], name="mul"),
        helper.make_node("Add", ["p", "a"], ["y"], name="add"),
    ]
    report, out = _optimize(tmp_path, _model(nodes, {"x": (2, 3, 8)}, ["y"], inits))

    assert _ops(out) == {"LayerNormalization": 1}
    changes = sorted((c.action, c.module, c.into) for c in report.changes)
    assert changes == [("fused", "add", "ln"), ("fused", "mul", "ln")]


def test_mul_varying_along_an_unnormalized_axis_is_not_absorbed(tmp_path: Path) -> None:
    inits = {"s": _array(8), "m": _array(3, 1)}  # varies along T, not per normalized element
    nodes = [
        helper.make_node("LayerNormalization", ["x", "s"], ["n"], name="ln", axis=-1),
        helper.make_node("Mul", ["n", "m"], ["y"], name="mul"),
    ]
    report, out = _optimize(tmp_path, _model(nodes, {"x": (2, 3, 8)}, ["y"], inits))

    assert _ops(out) == {"LayerNormalization": 1, "Mul": 1}
    assert report.changes == []
