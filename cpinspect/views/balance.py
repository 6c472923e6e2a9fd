"""The balance table: causal attention work per rank of every layout, with max/mean.

``python -m cpinspect.views.balance`` prints it for the worked example (``cu_seqlens = [0, 8, 24]``, cp 2).
"""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from cpinspect.core.balance import Balance


def balance_table(balances: dict[str, Balance], impossible: dict[str, str], chosen: str) -> RenderableType:
    """Per-rank causal attention work of every layout: count, share, and max/mean."""
    table = Table()
    table.add_column("rank", justify="right")
    for kind in balances:
        table.add_column(f"{kind} *" if kind == chosen else kind, justify="right")
    cp = next(iter(balances.values())).work.numel() if balances else 0
    for rank in range(cp):
        table.add_row(str(rank), *(f"{int(b.work[rank]):,}  {b.percent[rank]:5.1f}%" for b in balances.values()))
    table.add_row("total", *(f"{b.total:,}" for b in balances.values()), end_section=True)
    table.add_row("max/mean", *(f"{b.imbalance:.2f}" for b in balances.values()))
    notes = ["* the layout drawn above. max/mean is the busiest rank's work over the average; a step waits for the "
             "busiest rank, " + _worst_note(balances)]
    notes += [f"{kind} cannot cut this row: {reason}" for kind, reason in impossible.items()]
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
