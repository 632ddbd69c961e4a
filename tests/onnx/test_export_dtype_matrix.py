"""Every model x dtype through the public exports: ``export_onnx`` and ``export_with_past`` verify themselves.

Tiny random BERT (``hf_model("bert")``, an encoder: no with-past) and causal Llama, Qwen2, GPT-2
(``causal_lm``), each ``.to(dtype)``. Every check must pass at :func:`~normsurgeon.check.default_tolerance`
of the dtype (``max|ort - torch| <= atol + rtol * max|torch|``: float32 (1e-5, 1e-4), float16 (1e-3, 1e-2),
bfloat16 (1e-2, 5e-2)); the report's note must name the ops computed in float32 (bfloat16: islands written
in the file; float16: onnxruntime CPU's own casts at load time), and the file must keep the model's dtype at
its inputs and outputs. float32 with-past is tests/onnx/test_export_with_past.py's.

Measured max|diff| over all checks (relative to max|torch| in brackets), onnxruntime 1.32 CPU, torch 2.13:

=========  ===================  ===================  ===================
model      float32              float16              bfloat16
=========  ===================  ===================  ===================
BERT       9.5e-7 (1.5e-7)      3.9e-3 (7.2e-4)      3.1e-2 (5.8e-3)
Llama      8.9e-8 (2.0e-7)      3.1e-4 (7.1e-4)      2.8e-3 (6.3e-3)
Qwen2      8.9e-8 (2.2e-7)      2.4e-4 (6.2e-4)      2.9e-3 (7.4e-3)
GPT-2      8.9e-8 (2.2e-7)      2.7e-4 (6.5e-4)      2.4e-3 (5.8e-3)
=========  ===================  ===================  ===================

with past (prefill and 3 decode steps at batch 1 and 2; logits and presents):

=========  ===================  ===================
model      float16              bfloat16
=========  ===================  ===================
Llama      4.9e-4 (1.5e-3)      2.8e-3 (7.3e-3)
Qwen2      2.4e-4 (8.4e-4)      2.9e-3 (8.7e-3)
GPT-2      3.7e-4 (1.0e-3)      2.9e-3 (6.9e-3)
=========  ===================  ===================

``target="ort"`` (residual Add + norm fused into com.microsoft Skip ops) measured the same within rounding:
float16 4.9e-3 / 3.7e-4 / 2.7e-4 / 3.8e-4 and bfloat16 3.1e-2 / 2.8e-3 / 2.9e-3 / 2.0e-3 (BERT / Llama / Qwen2 /
GPT-2); with past, bfloat16 Llama 2.8e-3 and GPT-2 2.0e-3.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx_ir.tensor_adapters import TorchTensor

from normsurgeon.check import default_tolerance
from normsurgeon.onnx import runtime
from normsurgeon.onnx.export import export_onnx
from normsurgeon.onnx.precision import add_float32_islands, run_torch
from normsurgeon.onnx.with_past import export_with_past
from normsurgeon.report import Report
from tests.hf_models import VOCAB, causal_lm, hf_model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HALF = ("float16", "bfloat16")
ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
               "bfloat16": onnx.TensorProto.BFLOAT16}
FLOATING = set(ONNX_DTYPES.values())
# Ops onnxruntime 1.32 CPU has no kernel for in the dtype (besides Add/Mul): computed in float32.
FLOAT32_OPS = {
    "bfloat16": {"bert": {"MatMul", "Attention", "Gelu"}, "llama": {"MatMul", "Attention", "RMSNormalization"},
                 "qwen2": {"MatMul", "Attention", "RMSNormalization"}, "gpt2": {"Gemm", "Attention", "Tanh"}},
    "float16": {"bert": {"MatMul", "Gelu"}, "llama": {"MatMul", "Sigmoid"}, "qwen2": {"MatMul", "Sigmoid"},
                "gpt2": {"Gemm", "Tanh"}},
}
KEPT_IN_DTYPE = {"bert": "LayerNormalization", "gpt2": "LayerNormalization"}  # a bfloat16 kernel exists


def failures(report: Report) -> list[str]:
    """Each failing check: its label, tolerance and the outputs beyond it (what a failed assert shows)."""
    return [f"{c.label} (atol {c.atol}, rtol {c.rtol}): "
            + ", ".join(f"{o.name} {o.max_abs_diff:.3g} ({o.max_rel_diff:.3g} of max|ref|)" for o in c.outputs
                        if not o.passed)
            for c in report.checks if not c.passed]


def assert_passed_at_default_tolerance(report: Report, dtype: str) -> None:
    assert report.passed, failures(report)
    tolerances = {(c.label, c.atol, c.rtol) for c in report.checks}
    assert all((atol, rtol) == default_tolerance(DTYPES[dtype]) for _, atol, rtol in tolerances), tolerances


def float32_ops(report: Report, dtype: str) -> tuple[set[str], str]:
    """The op types the islands note lists for ``dtype``, and how it says they compute ('' without a note)."""
    for note in report.notes:
        for listed, how in re.findall(rf"has no {dtype} kernel for ([^:]+): (.+?)(?=; onnxruntime |$)", note):
            return {op.rsplit(" x", 1)[0] for op in listed.split(", ")}, how
    return set(), ""


def assert_islands_noted(report: Report, name: str, dtype: str, islands: int | None = 1) -> None:
    """bfloat16: ``islands`` (None: any number) written in the file, the weights still bfloat16; float16:
    onnxruntime's own casts; float32: no note."""
    ops, how = float32_ops(report, dtype)
    if dtype == "float32":
        assert not any("kernel" in note for note in report.notes), report.notes
        return
    assert FLOAT32_OPS[dtype][name] <= ops, (ops, report.notes)
    if dtype == "bfloat16":
        count = r"\d+ islands?" if islands is None else f"{islands} islands?"
        assert re.fullmatch(rf"they compute in float32, in {count} \(.*\); the weights stay bfloat16 on disk", how), how
        assert KEPT_IN_DTYPE.get(name) not in ops
    else:
        assert how == "it computes them in float32 (casts it inserts when it loads the file)", how


def floating_io(path: Path) -> dict[str, int]:
    """The file's floating inputs and outputs: name -> ONNX element type."""
    graph = onnx.load(path, load_external_data=False).graph
    return {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)
            if v.type.tensor_type.elem_type in FLOATING}


# --------------------------------------------------------------------------- islands beside an untyped value


def concat_beside_untyped(inside: bool) -> ir.Model:
    """``y = Concat(x @ w, Identity(x))`` (``inside``: ``Concat(Identity(x @ w), x)``) in bfloat16, the Identity's
    output left untyped (as the Skip fusions leave their sum output). Only MatMul lacks a bfloat16 kernel."""
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    weight = ir.val("w", ir.DataType.BFLOAT16, [4, 4], const_value=TorchTensor(w, name="w"))
    x = ir.val("x", ir.DataType.BFLOAT16, [2, 4])
    matmul = ir.node("MatMul", [x, weight], outputs=[ir.val("m", ir.DataType.BFLOAT16, [2, 4])])
    identity = ir.node("Identity", [matmul.outputs[0] if inside else x], outputs=[ir.val("u")])
    operands = [identity.outputs[0], x] if inside else [matmul.outputs[0], identity.outputs[0]]
    concat = ir.node("Concat", operands, {"axis": 0}, outputs=[ir.val("y", ir.DataType.BFLOAT16, [4, 4])])
    graph = ir.Graph([x], concat.outputs, nodes=[matmul, identity, concat], initializers=[weight],
                     opset_imports={"": 23})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize(("inside", "joined"), [(False, 0), (True, 2)], ids=["made-outside", "made-inside"])
def test_a_value_of_unknown_dtype_is_read_on_its_producers_side_of_the_island(inside: bool, joined: int,
                                                                              tmp_path: Path) -> None:
    """An untyped value gets no Cast, so the Concat reading it must compute where its producer does: in bfloat16
    beside an Identity of the input, in float32 after an Identity of the MatMul; else onnxruntime refuses the
    file ("Type parameter (T) of Optype (Concat) bound to different types")."""
    model = concat_beside_untyped(inside)
    w = torch.from_numpy(np.asarray(model.graph.initializers["w"].const_value.numpy(), dtype=np.float32))

    found = add_float32_islands(model)

    assert (found.float32_ops, found.joined, found.islands) == ({"bfloat16": {"MatMul": 1}}, joined, 1)
    assert found.casts == 3  # x and w to float32, and one back: the MatMul's output (outside) or y (inside)
    ir.save(model, tmp_path / "concat.onnx")
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    (y,) = run_torch(runtime.session(tmp_path / "concat.onnx"), {"x": x})
    expected = torch.cat([x @ w.to(torch.bfloat16), x])
    atol, rtol = default_tolerance(torch.bfloat16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected.float(), atol=atol, rtol=rtol)


# --------------------------------------------------------------------------- export_onnx


def tiny(name: str) -> tuple[torch.nn.Module, dict]:
    """The model and its example inputs: token ids (batch 2, 8 tokens); the causal LMs without a cache."""
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    if name == "bert":
        return hf_model("bert"), {"input_ids": ids}
    return causal_lm(name), {"input_ids": ids, "use_cache": False}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", ["bert", "llama", "qwen2", "gpt2"])
def test_export_onnx_verifies_every_model_in_every_dtype(name: str, dtype: str, tmp_path: Path) -> None:
    model, inputs = tiny(name)
    path = tmp_path / f"{name}.onnx"

    report = export_onnx(model.to(DTYPES[dtype]), inputs, path, dynamic_batch=True)

    assert_passed_at_default_tolerance(report, dtype)
    assert [c.label for c in report.checks] == ["onnxruntime cpu vs torch (batch 2)",
                                                "onnxruntime cpu vs torch (batch 3)"]
    assert_islands_noted(report, name, dtype)
    assert list(floating_io(path).values()) == [ONNX_DTYPES[dtype]]  # the output (hidden states or logits)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", ["bert", "llama", "qwen2", "gpt2"])
def test_export_onnx_for_onnxruntimes_fused_ops_verifies_in_half_precision(name: str, dtype: str, tmp_path: Path
                                                                           ) -> None:
    """target="ort" fuses residual Add + norm into com.microsoft Skip ops before the islands are drawn."""
    model, inputs = tiny(name)

    report = export_onnx(model.to(DTYPES[dtype]), inputs, tmp_path / f"{name}.onnx", dynamic_batch=True, target="ort")

    assert_passed_at_default_tolerance(report, dtype)
    assert any("Skip" in change.detail for change in report.changes), report.changes
    assert_islands_noted(report, name, dtype)  # the fused ops' outputs are typed: no seam at a Skip op


# --------------------------------------------------------------------------- export_with_past


@pytest.mark.slow
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_export_with_past_verifies_every_decode_step_in_half_precision(name: str, dtype: str, tmp_path: Path
                                                                       ) -> None:
    path = tmp_path / f"{name}.onnx"

    report = export_with_past(causal_lm(name).to(DTYPES[dtype]), path)

    assert_passed_at_default_tolerance(report, dtype)
    steps = []
    for batch in (1, 2):  # a prompt of 7, then 3 greedy tokens fed one at a time with onnxruntime's own presents
        steps += [f"prefill, batch {batch}, sequence 7", *(f"decode step {s}, batch {batch}, past {6 + s}" for s in
                                                            (1, 2, 3))]
    assert [c.label for c in report.checks] == [f"onnxruntime cpu vs torch ({step})" for step in steps]
    presents = [f"present.{i}.{kv}" for i in (0, 1) for kv in ("key", "value")]
    assert all([o.name for o in c.outputs] == ["logits", *presents] for c in report.checks)
    assert_islands_noted(report, name, dtype)
    pasts = [f"past_key_values.{i}.{kv}" for i in (0, 1) for kv in ("key", "value")]
    assert floating_io(path) == dict.fromkeys([*pasts, "logits", *presents], ONNX_DTYPES[dtype])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_export_with_past_for_onnxruntimes_fused_ops_verifies_in_bfloat16(name: str, tmp_path: Path) -> None:
    """target="ort": Skip(Simplified)LayerNormalization among the islands. GPT-2's failed to load ("SkipLayerNormalization bound to different types": its reader joined an
    island its producer was not in) while the fusion left the sum output untyped."""
    report = export_with_past(causal_lm(name).to(torch.bfloat16), tmp_path / f"{name}.onnx", target="ort")

    assert_passed_at_default_tolerance(report, "bfloat16")
    assert len(report.checks) == 8
    assert any(change.detail.endswith("SkipLayerNormalization" if name == "gpt2" else
                                      "SkipSimplifiedLayerNormalization") for change in report.changes)
    assert_islands_noted(report, name, "bfloat16")


@pytest.mark.slow
def test_the_cli_exports_a_bfloat16_save_pretrained_directory_with_past(tmp_path: Path, cli) -> None:
    """A folder saved in bfloat16 (config.json's ``torch_dtype``, as the Hub's files spell it) is exported and
    verified in bfloat16, not upcast: its past and logits are bfloat16 in the file."""
    folder = tmp_path / "qwen2"
    causal_lm("qwen2").to(torch.bfloat16).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["torch_dtype"] = config.pop("dtype", None) or config.pop("torch_dtype")
    (folder / "config.json").write_text(json.dumps(config))
    assert config["torch_dtype"] == "bfloat16"

    result = cli("export", folder, "--with-past")

    assert result.returncode == 0, result.stderr
    assert "decode step 3, batch 2, past 9) (pass if max|diff| <= 0.01 + 0.05*max|ref|)" in result.stdout
    assert "no bfloat16 kernel for" in result.stdout and "the weights stay bfloat16 on disk" in result.stdout
    io = floating_io(tmp_path / "qwen2.onnx")
    assert io["past_key_values.1.value"] == io["logits"] == onnx.TensorProto.BFLOAT16
