"""The rich view of a :class:`~cpinspect.diagnose.report.DiagnoseReport` (``cpinspect diagnose``).

``python -m cpinspect.views.diagnose`` diagnoses the built-in demo batch and draws it.
"""

from __future__ import annotations

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from cpinspect.core.findings import Finding
from cpinspect.diagnose.report import DiagnoseReport, clip

STATUS_STYLE = {"confirmed": ("✗", "bold red"), "possible": ("?", "bold yellow"), "info": ("ℹ", "cyan")}


def render_report(report: DiagnoseReport, console: Console) -> None:
    """Print the diagnosis: context, causes (confirmed, then possible), what is consistent, verdict."""
    console.print(_header(report))
    for finding in report.findings:
        console.print(_finding_text(finding))
    console.print(_verdict(report))


def _header(report: DiagnoseReport) -> Panel:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    summary = report.summary
    grid.add_row("batch", report.source)
    grid.add_row("tokens", f"{summary.get('tokens', 0):,} in {summary.get('segments', 0):,} segment(s)")
    vision = summary.get("vision_tokens")
    rows, label = summary.get("embed_rows"), summary.get("embed_rows_from")
    grid.add_row("vision", f"{'?' if vision is None else f'{vision:,}'} placeholder tokens; "
                           f"{'?' if rows is None else f'{rows:,}'} embedding rows ({label})")
    for label, line in _modality_lines(summary.get("modalities")):
        grid.add_row(label, line)
    cp_text = f"{report.cp} ({report.layout} layout)"
    if summary.get("requested_cp") not in (None, report.cp):
        cp_text += f"; --cp {summary['requested_cp']} was given"
    grid.add_row("cp", cp_text)
    grid.add_row("input", report.form)
    observed = report.observed
    unread = next((f for f in report.findings if f.code == "ERROR_NOT_RECOGNISED"), None)
    if observed.get("line"):
        grid.add_row("error", clip(observed["line"], 100) + (f"  [rank {observed['rank']}]" if "rank" in observed
                                                                else ""))
    elif unread is not None:
        grid.add_row("error", "given, but not recognised (see ERROR_NOT_RECOGNISED): auditing the batch")
    elif "embeds" in observed:
        grid.add_row("error", f"none given; the encoder produced {observed['embeds']} rows (--embeds)")
    else:
        grid.add_row("error", "none given: auditing the batch (pass --error or --error-file to explain a failure)")
    return Panel(grid, title="cpinspect diagnose", title_align="left", expand=False)


def _modality_lines(modalities: dict | None) -> list[tuple[str, str]]:
    """``audio: 412 tokens on rank 0, 380 on rank 1; 792 rows (...)``: one line per modality (Omni presets)."""
    if not modalities:
        return []
    lines = []
    for i, (name, rows) in enumerate(modalities["rows"].items()):
        held = [ranked.get(name, 0) for ranked in modalities["ranks"]]
        ranks = ", ".join(f"{count:,}{' tokens' if r == 0 else ''} on rank {r}" for r, count in enumerate(held[:8]))
        source = f" ({modalities['audio_rows_from']})" if name == "audio" else ""
        lines.append(("by modality" if i == 0 else "", f"{name}: {ranks}{', ...' if len(held) > 8 else ''}; "
                                                       f"{rows:,} rows{source}"))
    return lines


def _finding_text(finding: Finding) -> RenderableType:
    if finding.code == "CONSISTENT":
        return Text(f"✓ {finding.message}", style="green")
    mark, style = STATUS_STYLE[finding.status or "info"]
    where = ", ".join(f"{k} {v}" for k, v in (("rank", finding.rank), ("segment", finding.segment),
                                              ("chunk", finding.chunk)) if v is not None)
    line = Text(f"{mark} {finding.code}", style=style)
    if finding.status != "info":
        line.append(f" {finding.status}", style=style)
    line.append(f" ({where})" if where else "")
    line.append(f": {finding.message}")
    if finding.hint:
        line.append(f"\n  fix: {finding.hint}", style="yellow")
    return line


def _verdict(report: DiagnoseReport) -> RenderableType:
    causes = report.causes
    if causes:
        codes = ", ".join(dict.fromkeys(f.code for f in causes))
        return Group(Text(f"✗ cause confirmed: {codes}", style="bold red"))
    present = {f.code for f in report.findings}
    if "ERROR_RECOGNISED" in present:
        return Text("✗ failure recognised; its cause needs more input than this batch (see ERROR_RECOGNISED above)",
                    style="bold red")
    possible = [f.code for f in report.findings if f.status == "possible"]
    if possible:
        return Text(f"? nothing confirmed; possible: {', '.join(dict.fromkeys(possible))}", style="bold yellow")
    if "UNEXPLAINED" in present:
        return Text("✗ failure recognised, but no simulated cause reproduces its numbers on this batch (see "
                    "UNEXPLAINED above): is it the failing step's batch, with every rank file, at the run's cp?",
                    style="bold red")
    if report.form in ("one rank", "double sharded"):
        return Text("✓ nothing wrong found in what these rows show (the checks needing the full row were skipped)",
                    style="bold green")
    return Text("✓ nothing wrong found in the batch", style="bold green")


if __name__ == "__main__":
    from cpinspect.core import synth
    from cpinspect.diagnose import diagnose_batch

    render_report(diagnose_batch(synth.demo_batch_dict(), 2), Console())
