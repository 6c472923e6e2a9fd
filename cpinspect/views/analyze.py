"""The rich view of ``cpinspect analyze``: per step and CP group, the diagnosis and the captured rows."""

from __future__ import annotations

from rich.console import Console
from rich.rule import Rule
from rich.text import Text

from cpinspect.jobs.analyze import AnalyzeReport
from cpinspect.views.diagnose import render_report


def render_analysis(report: AnalyzeReport, console: Console, *, full: bool = False) -> None:
    """Per step and CP group: completeness, the diagnosis, the captured-row check; then gaps and a verdict."""
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
