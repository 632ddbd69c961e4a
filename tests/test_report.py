"""The typed report: actions, left-out records, merging, and the JSON each report gives."""

from __future__ import annotations

import json

import pytest

import models
from normsurgeon.passes.convert import convert_norms
from normsurgeon.render import render_json
from normsurgeon.report import Action, Change, Check, LeftOut, OutputDiff, Report, Skip, SkipReason


def _check(label: str, passed: bool = True) -> Check:
    return Check((OutputDiff("output", 0.0, 0.0, 1.0, passed),), atol=1e-5, rtol=1e-4, label=label)


def test_an_action_given_as_its_word_is_the_member_and_prints_as_the_word() -> None:
    change = Change("weight norm removed", "fc1")

    assert change.action is Action.WEIGHT_NORM_REMOVED
    assert json.loads(render_json(change.to_dict()))["action"] == "weight norm removed"
    assert str(change.action) == f"{change.action}" == "weight norm removed"
    assert change == Change(Action.WEIGHT_NORM_REMOVED, "fc1")
    assert change.action in {"weight norm removed"}  # equal to its word, and hashed like it


def test_an_unknown_action_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown change action 'fold': the actions are 'folded', 'folded-affine'"):
        Change("fold", "bn")
    with pytest.raises(ValueError, match="unknown change action"):
        Report("fold").changed("fold")  # a typo is an error, not an empty list


def test_changed_takes_the_member_or_its_word() -> None:
    report = Report("fold", changes=[Change("folded", "bn1", "fc1"), Change("replaced", "bn2")])

    assert report.changed(Action.FOLDED) == report.changed("folded") == [report.changes[0]]


def test_merge_keeps_the_order_the_first_name_and_model_and_only_new_facts() -> None:
    first = Report("fold", changes=[Change("folded", "bn", "conv")], checks=[_check("fold")],
                   notes=["a"], facts={"to": "x", "n": 1}, model="model")
    second = Report("fold-affine", changes=[Change("folded-affine", "ln", "fc")],
                    skipped=[Skip("ln_f", SkipReason.NO_AFFINE)], checks=[_check("affine", passed=False)],
                    notes=["b"], facts={"n": 2, "m": 3}, left_out=[LeftOut("ln", SkipReason.HOOKED, "hooked")])

    merged = first.merge(second)

    assert (merged.pass_name, merged.model) == ("fold", "model")
    assert [c.module for c in merged.changes] == ["bn", "ln"] and [c.label for c in merged.checks] == ["fold", "affine"]
    assert merged.skipped == second.skipped and merged.left_out == second.left_out and merged.notes == ["a", "b"]
    assert merged.facts == {"to": "x", "n": 1, "m": 3} and list(merged.facts) == ["to", "n", "m"]
    assert not merged.passed and first.passed and len(first.changes) == 1  # a new report; the first is unchanged


@pytest.mark.parametrize("pass_name,has_folded", [
    ("fold", True), ("export", True), ("optimize", True),
    ("convert", False), ("recalibrate", False), ("weightnorm apply", False), ("verify", False),
])
def test_folded_is_listed_only_by_the_passes_that_fold(pass_name: str, has_folded: bool) -> None:
    payload = Report(pass_name, changes=[Change("folded", "bn", "conv")]).to_dict()

    assert ("folded" in payload) is has_folded
    assert "left_out" not in payload  # only when something was left out


def test_the_json_of_a_check_says_whether_it_is_informational() -> None:
    measured = Check(_check("x").outputs, atol=float("inf"), rtol=0.0, label="approx", informational=True)
    payload = json.loads(render_json(Report("convert", checks=[_check("exact"), measured]).to_dict()))

    assert [c["informational"] for c in payload["checks"]] == [False, True]
    assert payload["checks"][1]["atol"] == float("inf")  # kept as it was


def test_convert_records_each_norm_it_cannot_convert_exactly_beside_its_note() -> None:
    model = models.build("postnorm_transformer")

    report = convert_norms(model, models.example_inputs("postnorm_transformer", 2), to="rmsnorm", approximate=True)

    noted = [n.split(": not converted exactly")[0] for n in report.notes if "not converted exactly" in n]
    assert [o.module for o in report.left_out] == noted and len(noted) == 5
    assert {o.reason for o in report.left_out} == {SkipReason.UNSUPPORTED_STRUCTURE}
    assert "needs pre-norm blocks" in report.left_out[0].detail
    assert report.to_dict()["left_out"][0] == {"module": "blocks.0.ln1", "reason": report.left_out[0].message,
                                              "code": "UNSUPPORTED_STRUCTURE"}
    assert report.checks[-1].informational and report.checks[-1].passed
