"""Reports piped to a file keep every module path whole (rich would otherwise assume 80 columns)."""

from __future__ import annotations

import io

import pytest

from normsurgeon.render import print_report, report_console
from normsurgeon.report import Change, Report

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
