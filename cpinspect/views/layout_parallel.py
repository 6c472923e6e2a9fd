"""The tensor/sequence-parallel part of ``cpinspect layout --tp N``: the ``2·cp·tp`` alignment and each rank's
SP shares (the numbers are :func:`cpinspect.core.parallel.sp_document`; this only words them)."""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.text import Text

from cpinspect.views.balance import shown_ranks

MAX_RUNS = 6


def parallel_view(parallel: dict[str, Any], cp: int, full: bool = False) -> RenderableType:
    """Alignment (which segments miss it) and, under sequence parallelism, which tokens each TP rank holds."""
    tp, sp, unit = parallel["tp"], parallel["sequence_parallel"], parallel["alignment"]
    rule = "2·c·tp per segment (hybrid CP)" if len(unit) > 1 else ("2·cp·tp" if sp else "2·cp")
    head = Text(f"tensor parallel: tp {tp}, sequence parallelism {'on' if sp else 'off'}", style="bold")
    lines: list[RenderableType] = [head]
    missed = parallel["misaligned_segments"]
    units = "/".join(map(str, unit))
    if missed:
        listed = ", ".join(map(str, missed[:8])) + (", …" if len(missed) > 8 else "")
        lines.append(Text(f"✗ {len(missed)} segment(s) are not multiples of {rule} = {units} (segment {listed}); "
                          "Megatron-Bridge pads them (--pad does)", style="yellow"))
    else:
        lines.append(Text(f"✓ every segment length is a multiple of {rule} = {units}", style="green"))
    if not sp:
        lines.append(Text(f"without sequence parallelism every TP rank of a CP rank holds its whole "
                          f"{parallel['tokens_per_tp_rank']:,} tokens", style="dim"))
        return Group(*lines)
    share = parallel["tokens_per_tp_rank"]
    lines.append(Text(f"the SP scatter cuts each CP rank's local row into {tp} contiguous shares of {share:,} "
                      "tokens (the CP split first, then SP); global positions each (cp rank, tp rank) holds:",
                      style="dim"))
    for rank in shown_ranks(cp, full):
        for entry in parallel.get("sp_shares", [[]] * cp)[rank]:
            runs = entry["global_ranges"]
            text = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs[:MAX_RUNS])
            more = f", … ({len(runs) - MAX_RUNS} more runs)" if len(runs) > MAX_RUNS else ""
            local = entry["local"]
            lines.append(Text(f"  cp {rank} · tp {entry['tp_rank']}: local {local[0]:,}-{local[1] - 1:,} = "
                              f"global {text}{more}"))
    return Group(*lines)
