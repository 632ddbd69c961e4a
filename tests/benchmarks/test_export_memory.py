"""The export-memory benchmark's quick mode runs end to end: a tiny Llama built, exported and verified, peaks
measured for the export and both baselines, every instrumented step recorded. No memory or timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_run_measures_the_export_against_the_loaded_model(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.export_memory", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["dtype"] == "float32" and row["weight_bytes"] == 4 * row["parameters"] > 0
    for kind in ("export", "loaded", "forward", "imports"):
        assert len(row[f"{kind}_peak_bytes_all"]) == 1 and row[f"{kind}_peak_bytes"] > 0
        assert 0 < row[f"{kind}_peak_anon_bytes"] <= row[f"{kind}_peak_bytes"]  # a part of the resident set
    assert row["beyond_loaded_bytes"] == row["export_peak_bytes"] - row["loaded_peak_bytes"]
    assert row["beyond_loaded_anon_bytes"] == row["export_peak_anon_bytes"] - row["loaded_peak_anon_bytes"]
    assert all(step["anon_after_bytes"] + step["file_after_bytes"] <= step["rss_after_bytes"] + 2**20
               for step in row["steps"] if "peak_bytes" in step)
    steps = [step["step"] for step in row["steps"]]
    assert steps == ["load", "pre-export passes (a forward)", "torch.onnx.export", "fuse + save",
                     "onnxruntime session", "comparison", "passed"]
    assert row["steps"][-1]["passed"] is True
    assert "beyond the loaded model" in done.stdout
