"""The transformer ONNX benchmark's quick mode runs end to end. optimum's own rows only where its separate
environment exists (benchmarks/optimum_env.sh; optimum-onnx 0.1.0 needs transformers < 4.58): otherwise torch's
opset-18 export stands in, and the optimum test is skipped with the reason. No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=["found", "stand-in"])
def quick(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The quick run as found (optimum where its environment exists), and with the stand-in forced."""
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("transformer_onnx") / "results.json"
    forced = ["--optimum-python", str(out.parent / "no-such-env" / "python")] if request.param == "stand-in" else []
    done = subprocess.run([sys.executable, "-m", "benchmarks.transformer_onnx", "--quick", "--out", str(out), *forced],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_quick_run_exports_the_tiny_llama_five_ways_within_fp32_rounding(quick: dict[str, Any]) -> None:
    rows = {row["variant"]: row for row in quick["rows"]}
    reference = quick["reference"]
    trf_failed = [f for f in quick["failures"] if "ns+trf" in f]
    expected = {"ns", "ns+ort", "ns+ort-cpu", reference, f"{reference}+trf"} | (set() if trf_failed else {"ns+trf"})
    assert set(rows) == expected
    for row in rows.values():
        timing = row["runtime"]["32"]
        assert timing["max_abs_error"] < 1e-4 and timing["latency_s"] > 0
        assert timing["ratio_q1"] <= timing["ratio_to_best"] <= timing["ratio_q3"]
    assert rows[reference]["runtime"]["32"]["best_reference"] in (reference, f"{reference}+trf")
    # 2 layers: 2 x 2 norms + the final one; --target ort pairs the 4 that follow a residual Add
    assert rows["ns"]["ops"]["RMSNormalization"] == 5 and rows["ns"]["opset"] == 23
    assert rows["ns+ort"]["ops"]["SkipSimplifiedLayerNormalization"] == 4
    assert rows["ns+ort-cpu"]["ops"]["RMSNormalization"] == 5
    assert "SkipSimplifiedLayerNormalization" not in rows["ns+ort-cpu"]["ops"]
    # measured inside the export process, from the loaded model on: never 0, never more than the whole peak
    for variant in ("ns", reference):
        assert 0 < rows[variant]["extra_rss_bytes"] < rows[variant]["peak_rss_bytes"]
        assert 0 < rows[variant]["extra_wall_s"] < rows[variant]["wall_s"]
    assert len(quick["goals"]) == 5  # latency of ns, ns+ort, ns+ort-cpu; memory; export time
    assert quick["table"].startswith("Reference: optimum itself" if reference == "optimum" else
                                     "Reference: the STAND-IN torch18")


@pytest.mark.slow
def test_quick_run_says_what_the_transformer_optimizer_did_to_normsurgeons_file(quick: dict[str, Any]) -> None:
    rows = {row["variant"]: row for row in quick["rows"]}
    if "ns+trf" not in rows:
        assert any("ns+trf: onnxruntime's transformer optimizer failed" in f for f in quick["failures"])
        return
    # opset 23's native Attention sends the optimizer's symbolic shape inference down its com.microsoft Attention
    # path; the row records that, and the native norms stay unfused (nothing to pair them into Skip ops)
    assert any("failed in shape inference" in line for line in rows["ns+trf"]["trf_said"])
    ops = rows["ns+trf"]["ops"]
    assert ops["RMSNormalization"] == 5 and "SkipSimplifiedLayerNormalization" not in ops


@pytest.mark.slow
def test_quick_run_measures_optimum_itself_where_its_environment_exists(quick: dict[str, Any]) -> None:
    if quick["optimum_missing"]:  # the stand-in run, and wherever benchmarks/optimum_env.sh has not run
        pytest.skip(f"optimum cannot run here ({quick['optimum_missing']}): torch's opset-18 export stood in")
    rows = {row["variant"]: row for row in quick["rows"]}
    assert rows["optimum"]["opset"] == 18 and rows["optimum+trf"]["ops"].get("SkipSimplifiedLayerNormalization") == 4
    assert quick["environment"]["optimum_environment"]["optimum-onnx"] == "0.1.0"
