"""The ``cpinspect`` command line: parse, call the library, render, choose the exit code.

Torch is imported inside the commands only, so ``cpinspect --help`` and usage errors stay fast.
Exit codes: 0 consistent, 1 an inconsistency was found, 2 bad input or usage, 3 internal error.
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
from typing import Annotated, Any, Optional, TextIO, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from cpinspect.errors import CpInspectError, InputError

app = typer.Typer(
    name="cpinspect",
    help="Inspect and debug context-parallel (zigzag) sharding of packed multimodal batches.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

EXIT_OK, EXIT_INCONSISTENT, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
F = TypeVar("F", bound=Callable[..., Any])

BatchArg = Annotated[
    Optional[list[Path]],
    typer.Argument(help="Batch file (.pt/.safetensors), a directory of rank{r} files, or one file per rank "
                        "in rank order. Omit to use the built-in demo batch.", show_default=False),
]
CpOpt = Annotated[int, typer.Option("--cp", help="Context-parallel size (number of simulated ranks).", min=1)]
LayoutOpt = Annotated[str, typer.Option("--layout", help="zigzag (Megatron per-document THD), sequence-zigzag "
                                                          "(whole row as one sequence) or contiguous.")]
ModelOpt = Annotated[str, typer.Option("--model", help="Token preset: qwen2-vl, qwen2.5-vl or qwen3-vl.")]
ImageIdOpt = Annotated[Optional[int], typer.Option("--image-token-id", help="Override the image_pad token id.")]
VideoIdOpt = Annotated[Optional[int], typer.Option("--video-token-id", help="Override the video_pad token id.")]
KeyOpt = Annotated[Optional[list[str]], typer.Option("--key", help="Map a field to your key name: "
                                                                    "--key input_ids=tokens_local (repeatable).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object (complete lists).")]
NoColorOpt = Annotated[bool, typer.Option("--no-color", help="No colours (NO_COLOR is honoured too).")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the Python traceback of errors.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds each simulated collective may wait.")]


def make_console(no_color: bool, stderr: bool = False) -> Console:
    """Stdout for views; stderr (soft-wrapped: one paragraph, one line) for errors."""
    plain = no_color or bool(os.environ.get("NO_COLOR"))
    return Console(color_system=None if plain else "auto", highlight=False, stderr=stderr, soft_wrap=stderr)


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
        except Exception as exc:  # noqa: BLE001 - a bug of ours: say so in one paragraph
            if debug:
                raise
            make_console(kwargs.get("no_color", False), stderr=True).print(
                f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}. This is a bug in "
                "cpinspect; rerun with --debug for the traceback and report it.", markup=True, highlight=False)
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper  # type: ignore[return-value]


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


def load_cli_batch(paths: list[Path] | None, keys: list[str] | None) -> tuple[Any, str]:
    """The batch and a human name of where it came from (the demo when no path is given)."""
    import_torch()
    from cpinspect.batch import load_batch
    from cpinspect.synth import demo_batch

    mapping = parse_keys(keys)
    if not paths:
        return demo_batch(), "built-in demo batch (no file given; see examples/qwen3vl_packed.pt)"
    if len(paths) == 1:
        return load_batch(paths[0], keys=mapping), str(paths[0])
    return load_batch(list(paths), keys=mapping), ", ".join(map(str, paths))


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


@app.command()
@guarded
def simulate(
    batch: BatchArg = None,
    cp: CpOpt = 2,
    layout: LayoutOpt = "zigzag",
    model: ModelOpt = "qwen3-vl",
    image_token_id: ImageIdOpt = None,
    video_token_id: VideoIdOpt = None,
    key: KeyOpt = None,
    pad: Annotated[bool, typer.Option("--pad", help="Pad segments to a multiple of 2*cp like frameworks.")] = False,
    rank: Annotated[Optional[int], typer.Option("--rank", help="Show only this rank.", min=0)] = None,
    full: Annotated[bool, typer.Option("--full", help="Print long lists and tables in full.")] = False,
    timeout: TimeoutOpt = 10.0,
    backend: Annotated[str, typer.Option("--backend", help="threads (simulated group in this process) or gloo "
                                                            "(one real process per rank).")] = "threads",
    explain: Annotated[bool, typer.Option("--explain", help="Narrate one rank's selection step by step "
                                                            "(--rank picks it; default 0).")] = False,
    positions: Annotated[bool, typer.Option("--positions", help="Add per-rank 3-D mRoPE positions and check "
                                                                "the batch's position_ids.")] = False,
    vision_dp: Annotated[bool, typer.Option("--vision-dp", help="Simulate the vision-DP split and its "
                                                                "embedding all-gather.")] = False,
    json_out: JsonOpt = False,
    no_color: NoColorOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Shard a packed batch over CP ranks, select each rank's vision rows, check them against an oracle."""
    from cpinspect.tokens import token_config

    tokens = token_config(model, image_token_id=image_token_id, video_token_id=video_token_id)
    with progress_steps(not json_out) as step:
        step("loading batch")
        loaded, source = load_cli_batch(batch, key)
        step(f"simulating {cp} ranks")
        from cpinspect.simulation import simulate as run_simulation

        result = run_simulation(loaded, cp, layout, tokens=tokens, pad=pad, timeout=timeout, backend=backend)
    if rank is not None and rank >= cp:
        raise InputError(f"--rank {rank} is out of range for cp={cp}", where="--rank", fix=f"pick 0..{cp - 1}")
    extras = [ext for ext in (_positions_extension(positions, loaded), _vision_dp_extension(vision_dp, loaded))
              if ext is not None]
    ok = result.ok
    for ext in extras:
        ext.run(result)
        ok = ok and ext.ok
    if json_out:
        document = result.document()
        for ext in extras:
            ext.add_json(document)
        document["ok"] = ok
        if rank is not None:
            document["ranks"] = [document["ranks"][rank]]
        write_json(document, sys.stdout)
        sys.stdout.write("\n")
    else:
        from cpinspect.render import render_result

        console = make_console(no_color)
        render_result(result, console, source=source, rank=rank, full=full)
        for ext in extras:
            ext.render(console, rank=rank, full=full)
        if explain:
            from cpinspect.explain import render_explain

            render_explain(result, console, rank=rank or 0)
    raise typer.Exit(EXIT_OK if ok else EXIT_INCONSISTENT)


JSON_SLICE = 1 << 18


def write_json(value: Any, stream: TextIO) -> None:
    """Write ``json.dumps(value)`` to ``stream`` piece by piece; 1-D integer tensors become lists.

    A million-token document holds millions of numbers. Converting a tensor a slice at a time
    keeps memory flat, where ``json.dumps`` would hold every Python int, every chunk and the
    whole string at once. Dicts, and lists whose first element is a dict or tensor, are walked;
    any other value goes through ``json.dumps`` as is.
    """
    import torch

    if isinstance(value, dict):
        stream.write("{")
        for index, (key, item) in enumerate(value.items()):
            stream.write((", " if index else "") + json.dumps(key) + ": ")
            write_json(item, stream)
        stream.write("}")
    elif isinstance(value, list) and value and isinstance(value[0], (dict, torch.Tensor)):
        stream.write("[")
        for index, item in enumerate(value):
            stream.write(", " if index else "")
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


def _positions_extension(enabled: bool, batch: Any) -> Any:
    """The --positions view (cpinspect.mrope), or None when not asked for."""
    if not enabled:
        return None
    from cpinspect.positions_view import PositionsExtension

    return PositionsExtension(batch)


def _vision_dp_extension(enabled: bool, batch: Any) -> Any:
    """The --vision-dp view (cpinspect.vision_dp), or None when not asked for."""
    if not enabled:
        return None
    from cpinspect.vision_dp import VisionDPExtension

    return VisionDPExtension(batch)


@app.command()
@guarded
def info(
    batch: Annotated[list[Path], typer.Argument(help="Batch file, rank directory, or per-rank files.")],
    cp: Annotated[Optional[int], typer.Option("--cp", help="Say whether the batch is full or pre-sharded for this cp.",
                                              min=1)] = None,
    model: ModelOpt = "qwen3-vl",
    image_token_id: ImageIdOpt = None,
    video_token_id: VideoIdOpt = None,
    key: KeyOpt = None,
    json_out: JsonOpt = False,
    no_color: NoColorOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Print what a batch file holds: keys, shapes, dtypes, segments, vision tokens, full or pre-sharded."""
    from cpinspect.tokens import token_config

    tokens = token_config(model, image_token_id=image_token_id, video_token_id=video_token_id)
    loaded, source = load_cli_batch(batch, key)
    from cpinspect.summary import describe_batch, render_info

    summary = describe_batch(loaded, tokens, cp=cp)
    if json_out:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        render_info(summary, make_console(no_color), source=source)


def _register_commands() -> None:
    """Add every ``cpinspect.commands.<name>`` module's commands (each defines ``register(app)``).

    Command modules must not import torch at import time: ``--help`` imports them all.
    """
    import importlib
    import pkgutil

    import cpinspect.commands as commands

    for module in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"cpinspect.commands.{module.name}").register(app)


_register_commands()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
