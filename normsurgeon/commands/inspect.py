"""``normsurgeon inspect``: one table of every norm layer — kind, placement, options, hazards. Writes nothing."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from ..cli_options import input_options, model_options, report_options, weights_option
from .common import ModelArgs, model_command, open_model


@click.command(short_help="List norm layers, what can be done with them, and hazards.")
@model_options
@weights_option
@input_options
@report_options
@model_command
def inspect(args: ModelArgs) -> None:
    """List every norm layer: kind, eps, affine, where it sits, what can be folded or converted
    (and why not), and hazards. Norms are recognised by what they compute, not by class name.

    \b
    Example:
      normsurgeon inspect model.pt --input-shape 1,16:int64 --json
    """
    from ..passes.inspect import inspect_norms
    from ..render import render_json, report_console

    opened = open_model(args, "inspect")
    report = inspect_norms(opened.model, opened.example_inputs())
    opened.annotate(report)
    if args.as_json:
        click.echo(render_json({**report.to_dict(), "model": str(args.model_path)}))
    else:
        print_inspect(report, report_console(highlight=False, soft_wrap=False),
                      title=f"normsurgeon inspect {args.model_path}")


def print_inspect(report, console: Console, *, title: str) -> None:
    """The human view: facts, the norm table, then options and hazards per norm."""
    console.print(f"[bold]{title}[/bold]")
    for key, value in report.facts.items():
        console.print(f"  {key}: {value}")
    for note in report.notes:
        console.print(f"  note: {note}", markup=False)
    table = Table(title="norms", title_justify="left")
    for column in ("path", "kind", "normalized", "eps", "affine", "placement"):
        table.add_column(column)
    for row in report.norms:
        kind = row.kind + ("" if row.native else f" ({row.cls})")
        table.add_row(row.path, kind, row.normalized, f"{row.eps:g}", row.affine, row.placement)
    console.print(table)
    options = Table(title="what normsurgeon can do", title_justify="left")
    for column in ("path", "can", "cannot"):
        options.add_column(column)
    for row in report.norms:
        options.add_row(row.path, "\n".join(row.can) or "-", "\n".join(row.cannot) or "-")
    console.print(options)
    flagged = [(row.path, hazard) for row in report.norms for hazard in row.hazards]
    if flagged:
        console.print(_table(f"hazards ({len(flagged)})", ("path", "hazard"), flagged))
    if report.unrecognized:
        console.print(_table("look like norms, but are not recognised", ("path", "class", "why"),
                             [(item["path"], item["class"], item["reason"]) for item in report.unrecognized]))
    if report.weight_standardized:
        console.print(_table("weight-standardized convs", ("path", "class", "bake"),
                             [(item["path"], item["class"], item["bake"]) for item in report.weight_standardized]))


def _table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> Table:
    """A titled table of plain-text rows."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    return table
