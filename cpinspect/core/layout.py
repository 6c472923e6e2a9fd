"""How a packed THD row is cut over CP ranks, expressed as *pieces*.

A piece is a contiguous range of global token positions that one rank holds whole. Every layout
cpinspect knows is a list of pieces in natural (global) order plus, per rank, the ids of the
pieces it holds in local-memory order:

* ``zigzag`` (Megatron per-document THD): each physical segment is cut into ``2*cp`` equal chunks;
  rank ``r`` holds chunks ``r`` and ``2*cp-1-r`` of every segment. Piece id = ``seg*2cp + chunk``.
* ``sequence-zigzag`` (BSHD / per-sequence): the same, with the whole row as one segment.
* ``contiguous`` (verl Ulysses, picotron, "allgather CP"): rank ``r`` holds ``[r*T/cp, (r+1)*T/cp)``.
* ``head-tail`` (PyTorch ``_HeadTailLoadBalancer``): the row is rearranged rank-major into chunk pairs
  ``(r, 2cp-1-r)`` of the whole row, then cut contiguously: the same map as ``sequence-zigzag``.
* ``hybrid`` (Megatron-LM hybrid / dynamic CP): every segment has its own CP size ``c`` and is held by an
  aligned block of ``c`` ranks, zigzag over ``2c`` chunks inside it; built by :mod:`cpinspect.core.hybrid`.
* ``per-document-head-tail`` (PyTorch ``_PerDocumentHeadTailLoadBalancer``) and ``file`` (per-rank
  global index tensors from the user's framework) are built from their per-rank index map by
  :mod:`cpinspect.core.layout_maps`: the pieces are the maximal runs of consecutive positions.

Because every rank holds the same number of pieces (maps with fewer runs on some ranks get empty
pieces), the per-rank count exchange is one fixed-shape all-gather, whatever the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cpinspect.core.errors import InputError
from cpinspect.core.runs import expand_runs

LAYOUTS = ("zigzag", "sequence-zigzag", "contiguous", "head-tail", "per-document-head-tail")
# The cutting rule each layout's divisibility and padding follow (``file`` maps only need equal shares).
RULES = {"zigzag": "zigzag", "sequence-zigzag": "sequence-zigzag", "contiguous": "contiguous",
         "head-tail": "sequence-zigzag", "per-document-head-tail": "zigzag", "file": "contiguous",
         "hybrid": "zigzag"}
PAIRED = ("zigzag", "sequence-zigzag", "head-tail")
# Layouts whose maps differ in general; head-tail is left out, its map is sequence-zigzag's. Searches over
# "the other layouts" (diagnose, position checks) use these, so one map is never two explanations.
DISTINCT_LAYOUTS = ("zigzag", "sequence-zigzag", "contiguous", "per-document-head-tail")
# The cuts diagnose tries as "the data was cut another way": more candidates make more numbers ambiguous,
# so it keeps to the three frameworks' cuts (a run with another layout passes it with --layout).
SEARCHED_LAYOUTS = ("zigzag", "sequence-zigzag", "contiguous")


def compared_layouts(kind: str) -> tuple[str, ...]:
    """The layouts ``layout`` compares (drawing with ``--compare``, balance numbers): the three framework
    cuts, plus ``kind`` when it is another one (PyTorch's balancers are shown when asked for)."""
    return SEARCHED_LAYOUTS if kind in SEARCHED_LAYOUTS else (*SEARCHED_LAYOUTS, kind)


def rule_of(kind: str) -> str:
    """The cutting rule (``zigzag``, ``sequence-zigzag`` or ``contiguous``) that ``kind`` pads and divides by."""
    return RULES.get(kind, "contiguous")

MAX_MAPPED_TOKENS = 1 << 26  # layouts built token by token (per-document-head-tail) stay within ~2 GB


@dataclass(frozen=True)
class Place:
    """Where one token sits: its owner rank and local index, global position, piece, segment, chunk."""

    rank: int
    local: int
    position: int
    piece: int
    segment: int
    chunk: int


@dataclass(frozen=True)
class Layout:
    """Pieces of one packed row over ``cp`` ranks (all tensors int64, on the CPU).

    ``piece_start``/``piece_len`` are ``[P]`` in natural order; ``rank_pieces`` is
    ``[cp, pieces_per_rank]``: the global piece ids each rank holds, in local order.
    ``piece_segment``/``piece_chunk`` name each piece for people (segment, chunk number).
    ``segment_cp`` (``[S]``, hybrid CP only) is each segment's own CP size.
    """

    kind: str
    cp: int
    cu_seqlens: torch.Tensor
    piece_start: torch.Tensor
    piece_len: torch.Tensor
    piece_segment: torch.Tensor
    piece_chunk: torch.Tensor
    rank_pieces: torch.Tensor
    segment_cp: torch.Tensor | None = None

    @property
    def total_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    @property
    def local_tokens(self) -> int:
        return self.total_tokens // self.cp

    @property
    def num_segments(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def pieces_per_rank(self) -> int:
        return self.rank_pieces.shape[1]

    @property
    def chunks_per_segment(self) -> int:
        """Columns of the gathered count table: ``2*cp`` per segment for zigzag, all pieces in one row otherwise."""
        return 2 * self.cp if self.kind == "zigzag" else self.piece_start.numel()

    @property
    def paired(self) -> bool:
        """Whether each rank holds (head, tail) chunk pairs, so its local counts read as ``[rows, 2]``."""
        return self.kind in PAIRED

    def local_piece_len(self, cp_rank: int) -> torch.Tensor:
        """``[pieces_per_rank]`` lengths of the pieces rank ``cp_rank`` holds, in local order."""
        return self.piece_len[self.rank_pieces[cp_rank]]

    def global_indices(self, cp_rank: int) -> torch.Tensor:
        """Global position of every local token of ``cp_rank``, in local order."""
        return expand_runs(self.piece_start[self.rank_pieces[cp_rank]], self.local_piece_len(cp_rank))

    def all_global_indices(self) -> torch.Tensor:
        """``[cp, local_tokens]``: row ``r`` is :meth:`global_indices` of rank ``r``."""
        flat = self.rank_pieces.reshape(-1)
        return expand_runs(self.piece_start[flat], self.piece_len[flat]).view(self.cp, -1)

    def locate(self, cp_rank: int, local: int) -> Place:
        """The place of rank ``cp_rank``'s local token ``local`` (for messages: one token)."""
        ends = torch.cumsum(self.local_piece_len(cp_rank), 0)
        slot = int(torch.searchsorted(ends, torch.tensor(local), right=True))
        piece = int(self.rank_pieces[cp_rank, slot])
        offset = local - (int(ends[slot - 1]) if slot else 0)
        return Place(cp_rank, local, int(self.piece_start[piece]) + offset, piece, int(self.piece_segment[piece]),
                     int(self.piece_chunk[piece]))

    def locate_position(self, position: int) -> Place:
        """The place of global token ``position``: which rank holds it, where, in which chunk."""
        piece = int(torch.searchsorted(self.piece_start, torch.tensor(position), right=True)) - 1
        while self.piece_len[piece] == 0:  # empty pieces share their start with the next one
            piece += 1
        rank, slot = (int(v) for v in torch.nonzero(self.rank_pieces == piece)[0])
        before = int(self.piece_len[self.rank_pieces[rank, :slot]].sum())
        local = before + position - int(self.piece_start[piece])
        return Place(rank, local, position, piece, int(self.piece_segment[piece]), int(self.piece_chunk[piece]))

    def owner_of_piece(self) -> torch.Tensor:
        """``[P]`` rank that holds each piece."""
        owner = torch.empty(self.piece_start.numel(), dtype=torch.long)
        owner[self.rank_pieces.reshape(-1)] = torch.arange(self.cp).repeat_interleave(self.pieces_per_rank)
        return owner


def check_cu_seqlens(cu_seqlens: torch.Tensor, *, name: str = "cu_seqlens") -> torch.Tensor:
    """Validate a cumulative-length vector and return it as 1-D int64."""
    if cu_seqlens.is_floating_point() or cu_seqlens.dtype == torch.bool:
        raise InputError(
            f"{name} has dtype {cu_seqlens.dtype}, but boundaries must be integers",
            where=name,
            fix="store it as an int32 or int64 tensor (e.g. torch.tensor([0, 8, 24], dtype=torch.int32))",
        )
    cu = cu_seqlens.reshape(-1) if cu_seqlens.dim() == 2 and cu_seqlens.shape[0] == 1 else cu_seqlens
    if cu.dim() != 1:
        raise InputError(
            f"{name} has shape {list(cu_seqlens.shape)}, but it must be 1-D",
            where=name,
            fix="pass one cumulative-length vector [num_segments + 1] for the packed row",
        )
    if cu.numel() < 2:
        raise InputError(
            f"{name} has {cu.numel()} entries; it needs at least 2 (one segment: [0, T])",
            where=name,
            fix="include the leading 0 and the end offset of every segment",
        )
    cu = cu.to(torch.long)
    if int(cu[0]) != 0:
        raise InputError(
            f"{name} starts at {int(cu[0])}, not 0",
            where=f"{name}[0]",
            fix="boundaries are offsets into the packed row and must start at 0",
        )
    lengths = cu[1:] - cu[:-1]
    bad = torch.nonzero(lengths < 0)
    if bad.numel():
        seg = int(bad[0])
        raise InputError(
            f"{name} decreases at segment {seg}: {int(cu[seg])} -> {int(cu[seg + 1])}",
            where=f"{name}[{seg}:{seg + 2}]",
            fix="cu_seqlens must be non-decreasing cumulative sums of segment lengths",
        )
    return cu


def check_cp_fits(cu_seqlens: torch.Tensor, cp: int, kind: str = "zigzag") -> None:
    """Raise the exit-2 error for a cp so large that a non-empty segment has fewer tokens than pieces."""
    kind = rule_of(kind)
    if cp == 1 and kind != "contiguous":
        return
    pieces = 2 * cp if kind != "contiguous" else cp
    lengths = cu_seqlens[1:] - cu_seqlens[:-1] if kind == "zigzag" else cu_seqlens[-1:] - cu_seqlens[:1]
    short = torch.nonzero((lengths > 0) & (lengths < pieces)).view(-1)
    if not short.numel():
        return
    seg = int(short[0])
    length = int(lengths[seg])
    step = 2 if kind != "contiguous" else 1
    largest = max(c for c in range(1, max(length // step, 1) + 1) if length % (step * c) == 0 or c == 1)
    name = f"segment {seg}" if kind == "zigzag" else "the packed row"
    raise InputError(
        f"cp={cp} is larger than {name} allows: it has {length} token(s), fewer than the {pieces} pieces the "
        f"{kind} layout cuts it into, so some ranks would hold none of it",
        where=f"{name}, tokens [{int(cu_seqlens[seg if kind == 'zigzag' else 0])}, "
              f"{int(cu_seqlens[seg + 1 if kind == 'zigzag' else -1])})",
        fix=f"pass the cp your run used; without padding {name} allows at most cp={largest}; or pad short segments "
            f"to {pieces} tokens (--pad)",
    )


def check_divisible(cu_seqlens: torch.Tensor, cp: int, kind: str = "zigzag") -> None:
    """Raise the exit-2 error naming the first segment a layout cannot cut evenly."""
    name, kind = kind, rule_of(kind)
    if cp == 1 and kind != "contiguous":
        return
    check_cp_fits(cu_seqlens, cp, kind)
    multiple = 2 * cp if kind != "contiguous" else cp
    if kind == "zigzag":
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        bad = torch.nonzero(lengths % multiple)
        if bad.numel():
            seg = int(bad[0])
            length = int(lengths[seg])
            nxt = -(-length // multiple) * multiple
            raise InputError(
                f"segment {seg} has physical length {length}, which is not divisible by 2*cp = {multiple} "
                f"({bad.numel()} of {lengths.numel()} segments are not); the next multiple is {nxt}",
                where=f"segment {seg}, tokens [{int(cu_seqlens[seg])}, {int(cu_seqlens[seg + 1])})",
                fix=f"pad every segment to a multiple of {multiple} as Megatron frameworks do "
                "(rerun with --pad to let cpinspect do it), or pick a cp that divides the lengths",
            )
        return
    total = int(cu_seqlens[-1])
    if total % multiple:
        nxt = -(-total // multiple) * multiple
        rule = "2*cp" if kind == "sequence-zigzag" else "cp"
        raise InputError(
            f"the row has {total} tokens, which is not divisible by {rule} = {multiple} for the {name} "
            f"layout; the next multiple is {nxt}",
            where="the whole packed row",
            fix="pad the row (--pad pads each segment) or pick a cp that divides the row length",
        )


def make_layout(cu_seqlens: torch.Tensor, cp: int, kind: str = "zigzag",
                segment_cp: torch.Tensor | None = None) -> Layout:
    """Build the pieces of ``kind`` for physical boundaries ``cu_seqlens`` over ``cp`` ranks.

    ``segment_cp`` (``[S]`` local CP sizes, checked by :func:`cpinspect.core.hybrid.segment_cp_sizes`) makes it
    the ``hybrid`` layout whatever ``kind`` says.
    """
    if segment_cp is not None or kind == "hybrid":
        from cpinspect.core.hybrid import hybrid_layout

        if segment_cp is None:
            raise InputError("the hybrid layout needs one local CP size per segment", where="--layout hybrid",
                             fix="pass --cp-per-segment 2,2,4,... or a batch with a local_cp_size field")
        return hybrid_layout(cu_seqlens, cp, segment_cp)
    if kind not in LAYOUTS:
        raise InputError(f"unknown layout {kind!r}", where="--layout", fix=f"use one of {', '.join(LAYOUTS)}")
    if cp < 1:
        raise InputError(f"cp is {cp}, but it must be at least 1", where="--cp", fix="pass --cp 1 or more")
    cu = check_cu_seqlens(cu_seqlens)
    check_divisible(cu, cp, kind)
    if kind == "per-document-head-tail":
        from cpinspect.core.layout_maps import layout_from_indices, per_document_head_tail_indices

        if int(cu[-1]) > MAX_MAPPED_TOKENS:
            raise InputError(
                f"the {kind} layout is built from its per-token index map, and this row has {int(cu[-1]):,} tokens, "
                f"more than the {MAX_MAPPED_TOKENS:,} such a map may hold (several int64 tensors of that length)",
                where="--layout", fix="use a layout with closed-form pieces (zigzag, sequence-zigzag, contiguous, "
                "head-tail) for rows this long, or check a shorter row")
        return layout_from_indices(kind, cu, cp, per_document_head_tail_indices(cu, cp))
    total = int(cu[-1])
    if kind == "contiguous":
        local = total // cp
        starts = torch.arange(cp) * local
        return Layout(
            kind, cp, cu, starts, torch.full((cp,), local), torch.zeros(cp, dtype=torch.long),
            torch.arange(cp), torch.arange(cp).view(cp, 1),
        )
    split_cu = cu if kind == "zigzag" else torch.tensor([0, total])  # head-tail cuts the row like sequence-zigzag
    starts, lengths, segment, chunk = _zigzag_pieces(split_cu, cp)
    return Layout(kind, cp, cu, starts, lengths, segment, chunk, zigzag_rank_pieces(split_cu.numel() - 1, cp))


def _zigzag_pieces(cu: torch.Tensor, cp: int) -> tuple[torch.Tensor, ...]:
    """Starts, lengths, segment and chunk of the ``2*cp`` chunks of every segment.

    With cp == 1 nothing is split upstream; an odd segment then gets chunks of floor/ceil length
    so that the count table keeps its ``[S, 2]`` shape.
    """
    num_chunks = 2 * cp
    seg_len = cu[1:] - cu[:-1]
    num_segments = seg_len.numel()
    chunk = torch.arange(num_chunks)
    chunk_len = seg_len // num_chunks
    lengths = chunk_len[:, None].expand(num_segments, num_chunks).clone()
    if cp == 1:
        lengths[:, 1] = seg_len - chunk_len
    offsets = torch.cumsum(lengths, 1) - lengths
    starts = cu[:-1, None] + offsets
    segment = torch.arange(num_segments)[:, None].expand(num_segments, num_chunks)
    return (
        starts.reshape(-1),
        lengths.reshape(-1),
        segment.reshape(-1).clone(),
        chunk.repeat(num_segments),
    )


def zigzag_rank_pieces(num_segments: int, cp: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[cp, 2*num_segments]`` piece ids: rank r holds ``seg*2cp + r`` then ``seg*2cp + 2cp-1-r``."""
    base = torch.arange(num_segments, device=device) * (2 * cp)
    ranks = torch.arange(cp, device=device)
    head = base[None, :] + ranks[:, None]
    tail = base[None, :] + (2 * cp - 1 - ranks)[:, None]
    return torch.stack([head, tail], dim=-1).reshape(cp, 2 * num_segments)


def pad_multiple(cp: int, kind: str, sp: int = 1) -> int:
    """What each padded unit must divide by: ``2*cp`` for zigzag layouts (1 at cp 1), ``cp`` for contiguous;
    times ``sp`` (tp under sequence parallelism: Megatron-Bridge pads to ``2*cp*tp``)."""
    kind = rule_of(kind)
    return (cp if kind == "contiguous" else (2 * cp if cp > 1 else 1)) * sp


def padded_boundaries(cu_seqlens: torch.Tensor, cp: int, kind: str, sp: int = 1,
                      segment_cp: torch.Tensor | None = None) -> torch.Tensor:
    """The boundaries ``--pad`` gives: every segment padded for zigzag, only the row's end otherwise; with
    ``segment_cp`` (hybrid CP) every segment to ``2c`` times ``sp`` for its own ``c`` (``c`` = 1: ``sp``), then
    pad sequences that fill every rank to one share (:func:`cpinspect.core.hybrid.with_rank_padding`)."""
    if segment_cp is not None:
        from cpinspect.core.hybrid import with_rank_padding

        rounded = padded_cu_seqlens(cu_seqlens, torch.where(segment_cp > 1, 2 * segment_cp, 1) * sp)
        return with_rank_padding(rounded, cp, segment_cp)
    multiple = pad_multiple(cp, kind, sp)
    if rule_of(kind) == "zigzag":
        return padded_cu_seqlens(cu_seqlens, multiple)
    total = int(cu_seqlens[-1])
    padded = -(-total // multiple) * multiple
    return torch.cat([cu_seqlens[:-1], cu_seqlens.new_tensor([padded])]) if padded != total else cu_seqlens


def padded_cu_seqlens(cu_seqlens: torch.Tensor, multiple: int | torch.Tensor) -> torch.Tensor:
    """Round every segment length up to ``multiple`` (one, or ``[S]``: what Megatron frameworks do before CP)."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    padded = (lengths + multiple - 1) // multiple * multiple
    return torch.cat([cu_seqlens.new_zeros(1), torch.cumsum(padded, 0)])


def pad_row(row: torch.Tensor, cu_seqlens: torch.Tensor, new_cu: torch.Tensor, fill: int | bool) -> torch.Tensor:
    """Move each segment of ``row`` (last dim) to its padded place; the gaps (and segments ``new_cu`` adds at
    the end) take ``fill``."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    shift = torch.repeat_interleave(new_cu[:lengths.numel()] - cu_seqlens[:-1], lengths)
    target = torch.arange(row.shape[-1]) + shift
    out = row.new_full((*row.shape[:-1], int(new_cu[-1])), fill)
    out[..., target] = row
    return out
