"""Reports piped to a file keep every module path whole (rich would otherwise assume 80 columns)."""

from __future__ import annotations

import io

import pytest

from normsurgeon.render import print_check, print_report, report_console
from normsurgeon.report import Change, Check, OutputDiff, Report

LONG = "resnet.encoder.stages.3.layers.2.layer.1.normalization"


def test_a_piped_report_keeps_long_paths_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    buffer = io.StringIO()
    console = report_console(file=buffer, highlight=False)
    report = Report("fold", changes=[Change("folded", LONG, LONG.replace("normalization", "convolution"), "into it")])

    print_report(report, console, title="t")

    assert LONG in buffer.getvalue() and "…" not in buffer.getvalue()


def test_columns_still_decides_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    assert report_console(file=io.StringIO()).width == 100


def _check(informational: bool) -> Check:
    outputs = (OutputDiff("logits", 0.25, 0.1, 0.99, True), OutputDiff("hidden", 0.0, 0.0, 1.0, True))
    return Check(outputs, atol=1e-5, rtol=1e-4, label="after vs before", informational=informational)


def test_an_informational_check_is_measured_not_judged() -> None:
    buffer = io.StringIO()
    print_check(_check(informational=True), report_console(file=buffer, highlight=False, width=200))

    text = " ".join(buffer.getvalue().split())  # the title wraps at the table's width
    assert "informational: not expected to match" in text and "pass if" not in text
    assert "differs" in text and "same" in text and "pass" not in text


def test_a_judged_check_states_its_rule_and_verdicts() -> None:
    buffer = io.StringIO()
    print_check(_check(informational=False), report_console(file=buffer, highlight=False, width=200))

    text = " ".join(buffer.getvalue().split())
    assert "pass if max|diff| <= 1e-05 + 0.0001*max|ref|" in text and "informational" not in text
    assert "differs" not in text and text.count("pass") == 3  # the rule and both outputs
