"""Hybrid (dynamic) context parallelism: every segment with its own CP size, held by a subgroup of the CP group.

What the stacks do (read in NVIDIA/Megatron-LM, ``main`` at d98e8a6 and ``dev``; verl-project/verl#6555):

* Megatron-LM ``--hybrid-context-parallel`` (``pipeline_parallel/hybrid_cp_schedule.py``, ``BalancedCPScheduler``):
  every sub-sample (one packed sequence) gets its own CP size, ``gpus_needed`` = the next power of two of
  ``len / max_seqlen_per_cp_rank``; a rank runs several sub-samples one after another, each a micro-batch whose
  batch key ``local_cp_size`` (int32 scalar) names its CP size.
* The subgroups are fixed blocks: ``create_hybrid_dp_cp_groups`` cuts the DPxCP ranks into consecutive blocks
  ``ranks[i : i + g]`` for each power of two ``g`` (the whole group for ``g`` = its size), and
  ``get_hybrid_data_context_parallel_groups(group_size=c)`` returns the block a rank is in. A segment with
  local cp ``c`` is held by one aligned block ``b``: ranks ``b*c .. b*c + c - 1``, in that order.
* Inside its block a sub-sample is cut by per-sequence balancing (``get_batch_on_this_cp_rank`` ->
  ``_get_batch_on_this_cp_rank_per_sequence_balancing`` over the hybrid group): ``2c`` equal chunks, member
  ``j`` holds chunks ``j`` and ``2c-1-j``, so the length must divide by ``2c``; ``local_cp_size`` 1 is not
  split (the whole sub-sample on one rank).
* Megatron-LM ``dev`` ``--dynamic-context-parallel`` (``datasets/data_schedule.py``, ``DefaultDynamicCPScheduler``,
  ``PackedSeqParams.local_cp_size`` and ``cp_group``; verl#6555 ``dynamic_context_parallel=True`` uses it) packs
  several documents into one micro-batch with one ``local_cp_size`` and cuts it per document (TE
  ``thd_get_partitioned_indices`` over ``cu_seqlens_padded``) over the group of that size, made of the same
  aligned blocks (``create_dynamic_dp_cp_groups``). For one document both cuts are chunks ``j`` and ``2c-1-j``.
  (Its ``cp_partition_mode="contiguous"`` cuts the micro-batch into ``c`` equal slices instead: not modelled.)
* Ranks outside a segment's block hold none of it: they run other sub-samples meanwhile.

What cpinspect adds, a model rather than a stack's code: *which* block. The schedulers pick it at run time from
their workload estimate; cpinspect places the segments in row order, each on the aligned block of its size whose
most loaded member holds the fewest tokens so far (ties: the lowest block), the schedulers' "least loaded
group" rule counted in tokens. A rank's local row is its share of each of its segments, in row order. Every rank
must end with the same number of tokens (the count exchange is one fixed-shape all-gather, as for every layout);
a mix that does not is an exit-2 error unless ``--pad`` fills the short ranks with pad sequences
(:func:`with_rank_padding`). A run that placed its segments otherwise: save its per-rank indices and pass
``--layout-from``.

A scalar ``local_cp_size`` describes one micro-batch on one subgroup, so ``--cp`` must be that size (the
layout is then per-document zigzag over it); a per-segment ``local_cp_size`` (or ``--cp-per-segment``) spreads
sub-samples over the whole group.
"""

from __future__ import annotations

import torch

from cpinspect.core.errors import InputError
from cpinspect.core.layout import Layout, check_cu_seqlens

KIND = "hybrid"


def parse_cp_per_segment(text: str) -> list[int]:
    """``"2,2,4"`` -> ``[2, 2, 4]``; the exit-2 error naming the bad entry otherwise."""
    values = []
    for index, entry in enumerate(part.strip() for part in text.split(",")):
        if not entry.isdigit() or int(entry) < 1:
            raise InputError(f"--cp-per-segment entry {index} is {entry!r}, not a CP size of 1 or more",
                             where=f"--cp-per-segment {text}",
                             fix="give one local CP size per segment, comma-separated, e.g. --cp-per-segment 2,2,4")
        values.append(int(entry))
    return values


def segment_cp_sizes(cp: int, num_segments: int, *, option: str | None = None, batch_value: torch.Tensor | None = None,
                     index_map: torch.Tensor | None = None) -> torch.Tensor | None:
    """``[S]`` local CP size of every segment, from ``--cp-per-segment`` or the batch's ``local_cp_size``
    (``None`` when neither is given: not a hybrid run). Checked: one value per segment, each dividing ``cp``;
    not together with ``--layout-from`` (``index_map``), whose saved indices fix the layout already."""
    if option is not None and index_map is not None:
        raise InputError("--layout-from and --cp-per-segment were both given", where="--cp-per-segment",
                         fix="the saved indices fix the layout: drop --cp-per-segment (or --layout-from)")
    if index_map is not None:
        return None
    if option is not None:
        sizes, where = torch.tensor(parse_cp_per_segment(option), dtype=torch.long), "--cp-per-segment"
    elif batch_value is not None:
        sizes, where = batch_value.reshape(-1).to(torch.long), "the batch's local_cp_size"
        if sizes.numel() == 1 and num_segments != 1:
            if int(sizes[0]) != cp:
                raise InputError(
                    f"the batch's local_cp_size is {int(sizes[0])}: one micro-batch held by a subgroup of "
                    f"{int(sizes[0])} rank(s), but --cp is {cp}", where="local_cp_size",
                    fix=f"pass --cp {int(sizes[0])} (the subgroup that holds this micro-batch), or save one "
                        "local_cp_size per segment for sub-samples spread over the whole group")
            sizes = sizes.expand(num_segments).clone()
    else:
        return None
    if sizes.numel() != num_segments:
        raise InputError(f"{where} gives {sizes.numel()} CP size(s), but the row has {num_segments} segment(s)",
                         where=where, fix=f"give exactly one local CP size per segment ({num_segments} values)")
    bad = torch.nonzero((sizes < 1) | (cp % sizes.clamp(min=1) != 0)).view(-1)
    if bad.numel():
        seg = int(bad[0])
        divisors = [d for d in range(1, cp + 1) if cp % d == 0]
        raise InputError(
            f"{where}: segment {seg} has local CP size {int(sizes[seg])}, which does not divide the CP group "
            f"size --cp {cp} ({bad.numel()} of {num_segments} segments do not), so no aligned block of ranks holds it",
            where=f"{where}, segment {seg}",
            fix=f"use sizes that divide {cp} ({', '.join(map(str, divisors))}), or pass the group size as --cp")
    return sizes


def check_segments_cut(cu_seqlens: torch.Tensor, segment_cp: torch.Tensor) -> None:
    """The exit-2 error for a segment that its ``2c`` chunks cannot cut evenly (``c`` > 1)."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    multiple = torch.where(segment_cp > 1, 2 * segment_cp, torch.ones_like(segment_cp))
    bad = torch.nonzero(lengths % multiple).view(-1)
    if bad.numel():
        seg = int(bad[0])
        need = int(multiple[seg])
        raise InputError(
            f"segment {seg} has physical length {int(lengths[seg])} and local CP size {int(segment_cp[seg])}, so it "
            f"is cut into 2*{int(segment_cp[seg])} = {need} chunks, but {int(lengths[seg])} is not divisible by {need} "
            f"({bad.numel()} of {lengths.numel()} segments are not)",
            where=f"segment {seg}, tokens [{int(cu_seqlens[seg])}, {int(cu_seqlens[seg + 1])})",
            fix="pad every segment to a multiple of 2 x its local CP size as Megatron's hybrid CP requires "
                "(--pad does it), or give that segment another local CP size")


def place_segments(cu_seqlens: torch.Tensor, cp: int, segment_cp: torch.Tensor) -> torch.Tensor:
    """``[S]`` first rank of the block that holds each segment (the least loaded aligned block of its size)."""
    return torch.tensor(_place(cu_seqlens, cp, segment_cp)[0], dtype=torch.long)


def _place(cu_seqlens: torch.Tensor, cp: int, segment_cp: torch.Tensor) -> tuple[list[int], list[int]]:
    """(first rank of each segment's block, tokens each rank holds): plain Python over the segments, since each
    step reads the loads the ones before it left, and small tensor ops per segment would cost more."""
    load = [0] * cp
    first_rank = []
    for length, size in zip((cu_seqlens[1:] - cu_seqlens[:-1]).tolist(), segment_cp.tolist()):
        peaks = [max(load[start:start + size]) for start in range(0, cp, size)]
        start = peaks.index(min(peaks)) * size  # index(): the first of the ties, the lowest block
        for rank in range(start, start + size):
            load[rank] += length // size
        first_rank.append(start)
    return first_rank, load


def with_rank_padding(cu_seqlens: torch.Tensor, cp: int, segment_cp: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` with pad sequences (local cp 1) appended that fill every rank to the fullest rank's share.

    Megatron's dynamic CP pads each rank's micro-batch to one length with a dummy sequence after its real ones
    (``pad_sequence_for_thd``). Largest gap first, ties to the lower rank: the placement rule then gives each
    pad sequence to the rank it was cut for (every later rank holds at least as much). Segments ``2c`` cannot
    cut are left to :func:`hybrid_layout`'s error.
    """
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    multiple = torch.where(segment_cp > 1, 2 * segment_cp, torch.ones_like(segment_cp))
    if bool((lengths % multiple).any()):
        return cu_seqlens
    _, load = _place(cu_seqlens, cp, segment_cp)
    gaps = sorted(((max(load) - held, rank) for rank, held in enumerate(load) if held < max(load)),
                  key=lambda gap: (-gap[0], gap[1]))
    ends = int(cu_seqlens[-1]) + torch.cumsum(torch.tensor([gap for gap, _ in gaps], dtype=torch.long), 0)
    return torch.cat([cu_seqlens, ends.to(cu_seqlens.dtype)])


def with_pad_sequences(segment_cp: torch.Tensor | None, cu_seqlens: torch.Tensor) -> torch.Tensor | None:
    """``segment_cp`` with local cp 1 for the pad sequences :func:`with_rank_padding` appended to ``cu_seqlens``."""
    if segment_cp is None:
        return None
    extra = cu_seqlens.numel() - 1 - segment_cp.numel()
    return torch.cat([segment_cp, torch.ones(extra, dtype=segment_cp.dtype)]) if extra > 0 else segment_cp


def hybrid_layout(cu_seqlens: torch.Tensor, cp: int, segment_cp: torch.Tensor) -> Layout:
    """The :class:`Layout` of hybrid CP: segment ``s`` on its block, chunks ``j`` and ``2c-1-j`` on member ``j``."""
    cu = check_cu_seqlens(cu_seqlens)
    check_segments_cut(cu, segment_cp)
    first_rank = place_segments(cu, cp, segment_cp)
    lengths = cu[1:] - cu[:-1]
    count = torch.where(segment_cp > 1, 2 * segment_cp, 1) * (lengths > 0)  # pieces per segment (none if empty)
    segment = torch.repeat_interleave(torch.arange(lengths.numel()), count)
    chunk = torch.arange(segment.numel()) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
    size = segment_cp[segment]
    piece_len = lengths[segment] // count[segment]
    owner = first_rank[segment] + torch.where(chunk < size, chunk, 2 * size - 1 - chunk)
    held = torch.zeros(cp, dtype=torch.long).index_add_(0, owner, piece_len)
    _check_equal_shares(held, cu, segment_cp, first_rank)
    return _layout(cu, cp, segment_cp, cu[segment] + chunk * piece_len, piece_len, segment, chunk, owner)


def _layout(cu: torch.Tensor, cp: int, segment_cp: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
            segments: torch.Tensor, chunks: torch.Tensor, owner: torch.Tensor) -> Layout:
    """Pieces in natural order, each rank's in increasing order (its segments in row order, head before tail),
    and empty pieces (start ``T``) so that every rank holds the same number."""
    per_rank = torch.bincount(owner, minlength=cp)
    width = int(per_rank.max()) if owner.numel() else 1
    real = owner.numel()
    empties = cp * width - real
    order = torch.argsort(owner, stable=True)  # natural ids grouped by rank, increasing within each rank
    slot = torch.arange(real) - torch.repeat_interleave(torch.cumsum(per_rank, 0) - per_rank, per_rank)
    rank_pieces = torch.empty(cp, width, dtype=torch.long)
    rank_pieces[owner[order], slot] = order
    filled = torch.arange(width)[None, :] < per_rank[:, None]
    rank_pieces[~filled] = torch.arange(real, real + empties)

    def padded(values: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.cat([values.to(torch.long), torch.full((empties,), fill, dtype=torch.long)])

    return Layout(KIND, cp, cu, padded(starts, int(cu[-1])), padded(lengths, 0), padded(segments, cu.numel() - 2),
                  padded(chunks, -1), rank_pieces, segment_cp=segment_cp)


def _check_equal_shares(held: torch.Tensor, cu: torch.Tensor, segment_cp: torch.Tensor,
                        first_rank: torch.Tensor) -> None:
    if bool((held == held[0]).all()):
        return
    cp = held.numel()
    shares = ", ".join(f"rank {r}: {int(n)}" for r, n in enumerate(held[:8]))
    placed = ", ".join(f"segment {s} -> rank {f}" if c == 1 else f"segment {s} -> ranks {f}..{f + c - 1}"
                       for s, (f, c) in enumerate(zip(first_rank[:6].tolist(), segment_cp[:6].tolist())))
    raise InputError(
        f"hybrid CP with these local CP sizes gives the {cp} ranks unequal shares ({shares}{', ...' if cp > 8 else ''};"
        f" placed {placed}{', ...' if segment_cp.numel() > 6 else ''}), and cpinspect simulates one packed row "
        "whose ranks hold equal shares",
        where="--cp-per-segment / local_cp_size",
        fix="pad every rank to one share as Megatron's dynamic CP does (simulate / layout --pad append a pad "
            "sequence to each short rank), check a mix whose sub-samples fill every rank equally, or save the "
            "run's per-rank global indices and pass --layout-from")


def segment_ranks(layout: Layout) -> list[tuple[int, int]]:
    """Per segment, the first and last rank of the block that holds it (``(-1, -1)`` for an empty segment)."""
    owner = layout.owner_of_piece()
    real = layout.piece_len > 0
    ranks = [(-1, -1)] * layout.num_segments
    for seg, rank in zip(layout.piece_segment[real].tolist(), owner[real].tolist()):
        low, high = ranks[seg]
        ranks[seg] = (rank if low < 0 else min(low, rank), max(high, rank))
    return ranks


def placement_note(layout: Layout, shown: int = 8) -> str:
    """One line for people: which ranks hold each segment, with its local CP size."""
    sizes = layout.segment_cp.tolist() if layout.segment_cp is not None else []
    parts = [f"segment {seg} (cp {size}) on rank{'s' if high > low else ''} "
             f"{low}{f'..{high}' if high > low else ''}"
             for seg, ((low, high), size) in enumerate(zip(segment_ranks(layout)[:shown], sizes)) if low >= 0]
    more = ", ..." if layout.num_segments > shown else ""
    return f"hybrid CP over a group of {layout.cp}: " + ", ".join(parts) + more


def block_text(layout: Layout, segment: int) -> str:
    """``"cp 2 on ranks 0..1 = 4 chunks of 4"``: a segment's local CP size, its block and its chunks, for people."""
    size = int(layout.segment_cp[segment]) if layout.segment_cp is not None else layout.cp
    low, high = segment_ranks(layout)[segment]
    length = int(layout.cu_seqlens[segment + 1] - layout.cu_seqlens[segment])
    if low < 0:
        return f"cp {size}, empty"
    if size == 1:
        return f"cp 1 on rank {low} (not split)"
    return f"cp {size} on ranks {low}..{high} = {2 * size} chunks of {length // (2 * size):,}"
