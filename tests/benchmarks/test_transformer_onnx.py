"""The transformer ONNX benchmark's quick mode runs end to end; optimum's rows only where optimum's exporter runs
(optimum-onnx 0.1.0 needs transformers < 4.58: otherwise torch's opset-18 export stands in). No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("transformer_onnx") / "results.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.transformer_onnx", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_quick_run_exports_the_tiny_llama_four_ways_within_fp32_rounding(quick: dict[str, Any]) -> None:
    rows = {row["variant"]: row for row in quick["rows"]}
    reference = quick["reference"]
    assert set(rows) == {"ns", "ns+ort", reference, f"{reference}+trf"}
    for row in rows.values():
        assert row["runtime"]["32"]["max_abs_error"] < 1e-4 and row["runtime"]["32"]["latency_s"] > 0
    # 2 layers: 2 x 2 norms + the final one; --target ort pairs the 4 that follow a residual Add
    assert rows["ns"]["ops"]["RMSNormalization"] == 5 and rows["ns"]["opset"] == 23
    assert rows["ns+ort"]["ops"]["SkipSimplifiedLayerNormalization"] == 4
    assert rows["ns"]["peak_rss_bytes"] > 0 and rows["ns"]["wall_s"] > 0
    assert len(quick["goals"]) == 4


@pytest.mark.slow
def test_quick_run_measures_optimum_itself_where_it_runs(quick: dict[str, Any]) -> None:
    if quick["optimum_missing"]:
        pytest.skip(f"optimum's ONNX exporter cannot run here ({quick['optimum_missing']}): torch's export stood in")
    rows = {row["variant"]: row for row in quick["rows"]}
    assert rows["optimum"]["opset"] == 18 and rows["optimum+trf"]["ops"].get("SkipSimplifiedLayerNormalization")
