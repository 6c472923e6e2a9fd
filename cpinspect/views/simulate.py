"""Rich views of a :class:`~cpinspect.simulation.run.Result`. Rendering never computes findings.

``python -m cpinspect.views.simulate`` shows the view on the built-in demo batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from cpinspect.core.findings import Finding
from cpinspect.core.ranges import format_ranges
from cpinspect.simulation.run import RankResult, Result

# 16 colours that stay apart on dark and light terminals; rank r uses RANK_COLORS[r % 16].
RANK_COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#e7ba52", "#637939", "#ad494a", "#7b4173", "#f7b6d2",
)
RANK_LETTERS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MAX_TABLE_ROWS = 24


def contrast_text(color: str) -> str:
    """Black or white, whichever contrasts more with the ``#rrggbb`` background (WCAG luminance)."""
    channels = [int(color[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    return "black" if (luminance + 0.05) / 0.05 > 1.05 / (luminance + 0.05) else "white"


def rank_style(rank: int) -> str:
    color = RANK_COLORS[rank % len(RANK_COLORS)]
    return f"bold {contrast_text(color)} on {color}"


def rank_label(rank: int) -> str:
    return RANK_LETTERS[rank] if rank < len(RANK_LETTERS) else str(rank)


STRIP_LEGEND = "█ all vision, ▓ ▒ ░ some (most to least), · none"


def density_glyph(vision: int, size: int) -> str:
    """One strip cell for ``vision`` vision tokens among ``size``: shades keep big rows readable."""
    if vision == 0:
        return "·"
    if vision == size:
        return "█"
    return "░" if 3 * vision <= size else "▒" if 3 * vision <= 2 * size else "▓"


def mask_strip(mask: torch.Tensor, width: int) -> Text:
    """The local vision mask squeezed into ``width`` cells (see :data:`STRIP_LEGEND`)."""
    n = mask.numel()
    if n == 0:
        return Text("(empty)", style="dim")
    width = max(1, min(width, n))
    edges = torch.div(torch.arange(width + 1) * n, width, rounding_mode="floor")
    csum = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(mask.to(torch.long), 0)])
    vision = csum[edges[1:]] - csum[edges[:-1]]
    size = edges[1:] - edges[:-1]
    text = Text()
    for v, s in zip(vision.tolist(), size.tolist()):
        text.append(density_glyph(v, s), style="dim" if v == 0 else "magenta")
    return text


def header(result: Result, source: str) -> Panel:
    lines = Table.grid(padding=(0, 2))
    lines.add_column(style="bold")
    lines.add_column()
    form = "pre-sharded (local rows per rank, global cu_seqlens)" if result.input_form == "presharded" else "full row"
    lines.add_row("batch", source)
    lines.add_row("tokens", f"{result.layout.total_tokens:,} in {result.layout.num_segments:,} segment(s)")
    lines.add_row("vision", f"{result.vision_tokens:,} tokens ({result.images} image(s), {result.videos} video(s)); "
                  f"{result.vision_embed_count:,} embedding rows")
    lines.add_row("cp", f"{result.cp} ({result.layout.kind} layout, {result.layout.local_tokens:,} tokens per rank)")
    lines.add_row("input", form)
    for note in result.notes:
        lines.add_row("note", note)
    return Panel(lines, title="cpinspect simulate", title_align="left", expand=False)


def rank_block(result: Result, r: RankResult, full: bool, width: int) -> Group:
    """One rank: its tokens, where its vision tokens sit, its counts and rows, and the verdict."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    limit = None if full else 8
    verdict = Text("✓ matches the oracle", style="bold green") if r.ok else Text("✗ differs from the oracle",
                                                                               style="bold red")
    title = Text(f" rank {r.rank} ", style=rank_style(r.rank))
    title.append(f"  {r.global_indices.numel():,} tokens, {int(r.local_mask.sum()):,} vision  ")
    title.append_text(verdict)
    grid.add_row("  vision at (local)", format_ranges(r.vision_positions, limit=limit))
    if result.tokens.audio_token_id is not None:
        held = result.modalities()[r.rank]
        grid.add_row("  by modality", ", ".join(f"{name}: {count:,} tokens" for name, count in held.items())
                     + f"; {len(r.selected_rows):,} rows selected")
    grid.add_row("  mask", mask_strip(r.local_mask, max(8, width - 24)))
    grid.add_row(_counts_label(result), _counts_text(r.selection.local_counts if r.selection else None, result, full))
    grid.add_row("  selected rows", format_ranges(r.selected_rows, limit=limit))
    if not r.ok:
        grid.add_row("  oracle rows", format_ranges(r.expected_rows, limit=limit))
    return Group(title, grid)


def _counts_label(result: Result) -> str:
    return "  local counts [S,2]" if result.layout.paired else "  local count"


def _counts_text(counts: torch.Tensor | None, result: Result, full: bool) -> str:
    if counts is None:
        return "-"
    pairs = counts.view(-1, 2).tolist() if result.layout.paired else counts.tolist()
    if not full and len(pairs) > 8:
        shown = ", ".join(str(p) for p in pairs[:6])
        return f"[{shown}, ... ({len(pairs) - 6} more segments)]"
    return str(pairs)


def counts_table(result: Result, full: bool, width: int) -> RenderableType:
    """Gathered ``[S, 2cp]`` vision counts, each cell coloured by the rank that holds that chunk."""
    counts = result.gathered_counts
    columns = counts.shape[1]
    owner = result.layout.owner_of_piece().view(-1, columns)
    per_segment = result.layout.kind == "zigzag"  # one row per segment; otherwise one row of the whole row's pieces
    title = ("gathered vision counts per segment x chunk (natural order; colour = owning rank)" if per_segment
             else "gathered vision counts per chunk of the row (natural order; colour = owning rank)"
             if result.layout.paired else "gathered vision counts per piece (colour = owning rank)")
    row_name = "chunks" if result.layout.paired else "pieces"
    table = Table()
    table.add_column("seg" if per_segment else "", justify="right")
    shown_cols = _shown(columns, max(2, (width - 12) // 6), full)
    for c in shown_cols:
        table.add_column("…" if c is None else str(c), justify="right")
    table.add_column("total", justify="right")
    for s in _shown(counts.shape[0], MAX_TABLE_ROWS, full):
        if s is None:
            table.add_row("…", *["…"] * len(shown_cols), "…")
            continue
        cells = [
            Text("…") if c is None else Text(f"{int(counts[s, c])}", style=rank_style(int(owner[s, c])))
            for c in shown_cols
        ]
        table.add_row(str(s) if per_segment else row_name, *cells, str(int(counts[s].sum())))
    return Group(Text(title, style="bold"), table)


def _shown(n: int, limit: int, full: bool) -> list[int | None]:
    if full or n <= limit:
        return list(range(n))
    head = limit - limit // 3
    return [*range(head), None, *range(n - (limit - head - 1), n)]


def verdict(result: Result) -> RenderableType:
    problems = [f for f in result.findings if f.is_problem]
    infos = [f for f in result.findings if not f.is_problem]
    parts: list[RenderableType] = []
    for finding in infos:
        parts.append(Text(f"ℹ {finding.code}: {finding.message}", style="cyan"))
    if not problems:
        covered = (f"together they cover rows 0..{result.vision_tokens - 1} once each" if result.vision_tokens
                   else "the batch has no vision tokens, so no rank selects any row")
        parts.append(Text(
            f"✓ OK: all {result.cp} rank(s) select exactly the oracle's rows; {covered}, and every rank's row count "
            "equals its vision tokens.",
            style="bold green",
        ))
    parts.extend(finding_line(finding) for finding in problems)
    return Group(*parts)


def finding_line(finding: Finding) -> Text:
    """``✗`` (problem) or ``ℹ`` (info): the code, where it applies, the message and the fix."""
    where = ", ".join(f"{k} {v}" for k, v in (("rank", finding.rank), ("segment", finding.segment),
                                                ("chunk", finding.chunk)) if v is not None)
    mark, style = ("✗", "bold red") if finding.is_problem else ("ℹ", "cyan")
    line = Text(f"{mark} {finding.code}", style=style)
    line.append(f" ({where})" if where else "")
    line.append(f": {finding.message}")
    if finding.hint:
        line.append(f"\n  fix: {finding.hint}", style="yellow")
    return line


def render_result(result: Result, console: Console, *, source: str, rank: int | None = None,
                  full: bool = False) -> None:
    """Print the whole simulate view (or one rank's part of it) to ``console``."""
    for renderable in _views(result, console, source=source, rank=rank, full=full):
        console.print(renderable)


def _views(result: Result, console: Console, *, source: str, rank: int | None, full: bool) -> Iterator[RenderableType]:
    ranks = result.ranks if rank is None else [result.ranks[rank]]
    width = console.width
    yield header(result, source)
    if result.spmd_error is None:
        yield Text(f"mask: {STRIP_LEGEND}", style="dim")
        for r in ranks:
            yield rank_block(result, r, full, width)
        yield counts_table(result, full, width)
    yield verdict(result)


if __name__ == "__main__":  # pragma: no cover - a demo for eyeballing the view
    from cpinspect.core.synth import demo_batch
    from cpinspect.simulation.run import simulate

    render_result(simulate(demo_batch(), 2), Console(), source="built-in demo batch")


def render_schemes(runs: list[Any], cp: int, console: Console) -> None:
    """The selection schemes side by side: rows vs the oracle, collectives, bytes per rank, host syncs."""
    table = Table(title="selection schemes (each rank's program through the simulated group)")
    for name in ("scheme", "rows", "collectives per rank", "bytes sent / received", "syncs"):
        table.add_column(name)
    for run in runs:
        rows = (f"✓ oracle's, all {cp}" if run.all_ok else
                f"✗ {sum(not ok for ok in run.ok)} rank(s) differ" + (f" ({run.failure})" if run.failure else ""))
        calls = sorted({", ".join(_short_call(c) for c in ranks) or "none" for ranks in run.calls})
        moved = sorted({(run.bytes_sent(r), run.bytes_received(r, cp)) for r in range(cp)})
        table.add_row(f"{run.scheme}\n({USED_BY_TEXT.get(run.scheme, '')})", rows, "; ".join(calls),
                      "; ".join(f"{sent:,} B / {got:,} B" for sent, got in moved), str(run.host_syncs))
    console.print(table)


USED_BY_TEXT = {"count": "Megatron-Bridge", "token-ids": "slime #2251", "full-row": "HF / verl"}


def _short_call(call: Any) -> str:
    shapes = ", ".join(f"{list(s)} {d}" for s, d in zip(call.shapes, call.dtypes))
    return f"{call.op}({shapes})"
