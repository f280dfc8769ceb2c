"""What the `latitude` command modules share: the two consoles, failing with one line, progress
lines, the lab's --topology/--state-dir options, and running a promotion with its exit code."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from latitude.lab import LabError

# Piped output keeps a readable width instead of rich's 80-column fallback.
out = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 120)

TopologyOption = Annotated[
    Path | None,
    typer.Option(
        "--topology", "-t", help="Topology file (default: the built-in three-region lab)."
    ),
]
StateDirOption = Annotated[
    Path | None,
    typer.Option("--state-dir", help="Where the lab keeps its state (default: .latitude/lab)."),
]


def fail(message: str, code: int = 1) -> None:
    # Messages quote TOML tables like [[regions]], which rich would read as markup; a wrapped
    # error line breaks scripts that grep for it.
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def progress_printer(quiet: bool = False):
    def show(message: str) -> None:
        if not quiet:
            err.print(f"[dim]…[/dim] {message}", highlight=False)

    return show


def promotion_call(fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, a promotion's or the lab's error ending the command with its code."""
    from latitude.promotion import PromotionError

    try:
        return fn(*args, **kwargs)
    except PromotionError as exc:
        fail(str(exc), exc.exit_code)
    except LabError as exc:
        fail(str(exc), 2)
