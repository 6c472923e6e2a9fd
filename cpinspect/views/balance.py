"""The balance table: causal attention work per rank of every layout, with max/mean.

``python -m cpinspect.views.balance`` prints it for the worked example (``cu_seqlens = [0, 8, 24]``, cp 2).
"""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from cpinspect.core.balance import Balance

MAX_RANK_ROWS = 16  # without --full, a larger cp lists the first and last 8 ranks and the busiest


def shown_ranks(cp: int, full: bool, always: tuple[int, ...] = ()) -> list[int]:
    """The ranks a per-rank view draws: all with ``full`` or up to :data:`MAX_RANK_ROWS`, else the first
    and last half of that many (plus ``always``), so that drawing stays what a terminal shows."""
    if full or cp <= MAX_RANK_ROWS:
        return list(range(cp))
    half = MAX_RANK_ROWS // 2
    return sorted({*range(half), *range(cp - half, cp), *always})


def balance_table(balances: dict[str, Balance], impossible: dict[str, str], chosen: str,
                  full: bool = False) -> RenderableType:
    """Per-rank causal attention work of every layout: count, share, and max/mean."""
    table = Table()
    table.add_column("rank", justify="right")
    for kind in balances:
        table.add_column(f"{kind} *" if kind == chosen else kind, justify="right", overflow="fold")
    cp = next(iter(balances.values())).work.numel() if balances else 0
    works = {kind: b.work.tolist() for kind, b in balances.items()}
    shares = {kind: b.percent for kind, b in balances.items()}
    busiest = tuple(int(b.work.argmax()) for b in balances.values() if cp)
    ranks = shown_ranks(cp, full, busiest)
    for index, rank in enumerate(ranks):
        if index and rank != ranks[index - 1] + 1:
            table.add_row("…", *(f"({rank - ranks[index - 1] - 1:,} ranks)" for _ in balances))
        table.add_row(str(rank), *(f"{works[k][rank]:,}  {shares[k][rank]:5.1f}%" for k in balances))
    table.add_row("total", *(f"{b.total:,}" for b in balances.values()), end_section=True)
    table.add_row("max/mean", *(f"{b.imbalance:.2f}" for b in balances.values()))
    notes = ["* the layout drawn above. max/mean is the busiest rank's work over the average; a step waits for the "
             "busiest rank, " + _worst_note(balances)]
    notes += [f"{kind} cannot cut this row: {reason}" for kind, reason in impossible.items()]
    if len(ranks) < cp:
        notes.append(f"{len(ranks)} of {cp:,} ranks listed: the first and last {MAX_RANK_ROWS // 2} and the busiest "
                     "of each layout (--full lists all; --json has all)")
    return Group(Text("causal attention work per rank (unmasked query-key pairs inside each segment)", style="bold"),
                 table, *(Text(note, style="dim") for note in notes))


def _worst_note(balances: dict[str, Balance]) -> str:
    worst = max(balances.values(), key=lambda b: b.imbalance, default=None)
    if worst is None or worst.imbalance == 1.0:
        return "and here every layout is perfectly balanced (1.00)."
    return (f"so {worst.layout}'s {worst.imbalance:.2f} means its attention takes {worst.imbalance:.2f}x as long as "
            "a perfectly balanced split would.")


if __name__ == "__main__":  # pragma: no cover - a demo for eyeballing the view
    import torch
    from rich.console import Console

    from cpinspect.core.balance import compare_layouts

    Console().print(balance_table(*compare_layouts(torch.tensor([0, 8, 24]), 2), "zigzag"))
