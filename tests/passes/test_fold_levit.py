"""timm's LeViT: BatchNorm1d behind ``flatten(0, 1)`` … ``reshape_as`` folds into its Linear.

Its ``LinearNorm`` computes ``bn(linear(x).flatten(0, 1)).reshape_as(x)``: the walks look
through the flatten (which keeps the channel axis) and read ``reshape_as(x)`` as a shape read,
so every Linear→BatchNorm1d pair folds, as timm's own ``fuse()`` does (random weights, realistic
BatchNorm statistics).
"""

from __future__ import annotations

import copy

import pytest
import torch

from normsurgeon.passes.fold_batchnorm import fold_batchnorm
from tests.helpers import count_batchnorm_like, give_realistic_stats

TOLERANCE = 1e-5  # max |folded - original| relative to the output's largest magnitude, on inputs the fold never saw

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def levit() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)  # LeViT's attention biases fix the input size
    return give_realistic_stats(timm.create_model("levit_128", pretrained=False), x), x[:1]


@pytest.fixture(scope="module")
def folded(levit):
    model, x = levit
    return fold_batchnorm(model, (x,), inplace=False)


def test_levit_keeps_no_more_batchnorms_than_timms_fuse(levit, folded):
    from timm.utils.model import reparameterize_model

    model, _ = levit
    by_timm = reparameterize_model(copy.deepcopy(model))  # calls each LinearNorm/ConvNorm/NormLinear's fuse()
    assert count_batchnorm_like(folded.model) <= count_batchnorm_like(by_timm) == 0 < count_batchnorm_like(model) == 64
    assert not folded.skipped


def test_every_linear_norm_folds_into_its_linear(levit, folded):
    model, _ = levit
    linear_norms = [path for path, m in model.named_modules() if type(m).__name__ == "LinearNorm"]
    into = {c.module: (c.into, c.detail) for c in folded.changes}
    assert len(linear_norms) == 58
    assert all(into[f"{path}.bn"] == (f"{path}.linear", "into its producer") for path in linear_norms)


def test_folded_levit_matches_the_original_on_fresh_inputs(levit, folded):
    model, _ = levit
    fresh = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    with torch.no_grad():
        expected, got = model(fresh), folded.model(fresh)
    assert (got - expected).abs().max() <= TOLERANCE * expected.abs().max()


@pytest.mark.slow
def test_levit_exports_without_batchnormalization_nodes(levit, tmp_path):
    onnx = pytest.importorskip("onnx")
    from normsurgeon.onnx.export import export_onnx

    model, x = levit
    report = export_onnx(model, (x,), tmp_path / "levit.onnx")  # folds, exports, verifies in onnxruntime
    assert report.passed
    ops = [node.op_type for node in onnx.load(tmp_path / "levit.onnx").graph.node]
    assert "BatchNormalization" not in ops and ("MatMul" in ops or "Gemm" in ops)


def test_inspect_places_every_linear_norms_batchnorm_after_its_linear(levit):
    from normsurgeon.passes.inspect import inspect_norms

    model, x = levit
    rows = {row.path: row for row in inspect_norms(model, (x,)).norms}
    linear_norms = [f"{path}.bn" for path, m in model.named_modules() if type(m).__name__ == "LinearNorm"]
    assert {rows[path].placement for path in linear_norms} == {"after linear"}
    assert all(rows[path].can[0].startswith("fold into ") for path in linear_norms)
