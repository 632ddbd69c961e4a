"""Rendering reports for people (rich tables) and for programs (JSON)."""

from __future__ import annotations

import json
import os
from typing import Any

from rich.console import Console
from rich.table import Table

from .report import Check, Report


_PIPED_WIDTH = 400  # wide enough that no module path is cut; a table is only as wide as its content


def report_console(**options: Any) -> Console:
    """A console for reports: the terminal's width on a terminal (or $COLUMNS), wide when piped.

    Piped to a file, rich would assume 80 columns and cut module paths to ``resnet.encod…``;
    paths must stay whole where a program or a person greps them.
    """
    console = Console(**options)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = _PIPED_WIDTH
    return console


def render_json(payload: dict[str, Any]) -> str:
    return json.dumps(payload, indent=2, default=str, allow_nan=True)


def print_report(report: Report, console: Console, *, title: str, facts: dict[str, str] | None = None) -> None:
    """A short human report: facts, what changed, what was skipped and why, the check."""
    console.print(f"[bold]{title}[/bold]")
    for key, value in {**(facts or {}), **report.facts}.items():
        console.print(f"  {key}: {value}")
    for note in report.notes:
        console.print(f"  note: {note}")
    if report.changes:
        table = Table(title=f"changed ({len(report.changes)})", title_justify="left")
        for column in ("module", "action", "into", "detail"):
            table.add_column(column)
        for change in report.changes:
            table.add_row(change.module, change.action.value, change.into or "", change.detail)
        console.print(table)
    else:
        console.print("  nothing changed")
    if report.skipped:
        table = Table(title=f"skipped ({len(report.skipped)})", title_justify="left")
        table.add_column("module")
        table.add_column("why")
        for skip in report.skipped:
            table.add_row(skip.module, skip.message)
        console.print(table)
    for check in report.checks:
        print_check(check, console)


def print_check(check: Check, console: Console) -> None:
    rule = "informational: not expected to match" if check.informational else (
        f"pass if max|diff| <= {check.atol:g} + {check.rtol:g}*max|ref|")
    table = Table(title=f"check: {check.label} ({rule})", title_justify="left")
    for column in ("output", "max abs diff", "max rel diff", "cosine", "result"):
        table.add_column(column)
    for out in check.outputs:
        if check.informational and out.passed:  # measured, not judged: say whether it moved
            verdict = "[yellow]differs[/yellow]" if out.max_abs_diff > 0 else "same"
        else:
            verdict = "[green]pass[/green]" if out.passed else f"[red]FAIL[/red] {out.detail}".rstrip()
        table.add_row(out.name, f"{out.max_abs_diff:.3g}", f"{out.max_rel_diff:.3g}", f"{out.cosine:.9f}", verdict)
    console.print(table)
