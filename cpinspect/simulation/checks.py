"""The checks of one simulated run: every rank against the oracle and the encoder's row count."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cpinspect.core.compare import NATURAL_ORDER_HINT, SCATTER_HINT, compare_rows
from cpinspect.core.findings import Finding

if TYPE_CHECKING:
    from cpinspect.groups.coordinator import SpmdError
    from cpinspect.simulation.run import RankResult, Result


def check(result: Result) -> list[Finding]:
    """Compare every rank with the oracle and the encoder's row count; return the findings."""
    findings: list[Finding] = []
    if result.padded_tokens:
        findings.append(Finding("SEGMENTS_PADDED", "info", result.notes[0],
                                "frameworks pad each segment to a multiple of 2*cp before CP; your data should too"))
    if result.spmd_error is not None:
        findings.append(spmd_finding(result.spmd_error))
        return findings
    total_gathered = int(result.gathered_counts.sum())
    if total_gathered != result.vision_embed_count:
        findings.append(Finding(
            "EMBED_COUNT_MISMATCH", "error",
            f"Packed CP ranks contain {total_gathered} vision tokens, but the vision encoder produced "
            f"{result.vision_embed_count} embeddings.",
            "placeholder tokens and image/video grids disagree: check truncation of vision spans and the grids "
            "passed to the encoder" + (" (audio placeholders take the rows of their items' audio lengths: "
                                       "`cpinspect diagnose` checks them per item)"
                                       if result.tokens.audio_token_id is not None else ""),
        ))
    for rank in result.ranks:
        holds = int(rank.local_mask.sum())
        if rank.selected_rows.numel() != holds:
            findings.append(Finding(
                "SCATTER_SHAPE_MISMATCH", "error",
                f"rank {rank.rank} selected {rank.selected_rows.numel()} rows but holds {holds} vision tokens",
                SCATTER_HINT, rank=rank.rank,
            ))
        if not rank.ok:
            findings.append(_rows_mismatch(result, rank))
    selected = torch.cat([r.selected_rows for r in result.ranks]) if result.ranks else torch.zeros(0)
    expected_all = torch.arange(result.vision_tokens)
    if selected.numel() != expected_all.numel() or not torch.equal(torch.sort(selected).values, expected_all):
        findings.append(Finding(
            "ROWS_NOT_A_PARTITION", "error",
            f"the ranks' rows together are not 0..{result.vision_tokens - 1} exactly once "
            f"({selected.numel()} rows selected for {result.vision_tokens} vision tokens)",
            "each vision embedding row must land on exactly one rank",
        ))
    return findings


def spmd_finding(failure: SpmdError) -> Finding:
    """The finding of a failed group: a rank that died, ranks too slow for --timeout, or a divergence."""
    if failure.kind == "died":
        return Finding("RANK_DIED", "error", str(failure),
                       "a rank's process ended: look at its memory use and at who sends signals to the job")
    if failure.kind == "timeout" and failure.slow_ranks:
        return Finding("COLLECTIVE_TIMEOUT", "error", str(failure),
                       "ranks ran their own code longer than --timeout while others waited: raise --timeout if "
                       "they are merely slow, or find where they are stuck")
    return Finding("COLLECTIVE_DIVERGENCE", "error", str(failure),
                   "every rank must reach the same collectives in the same order")


def _rows_mismatch(result: Result, rank: RankResult) -> Finding:
    got, want = rank.selected_rows, rank.expected_rows
    diff = compare_rows(got, want)
    first = diff.first if diff is not None else min(got.numel(), want.numel())
    position = int(rank.vision_positions[first]) if first < rank.vision_positions.numel() else None
    place = result.layout.locate(rank.rank, position) if position is not None else None
    return Finding(
        "ROWS_MISMATCH", "error",
        f"rank {rank.rank} selected rows differ from the oracle at vision token {first} "
        f"(local position {position}): got {got[first:first + 1].tolist()}, expected {want[first:first + 1].tolist()}",
        NATURAL_ORDER_HINT,
        rank=rank.rank, segment=place.segment if place else None, chunk=place.chunk if place else None,
    )
