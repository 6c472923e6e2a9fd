"""Causal attention work per CP rank: why a contiguous split is unbalanced and zigzag is not.

Packed THD attention is causal *inside each segment*: the query at offset ``k`` of its segment
attends to ``k + 1`` keys (itself and the ``k`` before it), and to nothing in other segments. A
rank's work is therefore the sum of ``offset + 1`` over the query tokens it holds, i.e. the number
of unmasked query-key pairs in its rows of the block-diagonal causal mask.

Summing ``offset + 1`` token by token is what a reader would do; here it is done in closed form.
The work of every token before global position ``p`` is

    F(p) = sum of L*(L+1)/2 over the segments that end at or before p  +  k*(k+1)/2,

with ``k = p - cu[s]`` the offset of ``p`` in its segment ``s``. A piece ``[a, b)`` costs
``F(b) - F(a)`` whether or not it crosses segment boundaries, so every layout is handled alike (from
its pieces, not from a per-layout formula), exactly, in int64 and with no per-token or per-segment
Python loop.

Exact, not wrapped: ``k*(k+1)/2`` is computed as ``(k/2)*(k+1)`` or ``k*((k+1)/2)`` (whichever factor
is even is halved first), so no intermediate exceeds the result, and the whole row's work
``T*(T+1)/2`` fits int64 for ``T <= MAX_TOKENS = 2**32 - 1``. A longer row is refused (exit 2)
rather than reported with wrapped, negative numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cpinspect.core.errors import InputError
from cpinspect.core.layout import LAYOUTS, Layout, make_layout

MAX_TOKENS = (1 << 32) - 1  # the longest row whose causal work T*(T+1)/2 is exact in int64


@dataclass(frozen=True)
class Balance:
    """Causal attention work of each rank under one layout (``work`` is ``[cp]`` int64)."""

    layout: str
    work: torch.Tensor

    @property
    def total(self) -> int:
        return int(self.work.sum())

    @property
    def percent(self) -> list[float]:
        """Each rank's share of all the work, in percent (0 for an empty row). Computed per call: O(cp)."""
        total = self.total
        return [100.0 * w / total if total else 0.0 for w in self.work.tolist()]

    @property
    def imbalance(self) -> float:
        """``max / mean`` of the per-rank work: 1.0 is perfect balance, cp means one rank does all."""
        total = self.total
        return float(self.work.max()) * self.work.numel() / total if total else 1.0

    def to_dict(self) -> dict[str, object]:
        return {"work": self.work.tolist(), "imbalance": self.imbalance}


def triangle(n: torch.Tensor) -> torch.Tensor:
    """``n*(n+1)/2`` exactly, halving the even factor first so no intermediate exceeds the result."""
    even = n % 2 == 0
    return torch.where(even, (n // 2) * (n + 1), n * ((n + 1) // 2))


def check_row_size(cu_seqlens: torch.Tensor) -> None:
    """The exit-2 error for a row longer than :data:`MAX_TOKENS` (its work would not be exact in int64)."""
    total = int(cu_seqlens[-1])
    if total > MAX_TOKENS:
        raise InputError(
            f"the row has {total:,} tokens, more than the {MAX_TOKENS:,} (2**32 - 1) whose causal attention work "
            "cpinspect computes exactly", where="cu_seqlens[-1]",
            fix="inspect a shorter row (a few segments of it keep the same per-segment layout)")


def prefix_work(cu_seqlens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``F(p)``: unmasked query-key pairs of all queries before each of ``positions`` (closed form)."""
    cu = cu_seqlens.to(torch.long)
    check_row_size(cu)
    lengths = cu[1:] - cu[:-1]
    whole = torch.cat([lengths.new_zeros(1), torch.cumsum(triangle(lengths), 0)])
    segment = torch.searchsorted(cu, positions.to(torch.long), right=True) - 1
    offset = positions - cu[segment]
    return whole[segment] + triangle(offset)


def rank_work(layout: Layout) -> torch.Tensor:
    """``[cp]`` unmasked query-key pairs of the queries each rank holds under ``layout``."""
    starts = layout.piece_start
    piece_work = prefix_work(layout.cu_seqlens, starts + layout.piece_len) - prefix_work(layout.cu_seqlens, starts)
    return piece_work[layout.rank_pieces].sum(dim=1)


def balance_of(layout: Layout) -> Balance:
    return Balance(layout.kind, rank_work(layout))


def compare_layouts(cu_seqlens: torch.Tensor, cp: int) -> tuple[dict[str, Balance], dict[str, str]]:
    """Balance of every layout that can cut ``cu_seqlens`` over ``cp`` ranks, and why the others cannot.

    The second dict maps a layout name to the one-paragraph reason it cannot cut this row (e.g. a
    segment not divisible by ``2*cp``); such a layout has no balance entry.
    """
    check_row_size(cu_seqlens)  # the whole row's limit, not a reason one layout cannot cut it
    balances: dict[str, Balance] = {}
    impossible: dict[str, str] = {}
    for kind in LAYOUTS:
        try:
            balances[kind] = balance_of(make_layout(cu_seqlens, cp, kind))
        except InputError as exc:
            impossible[kind] = exc.what
    return balances, impossible
