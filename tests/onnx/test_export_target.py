"""export --target ort: the exported graph's norms fused into onnxruntime's own ops, verified with the rest."""

from __future__ import annotations

import torch

from normsurgeon.onnx.export import export_onnx
from tests.hf_models import VOCAB, causal_lm


def test_export_target_ort_fuses_each_residual_add_and_norm(tmp_path) -> None:
    model = causal_lm("llama")
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "use_cache": False}
    portable = export_onnx(model, inputs, tmp_path / "portable.onnx")
    fused = export_onnx(model, inputs, tmp_path / "ort.onnx", target="ort")
    assert portable.passed and fused.passed and fused.facts["target"] == "ort"
    ops = fused.facts["op_histogram"]
    layers = model.config.num_hidden_layers
    # every norm but the first reads a residual sum (the first reads the embeddings): 2 per layer - 1 + the final
    assert ops["com.microsoft::SkipSimplifiedLayerNormalization"] == 2 * layers
    assert ops["RMSNormalization"] == 1 and portable.facts["op_histogram"]["RMSNormalization"] == 2 * layers + 1
    assert len(fused.changes) == 2 * layers
