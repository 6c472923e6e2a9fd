"""VALID_ONLY_ROW: padded chunk bounds sliced out of a row that holds only the valid tokens.

Megatron-Bridge#5614, verl#5981/#6001/#7261, mbridge#157/#158, SkyRL#1407: the row holds the Σ
logical lengths (no padding), but each rank's zigzag chunks are cut at the bounds of the *padded*
segments (every segment padded to a multiple of 2·cp, chunk size ``padded / (2·cp)``). A chunk
that starts at or past a short segment's valid end is empty (or short), and the first op that
expects ``chunk`` tokens fails: ``The expanded size of the tensor (2) must match the existing
size (0) at non-singleton dimension 0``.

The computation (what each rank receives per segment) is :func:`cpinspect.core.valid_only.valid_only_cuts`,
beside the flat-row form ``simulate`` shows; this module words the diagnosis.
"""

from __future__ import annotations

from cpinspect.core.findings import Finding
from cpinspect.core.valid_only import ChunkCut, valid_only_cuts
from cpinspect.diagnose.report import cause

HINT = ("pad every segment to a multiple of 2·cp before slicing (and keep cu_seqlens_padded for the bounds), or "
        "slice the valid-only row at its own (logical) bounds; never mix the two")


def describe(cut: ChunkCut, cp: int) -> str:
    padded = cut.size * 2 * cp
    return (f"segment {cut.segment} has {cut.valid} valid tokens, padded to {padded} = 2·cp x {cut.size}; chunk "
            f"{cut.chunk} (rank {cut.rank}) is offsets {cut.start}-{cut.start + cut.size - 1}, of which the "
            f"valid-only row holds {cut.received}")


def valid_only_finding(lengths: list[int], padded: list[int] | None, cp: int) -> Finding | None:
    """The structural finding for a row of only valid tokens stored with padded boundaries."""
    cuts = valid_only_cuts(lengths, cp)
    if not cuts or cp < 2:
        return None
    empty = [c for c in cuts if c.received == 0]
    first = empty[0] if empty else cuts[0]
    shown = "" if padded is None else (f"input_ids hold {sum(lengths)} tokens = Σ the logical lengths, while "
                                       f"cu_seqlens_padded ends at {sum(padded)}: the row carries no padding; ")
    text = (f"{shown}cutting it at padded chunk bounds gives {len(empty)} empty and {len(cuts) - len(empty)} short "
            f"chunk(s) at cp={cp}; first: {describe(first, cp)}")
    return cause("VALID_ONLY_ROW", text, HINT, rank=first.rank, segment=first.segment, chunk=first.chunk)
