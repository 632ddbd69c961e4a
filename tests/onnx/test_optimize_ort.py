"""``optimize --target ort``: onnxruntime's fused norm ops, on small torch exports and on real transformers exports.

Each test asserts the op histogram (counts derived from the model's structure or config), what the
report says, and, independently of the pass's own check, that onnxruntime with its graph
optimizations off gives the input file's outputs (at sizes other than the check's where the file
has symbolic dims). ``--target portable`` (the default) must leave standard ai.onnx ops only.
"""

from __future__ import annotations

import collections
import logging
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from normsurgeon.commands.optimize import optimize as optimize_command
from normsurgeon.onnx import runtime
from normsurgeon.onnx.optimize import Target, optimize_onnx
from normsurgeon.report import SkipReason

ORT = "com.microsoft"
DIM = 16
TOKENS = (torch.randn(2, 5, DIM, generator=torch.Generator().manual_seed(0)),)


class PreNormStack(nn.Module):
    """``h = x + f(norm0(x)); y = norm2(h + g(norm1(h)))``: three norms, two of them fed by a residual Add
    (the first sum also read by the second residual), each Linear's bias an Add before it."""

    def __init__(self, norm: Callable[[int], nn.Module], *, return_sum: bool = False) -> None:
        super().__init__()
        self.norms = nn.ModuleList(norm(DIM) for _ in range(3))
        self.f, self.g = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.return_sum = return_sum
        with torch.no_grad():
            for param in self.norms.parameters():
                param.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor):
        h = x + self.f(self.norms[0](x))
        y = self.norms[2](h + self.g(self.norms[1](h)))
        return (y, h) if self.return_sum else y


def _export(module: nn.Module, inputs: tuple, path: Path, *, opset: int, dynamo: bool = True, **options) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            torch.onnx.export(module.eval(), inputs, path, dynamo=dynamo, opset_version=opset, **options)
        finally:
            logging.disable(logging.NOTSET)
    return path


def _ops(path: Path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(path).graph.node)


def _assert_same_outputs(source: Path, target: Path, shapes: list[tuple[int, ...]] = ()) -> None:
    """ORT with graph optimizations off on both files, on random inputs of ``shapes``."""
    feeds = runtime.random_feeds(onnx.load(source), shapes, seed=3)
    expected = runtime.run(runtime.session(source, optimize=False), feeds)
    actual = dict(runtime.run(runtime.session(target, optimize=False), feeds))
    for name, array in expected:
        np.testing.assert_allclose(actual[name], array, rtol=1e-4, atol=1e-4)


def _assert_portable(path: Path) -> None:
    model = onnx.load(path)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    for node in model.graph.node:
        assert node.domain in ("", "ai.onnx"), node.op_type
        assert onnx.defs.has(node.op_type, opset), f"{node.op_type} is no ai.onnx op at opset {opset}"


# --------------------------------------------------------------------------- small exports: each norm family

# (id, norm, opset, dynamo, the plain norm op, the Skip op)
STACK_CASES = [
    ("layernorm-18", nn.LayerNorm, 18, True, "LayerNormalization", "SkipLayerNormalization"),
    ("rmsnorm-18", nn.RMSNorm, 18, True, "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"),
    ("rmsnorm-23", nn.RMSNorm, 23, True, "RMSNormalization", "SkipSimplifiedLayerNormalization"),
    ("layernorm-legacy-16", nn.LayerNorm, 16, False, "LayerNormalization", "SkipLayerNormalization"),
]


@pytest.mark.parametrize(("key", "norm", "opset", "dynamo", "plain", "skip"), STACK_CASES,
                         ids=[case[0] for case in STACK_CASES])
def test_every_norm_and_residual_pair_becomes_an_onnxruntime_op(tmp_path, key, norm, opset, dynamo, plain, skip):
    torch.manual_seed(0)
    source = _export(PreNormStack(norm), TOKENS, tmp_path / "in.onnx", opset=opset, dynamo=dynamo)
    target = tmp_path / "out.onnx"

    report = optimize_onnx(source, target, target=Target.ORT)

    assert dict(_ops(target)) == {"MatMul": 2, plain: 1, skip: 2}, "every Add (residuals and biases) is fused"
    nodes = {node.op_type: node for node in onnx.load(target).graph.node if node.op_type != skip}
    skips = [node for node in onnx.load(target).graph.node if node.op_type == skip]
    assert {node.domain for node in skips} == {ORT} and nodes[plain].domain == ""
    first, last = skips
    assert list(first.output[1:3]) == ["", ""] and first.output[3] in last.input, "the next residual reads the sum"
    assert len(last.output) == 1, "an unread sum is left out"
    pairs = [c for c in report.changes if c.detail.endswith(f"→ {skip}")]
    assert len(pairs) == 2 and all("bias Add" in c.detail for c in pairs)
    assert report.skipped == [] and report.passed
    assert report.facts["target"] == "ort" and report.facts["nodes_after"] == 5
    _assert_same_outputs(source, target)


def test_portable_target_keeps_standard_ops_and_names_the_ort_target(tmp_path):
    torch.manual_seed(0)
    source = _export(PreNormStack(nn.RMSNorm), TOKENS, tmp_path / "in.onnx", opset=18)
    target = tmp_path / "out.onnx"

    report = optimize_onnx(source, target)

    _assert_portable(target)
    assert _ops(target)["ReduceMean"] == 3 and report.changes == []
    assert len(report.skipped) == 3
    assert all(s.reason is SkipReason.OPSET_TOO_OLD for s in report.skipped)
    assert all("--target ort would use onnxruntime's SimplifiedLayerNormalization" in s.detail for s in report.skipped)


def test_a_sum_that_is_a_graph_output_comes_from_the_skip_op_under_its_name(tmp_path):
    torch.manual_seed(0)
    source = _export(PreNormStack(nn.LayerNorm, return_sum=True), TOKENS, tmp_path / "in.onnx", opset=18)
    target = tmp_path / "out.onnx"

    optimize_onnx(source, target, target=Target.ORT)

    graph = onnx.load(target).graph
    assert [o.name for o in graph.output] == [o.name for o in onnx.load(source).graph.output]
    producer = next(node for node in graph.node if graph.output[1].name in node.output)
    assert producer.op_type == "SkipLayerNormalization" and list(producer.output).index(graph.output[1].name) == 3
    assert "Add" not in _ops(target)
    _assert_same_outputs(source, target)


def test_a_pair_the_kernel_cannot_take_stays_and_the_skip_says_why(tmp_path):
    torch.manual_seed(0)
    images = (torch.randn(2, 3, 5, DIM, generator=torch.Generator().manual_seed(0)),)  # rank 4
    source = _export(PreNormStack(nn.LayerNorm), images, tmp_path / "in.onnx", opset=18)
    target = tmp_path / "out.onnx"

    report = optimize_onnx(source, target, target=Target.ORT)

    ops = _ops(target)
    assert ops["LayerNormalization"] == 3 and "SkipLayerNormalization" not in ops
    assert len(report.skipped) == 2
    assert {s.reason for s in report.skipped} == {SkipReason.UNSUPPORTED_STRUCTURE}
    assert all("its input's rank is 4; onnxruntime's Skip ops take rank 2 or 3" in s.detail for s in report.skipped)
    _assert_same_outputs(source, target)


def test_cli_target_ort_writes_the_fused_ops_and_an_unknown_target_lists_the_choices(tmp_path):
    torch.manual_seed(0)
    source = _export(PreNormStack(nn.RMSNorm), TOKENS, tmp_path / "in.onnx", opset=20)
    target = tmp_path / "out.onnx"
    runner = CliRunner()

    result = runner.invoke(optimize_command, [str(source), "-o", str(target), "--target", "ort", "--json"])
    wrong = runner.invoke(optimize_command, [str(source), "--target", "gpu"])

    assert result.exit_code == 0, result.output
    assert _ops(target)["SkipSimplifiedLayerNormalization"] == 2
    assert wrong.exit_code == 2 and all(f"'{t}'" in wrong.output for t in ("portable", "ort", "ort-cpu"))


# --------------------------------------------------------------------------- real exports: Llama and GPT-2

# A file torch's exporter writes at this opset (dynamic batch and sequence), or normsurgeon's own (opset 23).
SOURCES = ("torch-18", "torch-20", "normsurgeon-23")
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def real_export(tmp_path_factory):
    """``real_export(name, source)`` -> (model, path, another input shape the file takes), cached."""
    from tests.hf_models import causal_lm

    directory = tmp_path_factory.mktemp("real")
    cache: dict[tuple[str, str], tuple] = {}

    def _get(name: str, source: str):
        if (name, source) not in cache:
            model = causal_lm(name)
            model.config.use_cache = False
            path = directory / f"{name}-{source}.onnx"
            if source.startswith("torch"):
                dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
                _export(model, (IDS,), path, opset=int(source[-2:]), input_names=["input_ids"], dynamic_shapes=(dims,))
                other = (3, 9)
            else:
                from normsurgeon.onnx.export import export_onnx

                export_onnx(model, (IDS,), path, dynamic_batch=True)
                other = (3, 7)
            cache[name, source] = model, path, other
        return cache[name, source]

    return _get


def _expected(name: str, model: nn.Module, source: str) -> tuple[str, int, str, int]:
    """(plain norm op, count, Skip op, count) from the config: 2 norms a layer and a final one; each is fed
    by a residual sum but Llama's first (it reads the token embedding; GPT-2's reads token + position)."""
    layers = model.config.num_hidden_layers
    fed_by_sum = 2 * layers + (1 if name == "gpt2" else 0)
    if name == "gpt2":
        return "LayerNormalization", 2 * layers + 1 - fed_by_sum, "SkipLayerNormalization", fed_by_sum
    plain = "RMSNormalization" if source.endswith("23") else "SimplifiedLayerNormalization"
    return plain, 2 * layers + 1 - fed_by_sum, "SkipSimplifiedLayerNormalization", fed_by_sum


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_transformers_export_gets_a_fused_op_for_every_norm_and_residual(real_export, tmp_path, name, source):
    model, path, other = real_export(name, source)
    target = tmp_path / "out.onnx"

    report = optimize_onnx(path, target, input_shapes=[(2, 7)], target=Target.ORT)

    plain, plain_count, skip, skip_count = _expected(name, model, source)
    ops = _ops(target)
    assert (ops[plain], ops[skip]) == (plain_count, skip_count)
    assert ops["ReduceMean"] == 0 and (name == "gpt2" or ops["Pow"] == 0), "no decomposed norm left"
    assert len([c for c in report.changes if c.detail.endswith(f"→ {skip}")]) == skip_count
    assert report.skipped == [] and report.passed
    assert report.facts["nodes_after"] < report.facts["nodes_before"]
    _assert_same_outputs(path, target, [other])


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_transformers_export_portable_target_keeps_standard_ops(real_export, tmp_path, name, source):
    model, path, other = real_export(name, source)
    target = tmp_path / "out.onnx"

    report = optimize_onnx(path, target, input_shapes=[(2, 7)])

    _assert_portable(target)
    assert report.passed
    _assert_same_outputs(path, target, [other])


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_as_many_fused_norms_as_onnxruntimes_transformer_optimizer(real_export, tmp_path, name, source):
    """onnxruntime's own optimizer on the same file (model_type "gpt2" for Llama; GPT-2's export makes its
    gpt2 post-processing fail on a Gemm without bias, so "bert" there): ours fuses at least as many."""
    optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
    model, path, _ = real_export(name, source)
    target = tmp_path / "out.onnx"
    optimize_onnx(path, target, input_shapes=[(2, 7)], target=Target.ORT)
    logging.disable(logging.WARNING)
    try:
        theirs = optimizer.optimize_model(str(path), model_type="gpt2" if name == "llama" else "bert", num_heads=4,
                                          hidden_size=32, opt_level=0, use_gpu=False)
    finally:
        logging.disable(logging.NOTSET)
    their_ops = collections.Counter(node.op_type for node in theirs.model.graph.node)

    ours = _ops(target)
    for op in ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization"):
        assert ours[op] >= their_ops[op], op


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_ort_cpu_target_fuses_every_norm_but_leaves_the_residual_adds(real_export, tmp_path, name):
    """On an opset-18 file: every norm one fused op (onnxruntime's SimplifiedLayerNormalization for RMSNorm),
    no Skip op (onnxruntime's CPU Skip kernels are slower than Add + norm), same outputs."""
    model, path, other = real_export(name, "torch-18")
    target = tmp_path / "out.onnx"

    report = optimize_onnx(path, target, input_shapes=[(2, 7)], target=Target.ORT_CPU)

    plain = "LayerNormalization" if name == "gpt2" else "SimplifiedLayerNormalization"
    ops = _ops(target)
    assert ops[plain] == 2 * model.config.num_hidden_layers + 1
    assert ops["SkipLayerNormalization"] == ops["SkipSimplifiedLayerNormalization"] == 0
    assert ops["ReduceMean"] == 0 and (name == "gpt2" or ops["Pow"] == 0), "no decomposed norm left"
    assert report.passed and report.facts["target"] == "ort-cpu"
    _assert_same_outputs(path, target, [other])


class PostNormBlock(nn.Module):
    """BERT's shape: ``y = norm(x + f(x))``, the residual sum read by the norm alone."""

    def __init__(self) -> None:
        super().__init__()
        self.f, self.norm = nn.Linear(DIM, DIM), nn.LayerNorm(DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.f(x))


def test_ort_cpu_keeps_onnxruntime_from_fusing_a_post_norm_residual_into_its_slow_skip_op(tmp_path):
    """onnxruntime itself fuses Add + LayerNormalization into SkipLayerNormalization when it builds a session (the
    cause of a tiny BERT's 1.10x optimum's latency); --target ort-cpu writes that Add as a Sum it does not match."""
    torch.manual_seed(0)
    source = _export(PostNormBlock(), TOKENS, tmp_path / "in.onnx", opset=18)
    target = tmp_path / "out.onnx"

    report = optimize_onnx(source, target, target=Target.ORT_CPU)

    assert _ops(target)["Sum"] == 1 and _ops(target)["Add"] == _ops(source)["Add"] - 1  # the linear's bias stays
    assert [c.detail for c in report.changes if c.action == "replaced"] == [
        "Add → Sum before LayerNormalization (onnxruntime's CPU Skip fusion left out)"]
    for path, skips in ((source, 1), (target, 0)):  # what onnxruntime's own session-time optimizers make of each
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{path.stem}.session.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        assert _ops(Path(options.optimized_model_filepath))["SkipLayerNormalization"] == skips
    _assert_same_outputs(source, target)
