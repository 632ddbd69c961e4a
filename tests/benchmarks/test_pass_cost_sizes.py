"""The pass-cost benchmark at several input sizes: rows, goals and tables keep the sizes apart (no timing here)."""

from __future__ import annotations

import pytest

from benchmarks.goals import goals
from benchmarks.pass_cost import reps_at
from benchmarks.report import pass_section
from benchmarks.run import parse_args

MIB = 2**20


def _rows(size: int, fold_ratio: float) -> list[dict]:
    facts = {"depth": 18, "batchnorms": 20, "weight_bytes": 20 * MIB, "width": 32, "input_size": size, "reps": 5}
    fold = {**facts, "method": "ns_fold", "seconds": 0.1, "peak_extra_bytes": MIB,
            "ratio_to": {"fx_fuse_copy": fold_ratio, "fx_fuse_inplace": fold_ratio * 1.5}}
    return [fold] + [{**facts, "method": m, "seconds": 0.1, "peak_extra_bytes": MIB}
                     for m in ("forward", "ns_trace", "fx_fuse_copy", "fx_fuse_inplace")]


def test_each_input_size_gets_its_own_goals_named_by_the_size():
    rows = _rows(32, 0.9) + _rows(224, 12.0)
    results = {"sections": {"pass_cost": {"rows": rows}}}
    verdicts = {goal: (verdict, numbers) for goal, verdict, numbers in goals(results)}

    assert verdicts["pass: fold time (trace included) ≤ fx.fuse (copy), 32×32 input"] == ("met", "ResNet-18 0.90×")
    verdict, numbers = verdicts["pass: fold time (trace included) ≤ fx.fuse (copy), 224×224 input"]
    assert verdict == "not met (1/1)" and numbers.startswith("ResNet-18 12.00×")


def test_the_tables_say_the_input_size_of_every_row():
    text = pass_section({"command": "python -m benchmarks.run --only pass_cost", "seconds": 1.0,
                         "rows": _rows(224, 12.0) + _rows(32, 0.9)})

    assert "one image (32×32 and 224×224) as the example input" in text
    assert "| ResNet-18 | 32×32 | 20 | 20.0 |" in text and "| ResNet-18 | 224×224 | 20 | 20.0 |" in text
    assert text.index("| ResNet-18 | 32×32 | 20 |") < text.index("| ResNet-18 | 224×224 | 20 |")
    assert "12.00 / 18.00" in text and "| ResNet-18 | 224×224 | 20.0 |" in text  # the memory table too


def test_larger_inputs_are_repeated_fewer_times_but_at_least_five_times():
    assert reps_at(32, 15) == 15 and reps_at(224, 15) == 5 and reps_at(64, 40) == 10 and reps_at(224, 1) == 1


def test_input_sizes_are_parsed_and_checked():
    assert parse_args(["--input-size", "32,224"]).input_size == (32, 224)
    assert parse_args([]).input_size is None  # the config's sizes
    with pytest.raises(SystemExit):
        parse_args(["--input-size", "32,x"])
    with pytest.raises(SystemExit):
        parse_args(["--input-size", "0"])
