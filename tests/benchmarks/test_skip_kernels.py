"""The Skip-kernel benchmark's quick mode: both files of each pair compute the same outputs. No timing assertions."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.skip_kernels import NORMS, main


def test_quick_run_times_each_norm_pair_on_equal_outputs(tmp_path: Path) -> None:
    rows = main(["--quick", "--out", str(tmp_path / "skip.json")])

    assert {r["norm"] for r in rows if r["provider"] == "CPUExecutionProvider"} == set(NORMS)
    for row in rows:
        assert row["max_abs_diff"] < 1e-5, row  # float32 rounding: the fused op computes the same thing
        assert row["add_norm_us"] > 0 and row["skip_us"] > 0
    assert json.loads((tmp_path / "skip.json").read_text())["rows"] == rows
