"""Half-precision exports in onnxruntime CPU: float32 islands where it has no kernel (normsurgeon.onnx.precision).

Each export is torch's own (dynamo, optimized, opset 23, as ``export_onnx`` makes it); a bfloat16 one
must fail to load before the islands and load after them, and onnxruntime's outputs must match torch
running the same half model on CPU within :func:`~normsurgeon.check.default_tolerance` of the dtype:
``max|ort - torch| <= atol + rtol * max|torch|``, bfloat16 (1e-2, 5e-2), float16 (1e-3, 1e-2).
Measured: 6e-4 (float16) and 5e-3 to 9e-3 (bfloat16) of max|torch|, about torch's own rounding against float64.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx_ir.tensor_adapters import TorchTensor
from torch import nn

from normsurgeon.check import default_tolerance, flatten_outputs
from normsurgeon.errors import LoadError
from normsurgeon.onnx import runtime
from normsurgeon.onnx.export import math_attention, quiet
from normsurgeon.onnx.precision import Islands, add_float32_islands, run_torch
from tests.hf_models import causal_lm, prenorm_inputs

BF16, FP16 = ir.DataType.BFLOAT16, ir.DataType.FLOAT16
DTYPES = {BF16: torch.bfloat16, FP16: torch.float16}


def export(model: nn.Module, args: tuple) -> ir.Model:
    with quiet(), math_attention(), torch.no_grad():
        return torch.onnx.export(model, args, dynamo=True, optimize=True, opset_version=23).model


def session(model: ir.Model, path: Path) -> ort.InferenceSession:
    ir.save(model, path)
    return runtime.session(path)


def assert_matches_torch(sess: ort.InferenceSession, model: nn.Module, args: tuple) -> float:
    """onnxruntime's first output against torch's within the dtype's default tolerance; the relative difference."""
    with torch.no_grad():
        reference = flatten_outputs(model(*args))[0][1]
    (output, *_) = run_torch(sess, {i.name: t for i, t in zip(sess.get_inputs(), args)})
    assert output.dtype == reference.dtype and output.shape == reference.shape
    atol, rtol = default_tolerance(reference.dtype)
    scale = reference.double().abs().max().item()
    difference = (output.double() - reference.double()).abs().max().item()
    assert difference <= atol + rtol * scale, f"{difference:.3g} > {atol} + {rtol} * {scale:.3g}"
    return difference / scale


def initializer_dtypes(model: ir.Model) -> dict[str, ir.DataType]:
    return {name: value.dtype for name, value in model.graph.initializers.items()}


def cast_pairs(model: ir.Model) -> int:
    """Casts to a half dtype read by a Cast back to float32: the seam between two islands that should be one."""
    return sum(1 for node in model.graph if node.op_type == "Cast" and node.outputs[0].dtype in DTYPES
               for user, _ in node.outputs[0].uses() if user.op_type == "Cast")


# --------------------------------------------------------------------------- a hand-built graph


def chain_weights(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = {"w1": (4, 4), "w2": (4, 3), "b": (3,)}
    return {name: torch.randn(*shape, generator=generator).to(dtype) for name, shape in shapes.items()}


def chain(dtype: ir.DataType, *, output_read_inside: bool = False) -> ir.Model:
    """``y = (x @ w1).reshape(4, 2).T @ w2 + b``: MatMul, Reshape, Transpose, MatMul, Add, all in ``dtype``
    (onnxruntime CPU has bfloat16 kernels for Reshape and Transpose only); with ``output_read_inside`` the
    first MatMul's result is a graph output too."""
    weights = {name: ir.val(name, dtype, tuple(t.shape), const_value=TorchTensor(t, name=name))
               for name, t in chain_weights(DTYPES.get(dtype, torch.float32)).items()}
    shape = ir.val("shape", ir.DataType.INT64, [2], const_value=ir.tensor(np.array([4, 2], dtype=np.int64)))
    x = ir.val("x", dtype, [2, 4])
    first = ir.node("MatMul", [x, weights["w1"]], outputs=[ir.val("h", dtype, [2, 4])])
    reshape = ir.node("Reshape", [first.outputs[0], shape], outputs=[ir.val("r", dtype, [4, 2])])
    transpose = ir.node("Transpose", [reshape.outputs[0]], {"perm": [1, 0]}, outputs=[ir.val("t", dtype, [2, 4])])
    second = ir.node("MatMul", [transpose.outputs[0], weights["w2"]], outputs=[ir.val("m", dtype, [2, 3])])
    add = ir.node("Add", [second.outputs[0], weights["b"]], outputs=[ir.val("y", dtype, [2, 3])])
    outputs = [add.outputs[0], *([first.outputs[0]] if output_read_inside else [])]
    graph = ir.Graph([x], outputs, nodes=[first, reshape, transpose, second, add],
                     initializers=[*weights.values(), shape], opset_imports={"": 23})
    return ir.Model(graph, ir_version=10)


def chain_in_torch(x: torch.Tensor) -> torch.Tensor:
    """What :func:`chain` computes, in torch at ``x``'s dtype."""
    w = chain_weights(x.dtype)
    return (x @ w["w1"]).reshape(4, 2).T @ w["w2"] + w["b"]


def test_bfloat16_chain_is_one_island_and_runs(tmp_path: Path) -> None:
    model = chain(BF16)
    with pytest.raises(LoadError, match="NOT_IMPLEMENTED.*MatMul"):
        session(model, tmp_path / "plain.onnx")
    weights = initializer_dtypes(model)
    found = add_float32_islands(model)
    assert found.float32_ops == {"bfloat16": {"MatMul": 2, "Add": 1}}
    assert (found.islands, found.joined, found.written) == (1, 2, frozenset({"bfloat16"}))  # Reshape, Transpose
    assert found.casts == 5  # x, w1, w2, b to float32; y back
    assert initializer_dtypes(model) == weights  # the weights stay bfloat16 on disk
    assert [(v.name, v.dtype) for v in model.graph.outputs] == [("y", BF16)]
    assert cast_pairs(model) == 0
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    (y,) = run_torch(session(model, tmp_path / "islands.onnx"), {"x": x})
    reference = chain_in_torch(x)
    atol, rtol = default_tolerance(torch.bfloat16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference.float(), atol=atol, rtol=rtol)


def test_graph_output_read_inside_the_island_keeps_its_name_and_dtype(tmp_path: Path) -> None:
    model = chain(BF16, output_read_inside=True)
    found = add_float32_islands(model)
    assert (found.islands, found.casts) == (1, 6)  # h leaves as an output: one more Cast back
    assert [(v.name, v.dtype) for v in model.graph.outputs] == [("y", BF16), ("h", BF16)]
    reshape = next(node for node in model.graph if node.op_type == "Reshape")
    assert reshape.inputs[0].dtype == ir.DataType.FLOAT  # read inside the island in float32, not via a round trip
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y, h = run_torch(session(model, tmp_path / "islands.onnx"), {"x": x})
    assert (y.shape, h.shape, h.dtype) == ((2, 3), (2, 4), torch.bfloat16)


def test_float16_is_counted_not_rewritten_unless_asked(tmp_path: Path) -> None:
    model = chain(FP16)
    nodes = [node.op_type for node in model.graph]
    found = add_float32_islands(model)
    assert found.float32_ops == {"float16": {"MatMul": 2, "Add": 1}}
    assert (found.written, found.casts, [node.op_type for node in model.graph]) == (frozenset(), 0, nodes)
    assert "it computes them in float32 (casts it inserts when it loads the file)" in found.note()
    session(model, tmp_path / "plain.onnx")  # onnxruntime CPU casts float16 itself
    explicit = add_float32_islands(model, float16=True)
    assert (explicit.islands, explicit.casts, explicit.written) == (1, 5, frozenset({"float16"}))


def test_nothing_to_do_in_float32() -> None:
    model = chain(ir.DataType.FLOAT)
    found = add_float32_islands(model)
    assert found == Islands() and found.note() is None


# --------------------------------------------------------------------------- torch exports


class Block(nn.Module):
    """Linear -> RMSNorm -> attention -> GELU -> LayerNorm -> Linear on a float input (fed in its half dtype)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.out = nn.Linear(16, 48), nn.Linear(16, 8)
        self.rms, self.ln = nn.RMSNorm(48), nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.rms(self.proj(x)).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(self.ln(nn.functional.gelu(attended.transpose(1, 2).flatten(2))))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_block_runs_in_onnxruntime_and_matches_torch(dtype: torch.dtype, tmp_path: Path) -> None:
    torch.manual_seed(0)
    block = Block().eval().to(dtype)
    args = (torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1)).to(dtype),)
    model = export(block, args)
    found = add_float32_islands(model)
    name = "bfloat16" if dtype == torch.bfloat16 else "float16"
    assert {"MatMul", "Add"} <= found.float32_ops[name].keys()
    if dtype == torch.bfloat16:
        assert "RMSNormalization" in found.float32_ops[name]  # onnxruntime 1.32 CPU: float32/64 and float16 only
        assert found.islands == 1 and cast_pairs(model) == 0
    assert assert_matches_torch(session(model, tmp_path / "block.onnx"), block, args) < 0.05


@pytest.mark.slow
@pytest.mark.parametrize(("name", "dtype", "float16"), [
    ("llama", torch.bfloat16, False), ("llama", torch.float16, False), ("llama", torch.float16, True),
    ("gpt2", torch.float16, False), ("gpt2", torch.bfloat16, False),
], ids=["llama-bf16", "llama-fp16", "llama-fp16-islands", "gpt2-fp16", "gpt2-bf16"])
def test_half_causal_lm_matches_torch(name: str, dtype: torch.dtype, float16: bool, tmp_path: Path) -> None:
    lm = causal_lm(name).to(dtype)
    lm.config.use_cache = False
    args = prenorm_inputs(name)
    model = export(lm, args)
    if dtype == torch.bfloat16:
        with pytest.raises(LoadError, match="NOT_IMPLEMENTED"):
            session(model, tmp_path / "plain.onnx")
    weights = initializer_dtypes(model)
    found = add_float32_islands(model, float16=float16)
    half = "bfloat16" if dtype == torch.bfloat16 else "float16"
    assert ("Gemm" if name == "gpt2" else "MatMul") in found.float32_ops[half]
    assert initializer_dtypes(model) == weights
    if dtype == torch.bfloat16 or float16:
        assert found.islands == 1 and cast_pairs(model) == 0  # every layer in one island: no seams
    else:
        assert found.casts == 0
    assert assert_matches_torch(session(model, tmp_path / "lm.onnx"), lm, args) < 0.02


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_export_onnx_of_a_half_precision_llama_loads_and_verifies(dtype, tmp_path) -> None:
    """The issue's failure: bf16 Llama exports onnxruntime could not load. Now islands make it run, and the
    export's own verification (bf16 logits read without numpy) passes at the dtype's default tolerance."""
    from normsurgeon.onnx.export import export_onnx
    from tests.hf_models import VOCAB, causal_lm

    model = causal_lm("llama").to(dtype)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    report = export_onnx(model, {"input_ids": ids, "use_cache": False}, tmp_path / "half.onnx", dynamic_batch=True)
    assert report.passed, [c.to_dict() for c in report.checks]
    assert len(report.checks) == 2  # batch 2 and batch 3
    islanded = any("float32" in note and "bfloat16" in note for note in report.notes)
    assert islanded == (dtype == torch.bfloat16)
