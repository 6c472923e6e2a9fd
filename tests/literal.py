"""A tiny literal implementation of the definitions, in plain Python lists: the tests' oracle.

Nothing here is shared with cpinspect: no torch, no pieces, no formulas beyond the words of the
definition ("rank r holds chunks r and 2cp-1-r of every segment; rows are ranks of vision
tokens in the full row").
"""

from __future__ import annotations


def zigzag_indices(cu: list[int], cp: int) -> list[list[int]]:
    ranks: list[list[int]] = [[] for _ in range(cp)]
    for s in range(len(cu) - 1):
        length = cu[s + 1] - cu[s]
        if cp == 1:
            ranks[0] += list(range(cu[s], cu[s + 1]))
            continue
        c = length // (2 * cp)
        chunks = [list(range(cu[s] + i * c, cu[s] + (i + 1) * c)) for i in range(2 * cp)]
        for r in range(cp):
            ranks[r] += chunks[r] + chunks[2 * cp - 1 - r]
    return ranks


def contiguous_indices(total: int, cp: int) -> list[list[int]]:
    n = total // cp
    return [list(range(r * n, (r + 1) * n)) for r in range(cp)]


def expected_rows(mask: list[bool], held: list[int]) -> list[int]:
    row_of = {}
    for g, is_vision in enumerate(mask):
        if is_vision:
            row_of[g] = len(row_of)
    return [row_of[g] for g in held if mask[g]]


def local_counts(cu: list[int], cp: int, rank: int, mask: list[bool]) -> list[list[int]]:
    """[S, 2] vision tokens in chunks (rank, 2cp-1-rank) of each segment."""
    out = []
    for s in range(len(cu) - 1):
        c = (cu[s + 1] - cu[s]) // (2 * cp)
        pair = []
        for chunk in (rank, 2 * cp - 1 - rank):
            start = cu[s] + chunk * c
            pair.append(sum(mask[start:start + c]))
        out.append(pair)
    return out
