"""The rich view of a VALID_ONLY_ROW finding: what each rank receives from a valid-tokens-only row."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from cpinspect.core.findings import Finding
from cpinspect.core.valid_only import ChunkSlice


def render_valid_only(finding: Finding, chunks: list[ChunkSlice], console: Console, *, source: str,
                      full: bool = False) -> None:
    console.print(f"[bold red]✗ {finding.code}[/] in {source}", highlight=False)
    console.print(finding.message, highlight=False, markup=False)
    table = Table(title="what each rank slices out of the valid-only row (padded bounds)", title_justify="left")
    for column in ("rank", "segment", "chunk", "bounds", "wanted", "got"):
        table.add_column(column, justify="right" if column != "bounds" else "left")
    shown = chunks if full or len(chunks) <= 24 else [c for c in chunks if c.got < c.wanted][:24]
    for c in shown:
        style = "red" if c.got == 0 else "yellow" if c.got < c.wanted else ""
        table.add_row(str(c.rank), str(c.segment), str(c.chunk), f"[{c.start}, {c.end})", str(c.wanted),
                      str(c.got), style=style)
    console.print(table)
    if len(shown) < len(chunks):
        console.print(f"(showing the short chunks of {len(chunks)}; --full shows all)")
    console.print(f"fix: {finding.hint}", highlight=False, markup=False)
