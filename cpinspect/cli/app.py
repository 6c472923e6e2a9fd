"""The typer app: one explicit list of commands, each a module of :mod:`cpinspect.cli`.

Command modules import torch inside the command only, so ``cpinspect --help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer

from cpinspect import __version__
from cpinspect.cli import analyze, check, diagnose, explore, info, layout, simulate

app = typer.Typer(
    name="cpinspect",
    help="Inspect and debug context-parallel (zigzag) sharding of packed multimodal batches.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

COMMANDS: list[tuple[str, Callable[..., Any]]] = [
    ("simulate", simulate.simulate),
    ("info", info.info),
    ("analyze", analyze.analyze),
    ("check", check.check),
    ("diagnose", diagnose.diagnose),
    ("layout", layout.layout),
    ("explore", explore.explore),
]
for name, command in COMMANDS:
    app.command(name=name)(command)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"cpinspect {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                          callback=_print_version)] = False,
) -> None:
    """Inspect and debug context-parallel (zigzag) sharding of packed multimodal batches."""


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
