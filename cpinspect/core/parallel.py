"""Tensor- and sequence-parallel shape arithmetic: which splits a sequence length has had.

With context parallelism over ``cp`` ranks and Megatron sequence parallelism over ``tp`` ranks, a
packed row of ``T`` tokens is first cut over CP (``T / cp`` per CP rank, by the layout) and then,
where sequence parallelism applies (between the tensor-parallel regions: norms, dropout, the
embedding output), scattered over TP (``T / (cp * tp)`` per rank). A tensor that skipped one of
those splits has a length that says which:

==============================  ==================
splits the tensor has had       length
==============================  ==================
none (the full row)             ``T``
CP only (SP skipped)            ``T / cp``
SP only (CP skipped)            ``T / tp``
CP and SP (what the model has)  ``T / (cp * tp)``
==============================  ==================

Megatron-Bridge therefore pads every segment to a multiple of ``2 * cp * tp`` when sequence
parallelism is on (``2 * cp`` otherwise), so both splits cut evenly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cpinspect.core.errors import InputError

if TYPE_CHECKING:
    import torch

    from cpinspect.core.layout import Layout

SPLITS = ("full row", "CP split only", "SP split only", "CP and SP split")


def alignment(cp: int, tp: int = 1, sequence_parallel: bool = False) -> int:
    """What each segment's length must divide by: ``2*cp*tp`` with sequence parallelism, ``2*cp`` without."""
    if cp < 1 or tp < 1:
        raise InputError(f"cp={cp}, tp={tp}: both must be at least 1", where="--cp/--tp",
                         fix="pass --cp 1 --tp 1 or more")
    unit = 2 * cp if cp > 1 else 1
    return unit * tp if sequence_parallel else unit


@dataclass(frozen=True)
class ParallelSizes:
    """The lengths a ``tokens``-token row has after each combination of the CP and SP splits."""

    tokens: int
    cp: int
    tp: int

    def sizes(self) -> dict[str, int]:
        t, cp, tp = self.tokens, self.cp, self.tp
        return dict(zip(SPLITS, (t, t // cp, t // tp, t // (cp * tp))))

    def splits_of(self, length: int) -> list[str]:
        """Every combination of splits that gives ``length`` (several when ``cp == tp`` or a size is 1)."""
        return [name for name, size in self.sizes().items() if size == length]


@dataclass(frozen=True)
class MissingSplit:
    """One way an ``expected``/``got`` pair fits: one tensor skipped ``missing`` (``"CP"`` or ``"SP"``)."""

    missing: str
    tp: int
    larger: int
    smaller: int

    @property
    def code(self) -> str:
        return "CP_SPLIT_MISSING" if self.missing == "CP" else "SP_SPLIT_MISSING"


def missing_splits(expected: int, got: int, tokens: int, cp: int, tp: int | None = None) -> list[MissingSplit]:
    """The ways ``expected`` vs ``got`` are one row at ``T/(cp*tp)`` against one that skipped a split.

    ``tp`` is taken from the numbers when not given (it must then be an integer above 1). A pair of
    ``T`` and ``T/cp`` (tp 1) is left to the plain CP-size hypothesis.
    """
    larger, smaller = max(expected, got), min(expected, got)
    if smaller <= 0 or larger == smaller or larger % smaller or tokens <= 0 or cp < 2:
        return []
    ratio = larger // smaller
    out = []
    if ratio == cp and tokens % larger == 0:  # T/tp against T/(cp*tp): the CP split was skipped
        implied = tokens // larger
        if implied > 1 and (tp is None or tp == implied):
            out.append(MissingSplit("CP", implied, larger, smaller))
    if tokens % cp == 0 and larger == tokens // cp and ratio > 1:  # T/cp against T/(cp*tp): SP was skipped
        if tp is None or tp == ratio:
            out.append(MissingSplit("SP", ratio, larger, smaller))
    return out


def check_sp_split(layout: Layout, tp: int, sequence_parallel: bool) -> None:
    """The exit-2 error when sequence parallelism cannot scatter each rank's tokens evenly over ``tp``."""
    from cpinspect.core.layout import pad_multiple

    if sequence_parallel and layout.local_tokens % tp:
        raise InputError(
            f"each rank holds {layout.local_tokens} tokens, which sequence parallelism cannot scatter over tp = {tp}",
            where="--tp / --sequence-parallel",
            fix=f"pad segments to a multiple of {pad_multiple(layout.cp, layout.kind, tp)} (2*cp*tp for zigzag) as "
                "Megatron-Bridge does (--pad), or drop --sequence-parallel")


def segment_alignment(layout: Layout, tp: int, sequence_parallel: bool) -> torch.Tensor:
    """``[S]`` what each segment's length should divide by so both splits cut evenly: ``2*cp`` (times ``tp``
    under sequence parallelism), with hybrid CP each segment's own ``2*c`` (1 for ``c`` = 1)."""
    import torch

    sp = tp if sequence_parallel else 1
    if layout.segment_cp is not None:
        return torch.where(layout.segment_cp > 1, 2 * layout.segment_cp, 1) * sp
    return torch.full((layout.num_segments,), alignment(layout.cp, tp, sequence_parallel), dtype=torch.long)


def sp_document(layout: Layout, tp: int, sequence_parallel: bool, *, with_indices: bool = True) -> dict[str, Any]:
    """The tensor/sequence-parallel numbers of ``layout``: alignment, the segments that miss it, and per CP
    rank the share of its local row each TP rank holds after the SP scatter (contiguous, ``T/(cp*tp)`` each)."""
    import torch

    from cpinspect.core.ranges import to_ranges

    check_sp_split(layout, tp, sequence_parallel)
    unit = segment_alignment(layout, tp, sequence_parallel)
    lengths = layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]
    share = layout.local_tokens // tp if sequence_parallel else layout.local_tokens
    document: dict[str, Any] = {
        "tp": tp, "sequence_parallel": sequence_parallel, "alignment": sorted(set(unit.tolist())),
        "misaligned_segments": torch.nonzero(lengths % unit).view(-1).tolist(), "tokens_per_tp_rank": share,
    }
    if sequence_parallel and with_indices:
        document["sp_shares"] = [
            [{"tp_rank": t, "local": [t * share, (t + 1) * share], "global_ranges": [list(r) for r in to_ranges(part)]}
             for t, part in enumerate(layout.global_indices(rank).split(share))] for rank in range(layout.cp)]
    return document
