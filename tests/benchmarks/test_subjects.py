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
