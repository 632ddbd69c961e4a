"""``optimize_onnx`` on torch's own exports: BN folding, norm fusion by opset, and bad inputs.

Models are exported the way users meet them: the dynamo exporter with ``optimize=False`` (which
leaves every BatchNormalization and computes conv biases at run time) and the legacy TorchScript
exporter (``dynamo=False``). Exports are cached per module to keep the file fast.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import models
from normsurgeon.errors import LoadError, OutputError, UsageError, VerificationError
from normsurgeon.onnx import runtime
from normsurgeon.onnx.optimize import optimize_onnx
from normsurgeon.onnx.rules import fold_batchnorm
from normsurgeon.report import SkipReason

BN_MODELS = ["resnet18", "mobilenetv2", "mlp", "convtranspose_decoder", "token_mlp"]


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory):
    """``export(key, module, inputs, dynamo=, opset=)`` -> path of a cached .onnx file."""
    directory = tmp_path_factory.mktemp("exports")
    cache: dict[str, Path] = {}

    def _export(key: str, module: nn.Module, inputs: tuple, *, dynamo: bool, opset: int | None = None) -> Path:
        if key not in cache:
            path = directory / f"{key}.onnx"
            options = {"opset_version": opset} if opset else {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                logging.disable(logging.WARNING)
                try:
                    if dynamo:
                        torch.onnx.export(module.eval(), inputs, path, dynamo=True, optimize=False, **options)
                    else:
                        torch.onnx.export(module.eval(), inputs, path, dynamo=False, **options)
                finally:
                    logging.disable(logging.NOTSET)
            cache[key] = path
        return cache[key]

    return _export


def _ops(path: Path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(path).graph.node)


def _assert_same_outputs(source: Path, target: Path) -> None:
    """Independent of the pass's own check: ORT with graph optimizations off on both files."""
    feeds = runtime.random_feeds(onnx.load(source), seed=3)
    expected = runtime.run(runtime.session(source, optimize=False), feeds)
    actual = dict(runtime.run(runtime.session(target, optimize=False), feeds))
    for name, array in expected:
        np.testing.assert_allclose(actual[name], array, rtol=1e-4, atol=1e-4)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- BatchNorm folding on real exports


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.parametrize("name", BN_MODELS)
def test_every_batchnorm_of_reference_models_is_folded(export, tmp_path: Path, name: str, dynamo: bool) -> None:
    source = export(f"{name}-{dynamo}", models.build(name), models.example_inputs(name, 1), dynamo=dynamo)
    target = tmp_path / "out.onnx"
    bn_before = _ops(source)["BatchNormalization"]

    report = optimize_onnx(source, target)

    assert _ops(target)["BatchNormalization"] == 0
    assert len(report.changed("folded")) == bn_before
    assert report.skipped == []
    assert report.passed and report.check.label == "optimized vs input (onnxruntime cpu)"
    assert report.facts["ops_before"].get("BatchNormalization", 0) == bn_before
    assert "BatchNormalization" not in report.facts["ops_after"]
    assert report.facts["file_bytes"] == target.stat().st_size
    _assert_same_outputs(source, target)


def test_dynamo_export_of_resnet18_leaves_batchnorms_that_fold(export, tmp_path: Path) -> None:
    """The unfolded dynamo export has one BN per conv; after optimize, none, and the convs have biases."""
    source = export("resnet18-True", models.build("resnet18"), models.example_inputs("resnet18", 1), dynamo=True)
    assert _ops(source)["BatchNormalization"] == 20

    optimize_onnx(source, tmp_path / "out.onnx")

    out = onnx.load(tmp_path / "out.onnx")
    convs = [node for node in out.graph.node if node.op_type == "Conv"]
    assert len(convs) == 20 and all(len(conv.input) == 3 for conv in convs)
    assert not {"Shape", "Expand", "CastLike"} & {node.op_type for node in out.graph.node}


def test_unfoldable_batchnorms_are_kept_and_explained(export, tmp_path: Path) -> None:
    """preact_resnet: BNs after a residual Add or before a zero-padded conv stay, each with its reason;
    the ones before a 1x1 conv or a replicate-padded conv fold forward."""
    source = export(
        "preact_resnet-True", models.build("preact_resnet"), models.example_inputs("preact_resnet", 1), dynamo=True
    )
    target = tmp_path / "out.onnx"

    report = optimize_onnx(source, target)

    left = _ops(target)["BatchNormalization"]
    assert left == len(report.skipped) and left + len(report.changed("folded")) == _ops(source)["BatchNormalization"]
    assert {skip.reason for skip in report.skipped} == {SkipReason.NO_FOLDABLE_NEIGHBOUR}
    assert any("zero-pads its input (pads=[1, 1, 1, 1])" in skip.detail for skip in report.skipped)
    assert any("(through an edge/reflect Pad)" in change.detail for change in report.changes)
    assert any(change.detail.startswith("into the following Conv") for change in report.changes)
    _assert_same_outputs(source, target)


# --------------------------------------------------------------------------- norm fusion by opset


class HandLayerNorm(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)
        self.bias = nn.Parameter(torch.rand(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * self.weight + self.bias


class HandRMSNorm(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def _group_norm() -> nn.GroupNorm:
    norm = nn.GroupNorm(4, 16)
    with torch.no_grad():
        norm.weight.uniform_(-1.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm


TOKENS = (torch.randn(2, 5, 16),)
IMAGES = (torch.randn(2, 16, 6, 6),)

# (id, module factory, inputs, dynamo, opset, native op, expected count in the output, fused here?)
FUSION_CASES = [
    ("layernorm-dynamo-18", lambda: nn.LayerNorm(16), TOKENS, True, 18, "LayerNormalization", 1, False),
    ("layernorm-legacy-17", lambda: nn.LayerNorm(16), TOKENS, False, 17, "LayerNormalization", 1, False),
    ("hand-layernorm-dynamo-18", HandLayerNorm, TOKENS, True, 18, "LayerNormalization", 1, True),
    ("hand-layernorm-legacy-17", HandLayerNorm, TOKENS, False, 17, "LayerNormalization", 1, True),
    ("hand-rmsnorm-dynamo-23", HandRMSNorm, TOKENS, True, 23, "RMSNormalization", 1, True),
    ("hand-rmsnorm-legacy-23", HandRMSNorm, TOKENS, False, 23, "RMSNormalization", 1, True),
    ("rmsnorm-dynamo-23", lambda: nn.RMSNorm(16, eps=1e-6), TOKENS, True, 23, "RMSNormalization", 1, False),
    ("groupnorm-dynamo-21", _group_norm, IMAGES, True, 21, "GroupNormalization", 1, False),
    ("groupnorm-legacy-21", _group_norm, IMAGES, False, 21, "GroupNormalization", 1, True),
]


@pytest.mark.parametrize(
    ("key", "module", "inputs", "dynamo", "opset", "native", "count", "fused"),
    FUSION_CASES,
    ids=[case[0] for case in FUSION_CASES],
)
def test_norm_becomes_native_op_where_opset_allows(
    export, tmp_path: Path, key, module, inputs, dynamo, opset, native, count, fused
) -> None:
    torch.manual_seed(0)
    source = export(key, module(), inputs, dynamo=dynamo, opset=opset)
    target = tmp_path / "out.onnx"

    report = optimize_onnx(source, target)

    ops = _ops(target)
    assert ops[native] == count
    assert report.skipped == []
    if fused:
        assert dict(ops) == {native: count}, "the whole chain, affine included, is one native op"
        (change,) = report.changes
        assert (change.action, change.detail) == ("fused", native)
        first = onnx.load(source).graph.node
        chain_ops = {"LayerNormalization": "ReduceMean", "RMSNormalization": "Pow", "GroupNormalization": "Reshape"}
        assert change.module == next(n.name for n in first if n.op_type == chain_ops[native])
    else:
        assert report.changes == []
    _assert_same_outputs(source, target)


# (id, module factory, inputs, dynamo, opset, native op, first op of the chain, opset that has it)
TOO_OLD_CASES = [
    ("layernorm-legacy-16", lambda: nn.LayerNorm(16), TOKENS, False, 16, "LayerNormalization", "ReduceMean", 17),
    ("hand-rmsnorm-dynamo-18", HandRMSNorm, TOKENS, True, 18, "RMSNormalization", "Pow", 23),
    ("rmsnorm-dynamo-18", lambda: nn.RMSNorm(16, eps=1e-6), TOKENS, True, 18, "RMSNormalization", "Pow", 23),
    ("groupnorm-dynamo-18", _group_norm, IMAGES, True, 18, "GroupNormalization", "Reshape", 21),
]


@pytest.mark.parametrize(
    ("key", "module", "inputs", "dynamo", "opset", "native", "first_op", "since"),
    TOO_OLD_CASES,
    ids=[case[0] for case in TOO_OLD_CASES],
)
def test_norm_is_not_fused_below_its_opset_and_the_skip_says_why(
    export, tmp_path: Path, key, module, inputs, dynamo, opset, native, first_op, since
) -> None:
    torch.manual_seed(0)
    source = export(key, module(), inputs, dynamo=dynamo, opset=opset)
    target = tmp_path / "out.onnx"

    report = optimize_onnx(source, target)

    assert native not in _ops(target)
    assert report.changes == []
    (skip,) = report.skipped
    assert skip.detail.startswith(f"opset {opset} has no {native}")
    assert skip.detail.endswith(f"export at opset >= {since}")
    source_ops = {node.name: node.op_type for node in onnx.load(source).graph.node}
    assert source_ops[skip.module] == first_op  # the first node of the chain, by its name in the input
    _assert_same_outputs(source, target)


# --------------------------------------------------------------------------- bad inputs and outputs


@pytest.fixture(scope="module")
def mlp_onnx(export) -> Path:
    return export("mlp-True", models.build("mlp"), models.example_inputs("mlp", 1), dynamo=True)


def test_truncated_file_is_a_load_error(mlp_onnx: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(mlp_onnx.read_bytes()[:100])

    with pytest.raises(LoadError, match="truncated"):
        optimize_onnx(truncated, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_symbolic_input_dims_need_input_shapes(mlp_onnx: Path, tmp_path: Path) -> None:
    model = onnx.load(mlp_onnx)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    symbolic = tmp_path / "symbolic.onnx"
    onnx.save(model, symbolic)

    with pytest.raises(UsageError, match=r"has symbolic dims \(batch\); .* e.g. --input-shape 1,32 for this one"):
        optimize_onnx(symbolic, tmp_path / "out.onnx")  # the example keeps the dims the file declares
    assert not (tmp_path / "out.onnx").exists()

    report = optimize_onnx(symbolic, tmp_path / "out.onnx", input_shapes=[(1, 32)])
    assert report.passed and _ops(tmp_path / "out.onnx")["BatchNormalization"] == 0


def test_output_in_missing_directory_is_refused(mlp_onnx: Path, tmp_path: Path) -> None:
    target = tmp_path / "missing" / "out.onnx"

    with pytest.raises(OutputError, match="does not exist"):
        optimize_onnx(mlp_onnx, target)
    assert not target.exists() and not target.parent.exists()


def test_output_over_input_is_refused_and_input_unchanged(mlp_onnx: Path, tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    onnx.save(onnx.load(mlp_onnx), source)  # self-contained (the export may keep weights in a .data file)
    digest = _sha256(source)

    with pytest.raises(OutputError, match="input file"):
        optimize_onnx(source, source, force=True)
    assert _sha256(source) == digest
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_existing_output_needs_force(mlp_onnx: Path, tmp_path: Path) -> None:
    target = tmp_path / "out.onnx"
    target.write_bytes(b"old")

    with pytest.raises(OutputError, match="--force"):
        optimize_onnx(mlp_onnx, target)
    assert target.read_bytes() == b"old"

    optimize_onnx(mlp_onnx, target, force=True)
    assert _ops(target)["Gemm"] == 3


def test_failed_check_writes_nothing(mlp_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fold whose maths is wrong must be caught by the onnxruntime check, not shipped."""
    monkeypatch.setattr(fold_batchnorm, "scale_weight", lambda weight, scale, **_: weight)
    target = tmp_path / "out.onnx"

    with pytest.raises(VerificationError, match="nothing was written") as caught:
        optimize_onnx(mlp_onnx, target)
    message = str(caught.value)
    assert "\n" not in message and "tolerance" in message
    assert not target.exists()
    assert not caught.value.report.passed  # type: ignore[attr-defined]


def test_constant_folding_that_skips_a_node_prints_no_warning(mlp_onnx: Path, monkeypatch, caplog) -> None:
    """onnxscript logs 'Evaluation failed: ...' when it leaves a node unfolded (e.g. a Reshape of a symbolic shape)."""
    import logging

    import onnx_ir as ir
    import onnxscript.optimizer

    from normsurgeon.onnx.optimize import prepare

    def fold_and_complain(model, **kwargs):
        logging.getLogger("onnxscript.optimizer._constant_folding").warning("Evaluation failed: cannot reshape")

    monkeypatch.setattr(onnxscript.optimizer, "fold_constants", fold_and_complain)
    with caplog.at_level(logging.WARNING):
        prepare(ir.load(mlp_onnx))
    assert not [r for r in caplog.records if "Evaluation failed" in r.getMessage()]
    assert logging.getLogger("onnxscript.optimizer._constant_folding").level == logging.NOTSET  # restored


def test_the_report_says_what_the_clean_up_alone_removed(tmp_path: Path) -> None:
    """A graph with no norm to fold but constants to fold is not 'nothing happened'."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    one = numpy_helper.from_array(np.ones(4, np.float32), "one")
    nodes = [
        helper.make_node("Add", ["one", "one"], ["two"]),  # constant: folded away
        helper.make_node("Mul", ["two", "two"], ["four"]),  # constant: folded away
        helper.make_node("Add", ["x", "four"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [one])
    path = tmp_path / "consts.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)
    report = optimize_onnx(path, tmp_path / "out.onnx")
    assert report.passed and not report.changes
    assert "the graph was also cleaned up (constants folded, dead and duplicate nodes removed): 3 → 1 nodes" in report.notes
