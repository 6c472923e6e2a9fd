"""The view of ``simulate --explain``: one rank's selection, narrated step by step with that rank's numbers.

Every number printed here comes from the :class:`~cpinspect.core.rank_selection.RankSelection` the simulated
rank actually produced (its mask, its counts, what the all-gather delivered, the rebuilt table,
the offsets, the rows); nothing is recomputed for the story. The last step runs the naive scatter
for real on a tiny stand-in tensor (:func:`cpinspect.simulation.explain.naive_scatter_message`) so
the error shown is PyTorch's own message. ``python -m cpinspect.views.explain`` draws the demo batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from rich.console import Console, Group, RenderableType
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from cpinspect.core.layout import Layout
from cpinspect.core.ranges import format_ranges
from cpinspect.simulation.explain import STAND_IN_HIDDEN, naive_scatter_message
from cpinspect.simulation.run import RankResult, Result
from cpinspect.views.layout import cell_style, token_span
from cpinspect.views.layout_vision import piece_name
from cpinspect.views.simulate import mask_strip

MAX_ROWS = 12


def _step(number: int, title: str, *body: RenderableType) -> Group:
    return Group(Text(f"{number}. {title}", style="bold"), *(Padding(b, (0, 0, 0, 3)) for b in body))


def _local_piece_starts(result: Result, rank: int) -> list[int]:
    lengths = result.layout.local_piece_len(rank)
    return (torch.cumsum(lengths, 0) - lengths).tolist()


def _counts_shape(result: Result) -> str:
    kind = result.layout.kind
    if kind == "zigzag":
        return f"[S, 2] = [{result.layout.num_segments}, 2]"
    if result.layout.paired:
        return "[1, 2] (one sequence)"
    return "[1] (one piece)" if kind == "contiguous" else f"[{result.layout.pieces_per_rank}] (pieces)"


def _as_rows(flat: torch.Tensor, result: Result) -> list[list[int]] | list[int]:
    """A rank's flat per-piece counts shown the way the model holds them ([S, 2] for zigzag)."""
    return flat.view(-1, 2).tolist() if result.layout.paired else flat.tolist()


def step_local_mask(result: Result, r: RankResult, width: int) -> Group:
    layout = result.layout
    pieces = layout.rank_pieces[r.rank].tolist()
    names = ", ".join(piece_name(layout, p) for p in pieces[:MAX_ROWS]) + (" …" if len(pieces) > MAX_ROWS else "")
    held = int(r.local_mask.sum())
    body = Text(f"Rank {r.rank} holds {r.global_indices.numel():,} of {layout.total_tokens:,} tokens "
                f"(global {format_ranges(r.global_indices)}): chunks {names}.\n"
                f"{_vision_at(held, r)}\n")
    body.append_text(mask_strip(r.local_mask, max(8, width - 8)))
    return _step(1, "Local vision mask (the image_pad/video_pad positions of the local row)", body)


def _vision_at(held: int, r: RankResult) -> str:
    if not held:
        return "None of them is a vision token."
    return f"{held:,} of them are vision tokens, at local positions {format_ranges(r.vision_positions)}."


def step_local_counts(result: Result, r: RankResult) -> Group:
    assert r.selection is not None
    layout = result.layout
    pieces = layout.rank_pieces[r.rank].tolist()
    starts = _local_piece_starts(result, r.rank)
    lengths = layout.local_piece_len(r.rank).tolist()
    counts = r.selection.local_counts.tolist()
    lines = Text()
    for i, (piece, start, length, count) in enumerate(zip(pieces, starts, lengths, counts)):
        if i == MAX_ROWS:
            lines.append(f"… {len(pieces) - MAX_ROWS} more chunks\n")
            break
        global_start = int(layout.piece_start[piece])
        lines.append(f"{piece_name(layout, piece)}: local {token_span(start, start + length)} "
                     f"(global {token_span(global_start, global_start + length)}) → {count:,} vision\n")
    lines.append(f"local_counts {_counts_shape(result)}: {_short(_as_rows(r.selection.local_counts, result))}")
    order = ("its first chunk, then its mirror chunk, per segment" if layout.kind == "zigzag"
             else "in local order")
    return _step(2, f"Count vision tokens per chunk it holds ({order})", lines)


def step_all_gather(result: Result, r: RankResult) -> Group:
    assert r.selection is not None
    layout = result.layout
    lines = Text("Each rank knows only its own counts. One all_gather of a fixed-shape tensor gives every rank "
                 "everybody's; every rank must call it, even one without vision tokens, or the others hang.\n")
    chunk_of = layout.piece_chunk.tolist()
    for rank, (sent, pieces) in enumerate(zip(r.selection.gathered, layout.rank_pieces.tolist())):
        if layout.kind == "hybrid":  # chunk numbers differ per segment: name each piece
            held = [piece_name(layout, p) for p in pieces if chunk_of[p] >= 0]
            names = ", ".join(held[:MAX_ROWS]) + (" …" if len(held) > MAX_ROWS else "")
        else:
            names = ", ".join(map(str, sorted({chunk_of[p] for p in pieces if chunk_of[p] >= 0})))
        lines.append(f" {rank} ", style=cell_style(rank))
        lines.append(f" rank {rank} sent {_short(_as_rows(sent, result))}  (chunks {names})\n")
    lines.rstrip()
    return _step(3, f"All-gather the counts: {layout.cp} × {_counts_shape(result)}", lines)


def _table(result: Result, values: torch.Tensor, rank: int, title: str) -> Group:
    """``[S, columns]`` values, each cell coloured by the rank that holds that chunk; ``[x]`` = this rank's."""
    layout = result.layout
    columns = layout.chunks_per_segment
    values = values.view(-1, columns)
    owner = layout.owner_of_piece().view(-1, columns)
    per_segment = layout.kind == "zigzag"  # one row per segment; otherwise one row of the whole row's pieces
    table = Table()
    table.add_column("seg" if per_segment else "", justify="right")
    for c in range(columns):
        table.add_column(f"c{c}" if layout.paired else str(c), justify="right")
    segments = values.shape[0]
    shown = list(range(segments)) if segments <= MAX_ROWS else [*range(MAX_ROWS - 2), segments - 1]
    for s in shown:
        if s == segments - 1 and segments > MAX_ROWS:
            table.add_row("…", *["…"] * columns)
        cells = []
        for c in range(columns):
            number = f"{int(values[s, c]):,}"
            mine = int(owner[s, c]) == rank
            cells.append(Text(f"[{number}]" if mine else number, style=cell_style(int(owner[s, c]))))
        table.add_row(str(s) if per_segment else "chunks" if layout.paired else "pieces", *cells)
    return Group(Text(title, style="italic"), table)


def step_table(result: Result, r: RankResult) -> Group:
    assert r.selection is not None
    layout = result.layout
    rule = ("rank q's first column goes to chunk q, its second to chunk 2cp-1-q"
            if layout.paired else "rank q's count for its local piece i goes to the piece it holds there")
    total = int(r.selection.full_counts.sum())
    verdict = ("equals" if total == result.vision_embed_count else "DIFFERS FROM")
    note = Text(f"Σ = {total:,} vision tokens, which {verdict} the {result.vision_embed_count:,} rows the encoder "
                "returns (the model checks this on every rank alike). [x] = this rank's chunks.")
    shape = f"[{layout.num_segments if layout.kind == 'zigzag' else 1}, {layout.chunks_per_segment}]"
    return _step(4, f"Rebuild the {shape} table in natural chunk order",
                 _table(result, r.selection.full_counts, r.rank, f"vision tokens per {_cells(layout)} ({rule})"), note)


def _cells(layout: Layout) -> str:
    """What a cell of the natural-order table is: a segment's chunk, a chunk of the whole row, or a piece."""
    return "segment × chunk" if layout.kind == "zigzag" else "chunk of the row" if layout.paired else "piece"


def step_offsets(result: Result, r: RankResult) -> Group:
    assert r.selection is not None
    note = Text("Read the table segment by segment, chunk 0 first: the vision embeddings come out of the encoder in "
                "exactly this order, so a chunk's first row is the number of vision tokens before it.")
    return _step(5, "Offsets: exclusive cumulative sum of the table (first encoder row of each chunk)",
                 _table(result, r.selection.offsets, r.rank, "first row of each chunk"), note)


def step_rows(result: Result, r: RankResult) -> Group:
    assert r.selection is not None
    layout = result.layout
    pieces = layout.rank_pieces[r.rank].tolist()
    offsets, counts = r.selection.offsets, r.selection.local_counts.tolist()
    lines = Text()
    listed = 0
    for piece, count in zip(pieces, counts):
        if not count:
            continue
        if listed == MAX_ROWS:
            lines.append("… more chunks\n")
            break
        first = int(offsets[piece])
        lines.append(f"{piece_name(layout, piece)}: offset {first:,} + 0..{count - 1} → rows "
                     f"{token_span(first, first + count)}\n")
        listed += 1
    verdict = "✓ matches the oracle" if r.ok else "✗ differs from the oracle"
    lines.append(f"rows = {format_ranges(r.selected_rows)}  ({r.selected_rows.numel():,} rows for "
                 f"{int(r.local_mask.sum()):,} vision tokens; {verdict})")
    why = _why_gather(result, r)
    return _step(6, f"Rank {r.rank}'s rows: offset of each chunk it holds + the token's ordinal inside the chunk",
                 lines, *([why] if why else []))


def _why_gather(result: Result, r: RankResult) -> Text | None:
    """Name the first chunk whose offset counts vision tokens this rank cannot see on its own."""
    assert r.selection is not None
    layout = result.layout
    owner = layout.owner_of_piece()
    own = torch.where(owner == r.rank, r.selection.full_counts, 0)
    own_before = (torch.cumsum(own, 0) - own).tolist()
    offsets, counts, owners = r.selection.offsets.tolist(), r.selection.full_counts.tolist(), owner.tolist()
    for piece, count in zip(layout.rank_pieces[r.rank].tolist(), r.selection.local_counts.tolist()):
        others = offsets[piece] - own_before[piece]
        if count and others:
            holders = [p for p in range(piece) if counts[p] and owners[p] != r.rank][:7]
            names = ", ".join(f"{piece_name(layout, p)} (rank {owners[p]})" for p in holders[:6])
            more = " …" if len(holders) > 6 else ""
            return Text(f"Why the all-gather: the offset {offsets[piece]:,} of {piece_name(layout, piece)} is "
                        f"{own_before[piece]:,} from this rank's own chunks + {others:,} from {names}{more}: "
                        "counts this rank never sees in its local row.", style="italic")
    return None


def step_naive(result: Result, r: RankResult) -> Group:
    rows = result.vision_embed_count
    held = int(r.local_mask.sum())
    message = naive_scatter_message(r.local_mask, rows)
    body = Text()
    if message is None:
        body.append(f"Here it would happen to work: rank {r.rank} holds all {held:,} vision tokens, so all "
                    f"{rows:,} rows fit its mask.")
    else:
        body.append(f"combined[vision_mask] = vision_embeds puts {rows:,} rows into {held:,} masked positions; "
                    f"PyTorch refuses (hidden size {STAND_IN_HIDDEN} stands in for the model's):\n")
        body.append(message, style="red")
    body.append("\n" + _slice_note(result, r))
    return _step(7, "Why not scatter every row: the shapes", body)


def _slice_note(result: Result, r: RankResult) -> str:
    """What taking a contiguous slice of rows (the other tempting shortcut) would do."""
    counts = [int(x.local_mask.sum()) for x in result.ranks]
    start = sum(counts[: r.rank])
    held = counts[r.rank]
    naive = torch.arange(start, start + held)
    wrong = int((naive != r.selected_rows).sum()) if r.selected_rows.numel() == held else held
    if not held:
        return "With no vision tokens this rank selects no rows, but it still had to join the all-gather."
    if not wrong:
        return (f"A contiguous slice of rows {token_span(start, start + held)} would be right here: in this "
                f"{result.layout.kind} layout rank {r.rank}'s vision tokens are one unbroken stretch of the order.")
    return (f"A contiguous slice vision_embeds[{start}:{start + held}] has the right shape but puts {wrong:,} of "
            f"{held:,} rows in the wrong place, silently: this rank's chunks are not adjacent in the natural order.")


def _short(rows: Sequence[Sequence[int]] | Sequence[int]) -> str:
    text = str(list(rows))
    return text if len(rows) <= MAX_ROWS else str(list(rows)[:MAX_ROWS])[:-1] + f", … {len(rows) - MAX_ROWS} more]"


def explain_steps(result: Result, rank: int, width: int) -> list[RenderableType]:
    """The seven numbered steps for ``rank``, or one line saying why they cannot be shown."""
    r = result.ranks[rank]
    heading = Text(f"How rank {rank} selects its vision rows ({result.layout.kind} layout, cp {result.cp}), "
                   "step by step", style="bold underline")
    if r.selection is None:
        reason = str(result.spmd_error) if result.spmd_error is not None else "the rank did not finish"
        return [heading, Text(f"Rank {rank} produced no selection to explain: {reason}", style="red")]
    return [
        heading,
        step_local_mask(result, r, width),
        step_local_counts(result, r),
        step_all_gather(result, r),
        step_table(result, r),
        step_offsets(result, r),
        step_rows(result, r),
        step_naive(result, r),
    ]


def render_explain(result: Result, console: Console, rank: int = 0) -> None:
    """Print the step-by-step walk-through of ``rank``'s selection to ``console``."""
    console.print()
    for part in explain_steps(result, rank, console.width):
        console.print(part)


if __name__ == "__main__":  # pragma: no cover - a demo for eyeballing the view
    from cpinspect.core.synth import demo_batch
    from cpinspect.simulation.run import simulate

    render_explain(simulate(demo_batch(), 2), Console())
