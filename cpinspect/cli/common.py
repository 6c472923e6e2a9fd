"""The plumbing every command shares: console, error guard, torch import, batch loading, JSON.

Torch is imported inside the commands only, so ``cpinspect --help`` and usage errors stay fast.
Exit codes: 0 consistent, 1 an inconsistency was found, 2 bad input or usage, 3 internal error;
141 (128 + SIGPIPE, what a shell shows for ``cat`` in ``cat big | head``) when the reader of stdout
closed it early: nothing is printed then, the output was simply not wanted any more.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from cpinspect.cli.options import EXIT_BROKEN_PIPE, EXIT_INTERNAL
from cpinspect.core.errors import CpInspectError, InputError

try:  # typer >= 0.22 carries its own copy of click; older typer uses click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as click_errors  # type: ignore[no-redef]

F = TypeVar("F", bound=Callable[..., Any])


class PipeQuietConsole(Console):
    """A console whose closed stdout ends the command quietly with exit 141 (rich's own exits 1)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        quiet_broken_pipe()


def make_console(no_color: bool, stderr: bool = False) -> Console:
    """Stdout for views; stderr (soft-wrapped: one paragraph, one line) for errors."""
    plain = no_color or bool(os.environ.get("NO_COLOR"))
    return PipeQuietConsole(color_system=None if plain else "auto", highlight=False, stderr=stderr, soft_wrap=stderr)


def guarded(command: F) -> F:
    """Turn cpinspect errors into one-paragraph messages and exit codes, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug", False)
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except CpInspectError as exc:
            if debug:
                raise
            make_console(kwargs.get("no_color", False), stderr=True).print(
                f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        except BrokenPipeError:
            quiet_broken_pipe()
        except Exception as exc:  # noqa: BLE001 - a bug of ours: say so in one paragraph
            if debug:
                raise
            make_console(kwargs.get("no_color", False), stderr=True).print(
                f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}. This is a bug in "
                "cpinspect; rerun with --debug for the traceback and report it.", markup=True, highlight=False)
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper  # type: ignore[return-value]


def quiet_broken_pipe() -> None:
    """Stdout's reader went away (``| head``): exit 141 quietly, as a CLI killed by SIGPIPE does.

    Stdout is pointed at /dev/null first so that the interpreter's final flush of the buffered
    rest cannot raise a second BrokenPipeError at exit.
    """
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    raise SystemExit(EXIT_BROKEN_PIPE)


def usage_error_paragraph(exc: click_errors.UsageError) -> str:
    """A click usage error as one plain paragraph: what, where (the option or command), fix (its --help)."""
    what = exc.format_message().rstrip(".")
    ctx = exc.ctx
    command = ctx.command_path if ctx is not None else "cpinspect"
    where = command
    param = getattr(exc, "param", None)
    if param is not None:
        names = getattr(param, "opts", None) or [param.human_readable_name]
        where = f"{command} {names[0]}"
    return f"error: {what}. Where: {where}. Fix: see `{command} --help` for the options and their ranges."


def import_torch() -> None:
    """Import torch for a command, with single-threaded ops unless ``OMP_NUM_THREADS`` is set.

    A simulation runs one Python thread per rank, and an intra-op pool under each would
    oversubscribe the cores (cp x pool size); on a busy machine such a pool also waits for
    descheduled workers. Measured in bench/README.md: simulate on 1M tokens, cp 16, took 8.3 s
    with torch's default pool on a loaded 2-core machine and 0.37 s with one thread.
    """
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def parse_keys(pairs: list[str] | None) -> dict[str, str]:
    keys: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, key = pair.partition("=")
        if not sep or not name or not key:
            raise InputError(f"--key {pair!r} is not of the form field=name", where="--key",
                             fix="write e.g. --key input_ids=tokens_local")
        keys[name.strip()] = key.strip()
    return keys


def load_cli_batch(paths: list[Path] | None, keys: list[str] | None, *, align: int = 1,
                   max_bytes: int | None = None, notes: bool = True) -> tuple[Any, str]:
    """The batch and a human name of where it came from (the demo when no path is given).

    ``align`` is what a padded ``[B, T]`` batch's segments are padded to when it is packed (``2*cp``);
    what loading did or noticed (``batch.notes``) goes to stderr, one line each, unless ``notes`` is off.
    """
    import_torch()
    from cpinspect.core.loading import load_batch
    from cpinspect.core.synth import demo_batch

    mapping = parse_keys(keys)
    if not paths:
        return demo_batch(), "built-in demo batch (no file given; see examples/qwen3vl_packed.pt)"
    source = paths[0] if len(paths) == 1 else list(paths)
    loaded = load_batch(source, keys=mapping, align=align, max_bytes=max_bytes)
    for note in loaded.notes if notes else []:
        sys.stderr.write(f"{'warning' if note.is_problem else 'note'}: {note.code}: {note.message}\n")
    return loaded, ", ".join(map(str, paths))


@contextlib.contextmanager
def progress_steps(enabled: bool) -> Iterator[Callable[[str], None]]:
    """A transient spinner on stderr for work that takes more than a moment (TTY only)."""
    if not enabled or not sys.stderr.isatty():
        yield lambda description: None
        return
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("starting", total=None)

        def step(description: str) -> None:
            progress.update(task, description=description, advance=1)

        yield step


JSON_SLICE = 1 << 18
JSON_BATCH = 4096


def _flat(record: dict[str, Any]) -> bool:
    """No tensor, dict or list inside: ``json.dumps`` writes it in one call."""
    return not any(isinstance(item, (dict, list)) or hasattr(item, "dim") for item in record.values())


def write_json(value: Any, stream: TextIO) -> None:
    """Write ``json.dumps(value)`` to ``stream`` piece by piece; 1-D integer tensors become lists.

    A million-token document holds millions of numbers. Converting a tensor a slice at a time
    keeps memory flat, where ``json.dumps`` would hold every Python int, every chunk and the
    whole string at once. Dicts, and lists whose first element is a dict or tensor, are walked;
    any other value goes through ``json.dumps`` as is.
    """
    import torch

    if isinstance(value, dict) and _flat(value):
        stream.write(json.dumps(value))  # a flat record (e.g. one chunk): one call, not one per key
    elif isinstance(value, dict):
        stream.write("{")
        for index, (key, item) in enumerate(value.items()):
            stream.write((", " if index else "") + json.dumps(key) + ": ")
            write_json(item, stream)
        stream.write("}")
    elif isinstance(value, list) and value and isinstance(value[0], (dict, torch.Tensor)):
        stream.write("[")
        for start in range(0, len(value), JSON_BATCH):
            batch = value[start:start + JSON_BATCH]
            if all(isinstance(item, dict) and _flat(item) for item in batch):  # e.g. a long chunk list
                stream.write((", " if start else "") + json.dumps(batch)[1:-1])
                continue
            for index, item in enumerate(batch):
                stream.write(", " if start or index else "")
                write_json(item, stream)
        stream.write("]")
    elif isinstance(value, torch.Tensor) and value.dim() == 1 and not (
            value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        stream.write("[")
        for start in range(0, value.numel(), JSON_SLICE):
            numbers = value[start:start + JSON_SLICE].tolist()
            stream.write((", " if start else "") + ", ".join(map(str, numbers)))
        stream.write("]")
    elif isinstance(value, torch.Tensor):
        stream.write(json.dumps(value.tolist()))
    else:
        stream.write(json.dumps(value))
