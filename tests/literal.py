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


def head_tail_indices(total: int, cp: int) -> list[list[int]]:
    """PyTorch head-tail: chunks (r, 2cp-1-r) of the whole row put rank after rank, then cut in cp equal shares."""
    c = total // (2 * cp)
    chunks = [list(range(i * c, (i + 1) * c)) for i in range(2 * cp)]
    rearranged: list[int] = []
    for r in range(cp):
        rearranged += chunks[r] + chunks[2 * cp - 1 - r]
    return shares(rearranged, cp)


def per_document_head_tail_indices(cu: list[int], cp: int) -> list[list[int]]:
    """PyTorch per-document head-tail: per document, for each rank its head then tail chunk; then cp equal shares."""
    rearranged: list[int] = []
    for s in range(len(cu) - 1):
        c = (cu[s + 1] - cu[s]) // (2 * cp)
        for r in range(cp):
            rearranged += list(range(cu[s] + r * c, cu[s] + (r + 1) * c))
            rearranged += list(range(cu[s] + (2 * cp - 1 - r) * c, cu[s] + (2 * cp - r) * c))
    return shares(rearranged, cp)


def shares(rearranged: list[int], cp: int) -> list[list[int]]:
    """Cut a rearranged row into cp contiguous equal shares (what Shard(seq_dim) does)."""
    n = len(rearranged) // cp
    return [rearranged[r * n:(r + 1) * n] for r in range(cp)]


def layout_indices(kind: str, cu: list[int], cp: int) -> list[list[int]]:
    """The literal per-rank global indices of a named layout."""
    if kind == "zigzag":
        return zigzag_indices(cu, cp)
    if kind == "sequence-zigzag":
        return zigzag_indices([0, cu[-1]], cp)
    if kind == "head-tail":
        return head_tail_indices(cu[-1], cp)
    if kind == "per-document-head-tail":
        return per_document_head_tail_indices(cu, cp) if cp > 1 else [list(range(cu[-1]))]
    return contiguous_indices(cu[-1], cp)


def hybrid_indices(cu: list[int], cp: int, sizes: list[int]) -> list[list[int]]:
    """Hybrid CP: segment s with local cp c goes to the aligned block of c ranks whose most loaded member holds
    the fewest tokens (the first such block); inside it member j holds chunks j and 2c-1-j of 2c (c = 1: all)."""
    load = [0] * cp
    ranks: list[list[int]] = [[] for _ in range(cp)]
    for s, c in enumerate(sizes):
        length = cu[s + 1] - cu[s]
        blocks = [list(range(b * c, (b + 1) * c)) for b in range(cp // c)]
        members = min(blocks, key=lambda block: max(load[m] for m in block))
        for m in members:
            load[m] += length // c
        if c == 1:
            ranks[members[0]] += list(range(cu[s], cu[s + 1]))
            continue
        n = length // (2 * c)
        chunks = [list(range(cu[s] + i * n, cu[s] + (i + 1) * n)) for i in range(2 * c)]
        for j, m in enumerate(members):
            ranks[m] += chunks[j] + chunks[2 * c - 1 - j]
    return ranks


def hybrid_rank_padding(cu: list[int], cp: int, sizes: list[int]) -> tuple[list[int], list[int]]:
    """Pad sequences (local cp 1) appended so every rank holds the fullest rank's share, largest gap first."""
    held = [len(h) for h in hybrid_indices(cu, cp, sizes)]
    gaps = sorted(((max(held) - n, r) for r, n in enumerate(held) if n < max(held)), key=lambda g: (-g[0], g[1]))
    cu, sizes = list(cu), list(sizes)
    for gap, _ in gaps:
        cu.append(cu[-1] + gap)
        sizes.append(1)
    return cu, sizes
