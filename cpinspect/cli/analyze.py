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

DirArg = Annotated[Path, typer.Argument(help="The directory given to cpinspect.jobs.capture.record.",
                                        show_default=False)]
StepOpt = Annotated[Optional[list[int]], typer.Option("--step", help="Analyze only this step (repeatable).",
                                                      show_default=False)]
FullOpt = Annotated[bool, typer.Option("--full", help="Print the whole diagnosis of consistent steps too.")]


@guarded
def analyze(
    directory: DirArg,
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
    """Reassemble each captured step from its per-rank files, rerun the oracle and the diagnosis, report."""
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
