"""``cpinspect analyze DIR``: diagnose what a real job captured, step by step and CP group by group.

Torch is imported inside the command only (``--help`` imports every command module).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cpinspect.cli.common import guarded, import_torch, make_console, progress_steps
from cpinspect.cli.options import (
    DebugOpt,
    ImageIdOpt,
    JsonOpt,
    LayoutOpt,
    ModelOpt,
    NoColorOpt,
    TimeoutOpt,
    VideoIdOpt,
)
from cpinspect.core.errors import InputError

DirArg = Annotated[Optional[Path], typer.Argument(help="The directory given to cpinspect.jobs.capture.record.",
                                                  show_default=False)]
FlightOpt = Annotated[Optional[Path], typer.Option(
    "--flight-recorder", help="Read torch flight-recorder dumps (one file per rank, <prefix><rank>) from this "
    "directory instead: the first collective where the ranks diverge, and where each rank stood.",
    show_default=False)]
DumpBytesOpt = Annotated[Optional[int], typer.Option(
    "--max-bytes", help="With --flight-recorder: refuse a dump file larger than this (default: 256 MiB, less "
    "when memory is short).", min=1, show_default=False)]
StepOpt = Annotated[Optional[list[int]], typer.Option("--step", help="Analyze only this step (repeatable).",
                                                      show_default=False)]
FullOpt = Annotated[bool, typer.Option("--full", help="Print the whole diagnosis of consistent steps too.")]


@guarded
def analyze(
    directory: DirArg = None,
    flight_recorder: FlightOpt = None,
    max_bytes: DumpBytesOpt = None,
    step: StepOpt = None,
    layout: LayoutOpt = "zigzag",
    model: ModelOpt = "qwen3-vl",
    image_token_id: ImageIdOpt = None,
    video_token_id: VideoIdOpt = None,
    full: FullOpt = False,
    timeout: TimeoutOpt = 10.0,
    json_out: JsonOpt = False,
    no_color: NoColorOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Reassemble each captured step from its per-rank files, rerun the oracle and the diagnosis, report.

    With --flight-recorder DIR: where the ranks of torch flight-recorder dumps diverge, and where each stood.
    """
    if (directory is None) == (flight_recorder is None):
        raise InputError("give either a capture directory or --flight-recorder DIR (exactly one)",
                         fix="cpinspect analyze CAPTURE_DIR, or cpinspect analyze --flight-recorder DUMP_DIR")
    if flight_recorder is not None:
        analyze_dumps(flight_recorder, max_bytes=max_bytes, json_out=json_out, no_color=no_color)
    assert directory is not None
    from cpinspect.core.tokens import token_config

    tokens = token_config(model, image_token_id=image_token_id, video_token_id=video_token_id)
    with progress_steps(not json_out) as progress:
        progress("reading capture files")
        import_torch()
        from cpinspect.jobs.analyze import analyze as run_analysis

        report = run_analysis(directory, layout=layout, tokens=tokens, steps=step, timeout=timeout)
    if json_out:
        sys.stdout.write(json.dumps(report.to_dict()) + "\n")
    else:
        from cpinspect.views.analyze import render_analysis

        render_analysis(report, make_console(no_color), full=full)
    raise typer.Exit(report.exit_code)


def analyze_dumps(directory: Path, *, max_bytes: int | None, json_out: bool, no_color: bool) -> None:
    """``--flight-recorder``: read the dumps (plain data only), find the divergence, print, exit 0/1."""
    from cpinspect.jobs.flight_recorder import analyze_flight_recorder

    report = analyze_flight_recorder(directory, max_bytes=max_bytes)
    if json_out:
        sys.stdout.write(json.dumps(report.to_dict()) + "\n")
    else:
        from cpinspect.views.flight_recorder import render_flight_recorder

        render_flight_recorder(report, make_console(no_color))
    raise typer.Exit(report.exit_code)
