"""The typer app: one explicit list of commands, each a module of :mod:`cpinspect.cli`.

Command modules import torch inside the command only, so ``cpinspect --help`` stays fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from cpinspect import __version__
from cpinspect.cli import analyze, check, diagnose, explore, info, layout, simulate
from cpinspect.cli.common import click_errors, quiet_broken_pipe, usage_error_paragraph
from cpinspect.cli.options import EXIT_BAD_INPUT


class PlainErrorsGroup(TyperGroup):
    """The root group: a usage error is one plain what/where/fix paragraph on stderr, exit 2, no box.

    Click's standalone handling is replaced by our own: the command runs with
    ``standalone_mode=False`` and the exceptions click would have printed in a box are printed
    as plain text here (a closed stdout is a quiet exit, like other CLIs).
    """

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, windows_expand_args: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, windows_expand_args, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except click_errors.NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click_errors.UsageError as exc:
            typer.echo(usage_error_paragraph(exc), err=True)
            sys.exit(EXIT_BAD_INPUT)
        except click_errors.ClickException as exc:
            typer.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        except BrokenPipeError:
            quiet_broken_pipe()
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="cpinspect",
    help="Inspect and debug context-parallel (zigzag) sharding of packed multimodal batches.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=PlainErrorsGroup,
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
