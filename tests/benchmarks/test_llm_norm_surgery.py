"""The LLM norm-surgery benchmark's quick mode runs end to end (llm-compressor only where installed). No timing
assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_run_folds_every_norm_of_the_tiny_llama_exactly(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "llm.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.llm_norm_surgery", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads(out.read_text())
    rows = {row["method"]: row for row in results["rows"]}
    ns = rows["normsurgeon"]
    # 2 decoder layers x 2 norms and the final norm (into lm_head); fp32 rounding of a 0.1-scale logit
    assert ns["norms_folded"] == 5 and ns["check_passed"] and ns["logits_max_abs_error"] < 1e-5
    assert ns["wall_s"] > 0 and ns["peak_extra_bytes"] >= 0
    if "llm-compressor" in results["missing"]:
        assert set(rows) == {"normsurgeon"} and "n/a" in results["table"]
    else:
        assert rows["llm-compressor"]["norms_folded"] == 5 and rows["llm-compressor"]["mapping"] == "registry"
