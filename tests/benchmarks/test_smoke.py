"""The benchmark's quick mode runs end to end, so the benchmark cannot rot. No timing assertions."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _ratios(results: dict) -> list[float]:
    sections = results["sections"]
    found = [m["ratio"] for row in sections["eager"]["rows"] for m in row["methods"].values() if "ratio" in m]
    found += [v["ratio"] for row in sections["onnx"]["rows"] for v in row["variants"].values() if "ratio" in v]
    found += [row[k]["ratio"] for row in sections["bias_cost"]["rows"] for k in ("bias", "no_bias_add")]
    return found


def test_quick_benchmark_writes_results_tables_and_plot(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# hand-written intro\n")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(tmp_path / "out"), "--readme", str(readme)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["sections"]) == {"eager", "bias_cost", "onnx", "pass_cost"}
    assert results["environment"]["torch_num_threads"] == 1
    ratios = _ratios(results)
    assert ratios and all(math.isfinite(r) and r > 0 for r in ratios)
    eager = results["sections"]["eager"]["rows"][0]["methods"]
    assert eager["limit"]["ratio"] == 1.0
    assert eager["normsurgeon"]["norms_left"] == 0
    passes = results["sections"]["pass_cost"]["rows"]
    assert {row["method"] for row in passes} == {"forward", "ns_trace", "ns_fold", "fx_fuse_copy", "fx_fuse_inplace"}
    assert all(row["seconds"] > 0 for row in passes)  # timed in one worker, memory measured in others
    assert all("peak_extra_bytes" in row for row in passes)
    (fold,) = [row for row in passes if row["method"] == "ns_fold"]  # timed interleaved with the peers
    assert set(fold["ratio_to"]) == {"fx_fuse_copy", "fx_fuse_inplace"}
    assert all(math.isfinite(r) and r > 0 for r in fold["ratio_to"].values())

    tables = (tmp_path / "out" / "tables.md").read_text()
    for heading in ("### Goals", "### 1. Eager", "### 2. onnxruntime", "### 3. Cost of the passes"):
        assert heading in tables
    assert "ns fold − forward" in tables
    assert (tmp_path / "out" / "latency_ratio.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = readme.read_text()
    assert text.startswith("# hand-written intro") and "### Goals" in text
    assert (tmp_path / "latency_ratio.png").exists()
