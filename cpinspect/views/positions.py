"""The view of ``simulate --positions``: per rank, positions at each held piece's ends and per vision item.

``python -m cpinspect.views.positions`` draws the demo batch's positions at cp=2.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from cpinspect.core.findings import Finding
from cpinspect.core.mrope import PAD_POSITION
from cpinspect.simulation.positions import PieceSpan, PositionsExtension, RankPositions
from cpinspect.views.simulate import finding_line, rank_style


def render(ext: PositionsExtension, console: Console, *, rank: int | None = None, full: bool = False) -> None:
    """Print the ``--positions`` section of a simulation to ``console``."""
    console.print(render_positions(ext, rank=rank, full=full))


def _triple(values: tuple[int, ...]) -> str:
    return str(values[0]) if len(set(values)) == 1 else "(" + ",".join(map(str, values)) + ")"


def _span(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}-{high}"


def render_findings(findings: list[Finding]) -> RenderableType:
    """✗/ℹ lines for findings, in the style of the simulate verdict."""
    return Group(*(finding_line(finding) for finding in findings))


def _limited(entries: list[Any], full: bool, limit: int = 8) -> tuple[list[Any], int]:
    return (entries, 0) if full or len(entries) <= limit else (entries[:limit], len(entries) - limit)


def render_positions(ext: PositionsExtension, *, rank: int | None = None, full: bool = False) -> RenderableType:
    """Per rank: positions at each held piece's ends and, per vision item, the t/h/w ranges held."""
    convention = "Megatron-Bridge / transformers<5" if ext.convention == "bridge" else "transformers>=5"
    if ext.rope == "1d":
        title = Text("1-D RoPE positions (--rope 1d: each token's offset in its physical segment; padding is not "
                     "judged)", style="bold")
    else:
        title = Text(f"mRoPE positions ({ext.model}, restarted per physical segment, {convention} convention, pads "
                     f"= {PAD_POSITION[ext.convention]})", style="bold")
    parts: list[RenderableType] = [title]
    for entry in ext.ranks if rank is None else [ext.ranks[rank]]:
        parts.append(_rank_view(entry, full))
    if ext.check.present and ext.ok:
        parts.append(Text("✓ the batch's position_ids match the expected per-segment positions on every rank",
                          style="bold green"))
    elif not ext.check.present:
        parts.append(Text("(the batch carries no position_ids to check)", style="dim"))
    parts.append(render_findings(ext.findings))
    return Group(*parts)


def _rank_view(entry: RankPositions, full: bool) -> RenderableType:
    head = Text(f" rank {entry.rank} ", style=rank_style(entry.rank))
    head.append(f"  {entry.positions.shape[1]:,} tokens")
    if entry.batch_status is not None:
        good = entry.batch_status.startswith("ok")
        head.append(f"  batch position_ids: {'✓' if good else '✗'} {entry.batch_status}",
                    style="green" if good else "bold red")
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    by_segment: dict[int, list[PieceSpan]] = {}
    for piece in entry.pieces:
        by_segment.setdefault(piece.segment, []).append(piece)
    segments, more = _limited(list(by_segment.items()), full)
    for segment, pieces in segments:
        grid.add_row(f"  seg {segment} positions", "   ".join(
            f"ch {p.chunk} [{p.local_first}-{p.local_last}] {_triple(p.first)} → {_triple(p.last)}" for p in pieces))
    if more:
        grid.add_row("  ...", f"{more} more segment(s); --full shows all")
    items, more = _limited(entry.items, full)
    for item in items:
        ranges = (f"positions {_span(item.low[0], item.high[0])}" if len(item.low) == 1 else
                  f"t {_span(item.low[0], item.high[0])}   h {_span(item.low[1], item.high[1])}   "
                  f"w {_span(item.low[2], item.high[2])}")
        grid.add_row(f"  {item.label} (seg {item.segment})", f"{item.held} of {item.length} tokens   {ranges}")
    if more:
        grid.add_row("  ...", f"{more} more vision item(s); --full shows all")
    if not entry.items:
        grid.add_row("  vision items", "none on this rank")
    return Group(head, grid)


if __name__ == "__main__":
    from cpinspect.core.synth import demo_batch
    from cpinspect.simulation.run import simulate

    demo = PositionsExtension(demo_batch())
    demo.run(simulate(demo.batch, 2))
    render(demo, Console())
