"""The benchmark's reference networks are what their names say, also after export."""

from __future__ import annotations

import contextlib
import io
import warnings

import torch
from torch import nn

from benchmarks.subjects import BIAS_VALUE, norm_free_limit, with_biases


def test_limit_plus_biases_keeps_its_biases_through_torchs_onnx_export():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Linear(6, 4, bias=False))
    limit = norm_free_limit(model.eval(), ["1"])
    biased = with_biases(limit, ["0", "3"])
    assert torch.equal(biased[0].bias, torch.full((8,), BIAS_VALUE)) and biased[3].bias is not None
    assert limit[0].bias is None  # the limit itself is left as it was
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(biased, (torch.randn(1, 3, 8, 8),), dynamo=True, optimize=True)
    nodes = program.model_proto.graph.node
    convs = [n for n in nodes if n.op_type == "Conv"]
    assert convs and all(len(n.input) == 3 for n in convs)  # a zero bias would have been dropped here
    assert "BatchNormalization" not in {n.op_type for n in nodes}


def _conv_graph(weight_value: float, *, names: str = "", second_input: str = "h", pads: int = 1):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((4, 4, 3, 3), weight_value, np.float32), names + "w")
    nodes = [
        helper.make_node("Conv", ["x", names + "w"], [names + "h"], pads=[pads] * 4),
        helper.make_node("Add", [names + "h", names + second_input], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w],
    )
    return onnx.helper.make_model(graph)


def test_graph_signature_names_the_program_not_its_names_or_weight_values():
    from benchmarks.onnx_runtime import graph_signature

    base = graph_signature(_conv_graph(0.5))
    assert graph_signature(_conv_graph(-2.0, names="other_")) == base  # values and names do not matter
    assert graph_signature(_conv_graph(0.5, pads=0)) != base  # attributes do
    assert graph_signature(_conv_graph(0.5, second_input="w")) != base  # and so does where an input comes from
