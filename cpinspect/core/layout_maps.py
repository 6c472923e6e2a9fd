"""Layouts defined by their per-rank index map: "rank r's local position j holds global position g".

Every layout is such a map; the named ones in :mod:`cpinspect.core.layout` build their pieces
directly, the others are built here from the map itself: the pieces are the maximal runs of
consecutive global positions in a rank's local order that stay inside one segment. Ranks with
fewer runs than the most get empty pieces (length 0, start ``T``) so that every rank holds the
same number of pieces and the count exchange stays one fixed-shape all-gather.

* ``per-document-head-tail``: PyTorch's ``_PerDocumentHeadTailLoadBalancer`` as torch applies it:
  the row is rearranged document by document into ``[rank 0 head, rank 0 tail, rank 1 head, ...]``
  chunks (``2*cp`` per document), then the rearranged row is cut into ``cp`` contiguous shares.
  With documents of different lengths a rank's share therefore does not hold every document's
  chunk pair: this is not Megatron's per-document zigzag.
* ``file``: per-rank global index tensors saved from the user's framework (any permutation,
  e.g. PyTorch's PTRR balancer), checked by :func:`check_index_map`.
"""

from __future__ import annotations

import torch

from cpinspect.core.errors import InputError
from cpinspect.core.layout import Layout, check_cu_seqlens


def per_document_head_tail_indices(cu_seqlens: torch.Tensor, cp: int) -> torch.Tensor:
    """``[cp, T/cp]`` global positions: per-document head/tail rearrangement, then a contiguous cut."""
    total = int(cu_seqlens[-1])
    if cp == 1:
        return torch.arange(total).view(1, total)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    chunk = (lengths // (2 * cp)).repeat_interleave(lengths)
    start = cu_seqlens[:-1].repeat_interleave(lengths)
    offset = torch.arange(total) - start  # the rearranged row keeps each document's block in place
    pair, within = offset // (2 * chunk).clamp(min=1), offset % (2 * chunk).clamp(min=1)
    head = within < chunk
    source_chunk = torch.where(head, pair, 2 * cp - 1 - pair)
    rearranged = start + source_chunk * chunk + torch.where(head, within, within - chunk)
    return rearranged.view(cp, total // cp)


def check_index_map(indices: torch.Tensor, total: int, *, where: str) -> torch.Tensor:
    """``indices`` as ``[cp, T/cp]`` int64 after checking it is a permutation of ``0..T-1`` in equal shares."""
    if indices.is_floating_point() or indices.dtype == torch.bool:
        raise InputError(f"the per-rank indices have dtype {indices.dtype}, but positions must be integers",
                         where=where, fix="save the global index tensors as int32 or int64")
    if indices.dim() != 2:
        raise InputError(f"the per-rank indices have shape {list(indices.shape)}, but one [cp, T/cp] table "
                         "(or one equal-length 1-D tensor per rank) is needed", where=where,
                         fix="save a list with rank r's global positions, in local order, at index r")
    cp, share = indices.shape
    if cp * share != total:
        raise InputError(f"the per-rank indices cover {cp} x {share} = {cp * share} positions, but the row has "
                         f"{total} tokens", where=where,
                         fix="save the index tensors of the same batch (cu_seqlens must end at cp x local tokens)")
    flat = indices.reshape(-1).to(torch.long)
    seen = torch.zeros(total, dtype=torch.long)
    inside = (flat >= 0) & (flat < total)
    if not bool(inside.all()):
        bad = int(torch.nonzero(~inside)[0])
        raise InputError(f"rank {bad // share} local position {bad % share} maps to {int(flat[bad])}, outside "
                         f"0..{total - 1}", where=where, fix="save global positions of the packed row")
    seen.index_add_(0, flat, torch.ones_like(flat))
    twice = torch.nonzero(seen != 1).view(-1)
    if twice.numel():
        missing = torch.nonzero(seen == 0).view(-1)
        raise InputError(f"the per-rank indices are not a permutation of 0..{total - 1}: position "
                         f"{int(twice[0])} is held {int(seen[twice[0]])} times ({missing.numel()} positions "
                         "are held by no rank)", where=where,
                         fix="every global position must be held by exactly one rank once")
    return flat.view(cp, share)


def layout_from_indices(kind: str, cu_seqlens: torch.Tensor, cp: int, indices: torch.Tensor) -> Layout:
    """The :class:`Layout` whose :meth:`Layout.all_global_indices` is ``indices`` (``[cp, T/cp]``)."""
    total = int(cu_seqlens[-1])
    share = total // cp
    flat = indices.reshape(-1).to(torch.long)
    segment = torch.searchsorted(cu_seqlens[1:], flat, right=True)
    local = torch.arange(flat.numel()) % max(share, 1)
    new_run = torch.ones_like(flat, dtype=torch.bool)
    if flat.numel() > 1:
        new_run[1:] = (local[1:] == 0) | (flat[1:] != flat[:-1] + 1) | (segment[1:] != segment[:-1])
    run_first = torch.nonzero(new_run).view(-1)
    run_len = torch.diff(run_first, append=torch.tensor([flat.numel()]))
    run_rank = run_first // max(share, 1)
    runs_per_rank = torch.bincount(run_rank, minlength=cp)
    width = int(runs_per_rank.max()) if cp else 0
    starts = flat[run_first]
    order = torch.argsort(starts, stable=True)
    natural = torch.empty_like(order)
    natural[order] = torch.arange(order.numel())
    real = order.numel()
    empties = cp * width - real
    piece_start = torch.cat([starts[order], torch.full((empties,), total)])
    piece_len = torch.cat([run_len[order], torch.zeros(empties, dtype=torch.long)])
    piece_segment = torch.cat([segment[run_first][order], torch.full((empties,), cu_seqlens.numel() - 2)])
    first_of_segment = torch.searchsorted(piece_segment[:real], piece_segment[:real])
    piece_chunk = torch.cat([torch.arange(real) - first_of_segment, torch.full((empties,), -1)])
    rank_pieces = torch.empty(cp, width, dtype=torch.long)
    slot = torch.arange(real) - torch.repeat_interleave(torch.cumsum(runs_per_rank, 0) - runs_per_rank, runs_per_rank)
    rank_pieces[run_rank, slot] = natural
    filled = torch.arange(width)[None, :] < runs_per_rank[:, None]
    rank_pieces[~filled] = torch.arange(real, real + empties)
    return Layout(kind, cp, cu_seqlens, piece_start, piece_len, piece_segment, piece_chunk, rank_pieces)


def file_layout(cu_seqlens: torch.Tensor, cp: int, index_map: torch.Tensor) -> Layout:
    """The ``file`` layout of ``--layout-from`` indices, after checking they fit ``cp`` ranks and the row."""
    held_by = index_map.shape[0] if index_map.dim() else 1
    if index_map.dim() != 2 or held_by != cp:
        raise InputError(f"--layout-from holds {held_by} rank(s) of indices but --cp is {cp}",
                         where="--layout-from", fix=f"pass --cp {held_by} (one index tensor per rank)")
    checked = check_index_map(index_map, int(cu_seqlens[-1]), where="--layout-from")
    return layout_from_indices("file", check_cu_seqlens(cu_seqlens), cp, checked)


def load_index_map(path: str, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Read ``--layout-from FILE``: a ``.pt``/``.safetensors`` dict whose ``global_indices`` entry is one
    ``[cp, T/cp]`` tensor or (``.pt``) a list of equal-length per-rank 1-D tensors."""
    from pathlib import Path

    from cpinspect.core.files import read_file

    entries = read_file(Path(path))
    loaded = entries.get("global_indices")
    fix = "save {'global_indices': [rank0_indices, rank1_indices, ...]} (each rank's global positions, in local order)"
    if loaded is None:
        raise InputError(f"{path} has no 'global_indices' entry (it has {', '.join(sorted(entries)) or 'none'})",
                         where=path, fix=fix)
    if isinstance(loaded, (list, tuple)):
        if not loaded or not all(isinstance(t, torch.Tensor) for t in loaded):
            raise InputError(f"{path}: 'global_indices' must hold one index tensor per rank", where=path, fix=fix)
        lengths = sorted({int(t.numel()) for t in loaded})
        if len(lengths) != 1:
            raise InputError(f"{path}: the {len(loaded)} ranks hold shares of different lengths {lengths}, but "
                             "every rank must hold an equal share", where=path, fix=fix)
        loaded = torch.stack([t.reshape(-1) for t in loaded])
    if not isinstance(loaded, torch.Tensor):
        raise InputError(f"{path}: 'global_indices' is a {type(loaded).__name__}, not index tensors",
                         where=path, fix=fix)
    return check_index_map(loaded, int(cu_seqlens[-1]), where=path)
