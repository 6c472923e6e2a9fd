"""``cpinspect analyze DIR``: diagnose what a real job captured, step by step and CP group by group.

Torch is imported inside the command only (``--help`` imports every command module).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.rule import Rule
from rich.text import Text

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

DirArg = Annotated[Path, typer.Argument(help="The directory given to cpinspect.jobs.capture.record.", show_default=False)]
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
        render_analysis(report, make_console(no_color), full=full)
    raise typer.Exit(report.exit_code)


def render_analysis(report: Any, console: Console, *, full: bool = False) -> None:
    """Per step and CP group: completeness, the diagnosis, the captured-row check; then gaps and a verdict."""
    from cpinspect.diagnose.api import render_report

    steps = sorted({s.step for s in report.steps})
    groups = sorted({s.group_ranks for s in report.steps})
    console.print(Text.assemble(("cpinspect analyze ", "bold"), f"{report.directory}: "
                                f"{sum(len(s.present) for s in report.steps)} file(s), {len(steps)} step(s), "
                                f"{len(groups)} CP group(s)"))
    for analysis in report.steps:
        console.print(Rule(f"step {analysis.step} · global ranks {list(analysis.group_ranks)} · cp {analysis.cp}",
                           style="dim"))
        if analysis.report is None:
            console.print(Text(f"✗ incomplete: no file from CP rank(s) {', '.join(map(str, analysis.missing))}; "
                               "not analyzed", style="yellow"))
            continue
        if analysis.exit_code == 0 and not full:
            console.print(Text(f"✓ consistent: the diagnosis found no cause and the rows captured on all "
                               f"{analysis.cp} rank(s) equal the oracle's", style="green"))
            continue
        render_report(analysis.report, console)
        for finding in analysis.captured:
            console.print(Text.assemble(("✗ ", "bold red"), (finding.code, "bold"), f"  {finding.message}"))
    for gap in report.gaps:
        console.print(Text.assemble(("! ", "bold yellow"), (gap.code, "bold"), f"  {gap.message}"))
    bad = [s for s in report.steps if s.exit_code]
    if report.ok:
        console.print(Text(f"✓ OK: every captured step of every CP group is consistent ({len(report.steps)} analyzed)",
                           style="bold green"))
    else:
        console.print(Text(f"✗ {len(bad)} step(s) with problems"
                           + (f", {len(report.gaps)} gap(s) in the capture" if report.gaps else ""), style="bold red"))
