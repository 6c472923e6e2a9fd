"""One comparison of a rank's selected rows with the oracle's, for every report that makes one."""

from __future__ import annotations

from dataclasses import dataclass

import torch

NATURAL_ORDER_HINT = "offsets must follow natural order: segment-major, then chunk 0..2cp-1"
SCATTER_HINT = "the scatter combined[mask] = rows needs exactly one row per local vision token"


@dataclass(frozen=True)
class RowsDifference:
    """How ``got`` differs from ``expected`` (both in local vision-token order).

    ``first`` is the first differing vision-token ordinal (``min(len)`` when one is a prefix of the
    other), ``differing`` how many of the common prefix differ, ``same_rows`` whether both hold the
    same rows in another order.
    """

    got_count: int
    expected_count: int
    first: int
    differing: int
    same_rows: bool

    @property
    def length_differs(self) -> bool:
        return self.got_count != self.expected_count

    def got_at_first(self, got: torch.Tensor) -> list[int]:
        return got[self.first:self.first + 1].tolist()


def compare_rows(got: torch.Tensor, expected: torch.Tensor) -> RowsDifference | None:
    """``None`` when ``got`` equals ``expected`` exactly, else where and how they differ."""
    got, expected = got.reshape(-1).to(torch.long), expected.reshape(-1).to(torch.long)
    if got.numel() == expected.numel() and torch.equal(got, expected):
        return None
    common = min(got.numel(), expected.numel())
    differ = torch.nonzero(got[:common] != expected[:common]).view(-1)
    first = int(differ[0]) if differ.numel() else common
    same = got.numel() == expected.numel() and torch.equal(torch.sort(got).values, torch.sort(expected).values)
    return RowsDifference(got.numel(), expected.numel(), first, int(differ.numel()), same)
