"""What the selection needs from ``cu_seqlens`` and the layout alone: bounds, index tables, checks.

The index tables depend only on ``(S, cp, rank)``: built once, cached.

Two small integer tables turn the per-call work into a handful of fixed-shape kernels
(:mod:`cpinspect.core.selection`):

* ``pair`` ``[2S + 1, 2]``: the local bound ``k`` of this rank's pieces is
  ``(cu[pair[k, 0]] + cu[pair[k, 1]]) // (2cp)``. Rank ``r`` holds chunks ``r`` and ``2cp-1-r``
  of every segment back to back, so its local row starts segment ``s`` at ``cu[s] / cp`` (that
  is ``2 cu[s] / 2cp``) and the second chunk at ``(cu[s] + cu[s+1]) / 2cp``.
* ``later`` ``[cp * 2S]``: for every entry of the all-gathered count table (rank ``r'``, local
  piece ``j``), the first of *this* rank's pieces that comes after it in natural order; this
  rank's own entries point past its last piece (``2S``). A vision token of local piece ``k``
  has, before it in natural order, exactly its own rank's vision tokens before it plus the
  gathered counts whose ``later`` is at most ``k``: one scatter-add and one running sum give
  every row (:func:`cpinspect.core.selection.dense_rows`).

A third, ``[T]`` ``2cp, 4cp, ...`` (:func:`chunk_steps`), turns the division of the bounds and
their clamp into one ``bucketize``.

The cache holds device tensors keyed by ``(segments, cp, rank, device)`` (the steps by
``(cp, device)``). Nothing is added to it
while ``torch.compile`` traces (a table missing then is built inside the graph, from ``arange``
arithmetic; one already cached becomes a graph input) or while a CUDA graph is being captured (a
table made there would hold no values until the graph is replayed).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def zigzag_tables(segments: int, cp: int, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pair, later)`` for rank ``rank`` of ``cp`` under per-document zigzag, on ``device``."""
    pair, later = _cached(("zigzag", segments, cp, rank, str(device)),
                          lambda: build_zigzag_tables(segments, cp, rank, device), device)
    return pair, later


def chunk_steps(cp: int, local_tokens: int, device: torch.device) -> torch.Tensor:
    """``[local_tokens]`` ``2cp, 4cp, ..., 2cp * local_tokens``: bucketizing by it divides and clamps.

    One table per ``(cp, device)``, grown to the next power of two when a longer row comes, so
    rows of changing length reuse it (a slice is a view: no kernel).
    """
    key = ("steps", cp, str(device))
    steps = _TABLES.get(key)
    if steps is None or steps[0].numel() < local_tokens:
        size = 1 << max(local_tokens - 1, 1).bit_length()
        steps = _cached(key, lambda: (torch.arange(1, size + 1, device=device) * (2 * cp),), device, replace=True)
    return steps[0][:local_tokens]


def _cached(key: tuple[object, ...], build: Callable[[], tuple[torch.Tensor, ...]], device: torch.device,
            replace: bool = False) -> tuple[torch.Tensor, ...]:
    tables = None if replace else _TABLES.get(key)
    if tables is not None:  # while tracing too: dynamo lifts the cached tensors into graph inputs
        return tables
    tables = build()
    if not torch.compiler.is_compiling() and not _capturing(device):
        _TABLES.pop(key, None)
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.pop(next(iter(_TABLES)))
        _TABLES[key] = tables
    return tables


_TABLES: dict[tuple[object, ...], tuple[torch.Tensor, ...]] = {}
_MAX_TABLES = 64


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def build_zigzag_tables(segments: int, cp: int, rank: int,
                        device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables of the module docstring, from ``arange`` arithmetic (no data, no host copy)."""
    bound = torch.arange(2 * segments + 1, device=device)
    pair = torch.stack([bound // 2, (bound + 1) // 2], dim=1)
    # gathered entry (r', s, h) holds chunk c = r' (h = 0) or 2cp-1-r' (h = 1) of segment s
    sender = torch.arange(cp, device=device)[:, None, None]
    seg = torch.arange(segments, device=device)[None, :, None]
    half = torch.arange(2, device=device)[None, None, :]
    chunk = torch.where(half == 0, sender, 2 * cp - 1 - sender)
    later = 2 * seg + (chunk > rank).long() + (chunk > 2 * cp - 1 - rank).long()
    later = torch.where(sender == rank, 2 * segments, later)
    return pair, later.reshape(-1)


def zigzag_bounds(cu: torch.Tensor, cp: int, pair: torch.Tensor, local_tokens: int) -> torch.Tensor:
    """``[2S + 1]`` local piece bounds under zigzag: ``(cu[pair[:, 0]] + cu[pair[:, 1]]) // 2cp``.

    Three kernels: the gather, the pair sum, and one ``bucketize`` by :func:`chunk_steps`, which
    divides and clamps to ``[0, local_tokens]`` at once, so device ``cu_seqlens`` that disagree
    with the mask (found later by :meth:`VisionRowMap.check`) can never index out of bounds.
    """
    twice = cu[pair].sum(-1, dtype=torch.long)
    return torch.bucketize(twice, chunk_steps(cp, local_tokens, cu.device), right=True)


def piece_bounds(local_piece_len: torch.Tensor, local_tokens: int) -> torch.Tensor:
    """``[k + 1]`` local start of every piece, then the end of the last one (any layout)."""
    bounds = torch.zeros(local_piece_len.numel() + 1, dtype=torch.long, device=local_piece_len.device)
    torch.cumsum(local_piece_len, 0, out=bounds[1:])
    return bounds.clamp_(0, local_tokens)


def check_mask_length(local_tokens: int, global_tokens: int, cp: int) -> None:
    if local_tokens * cp != global_tokens:
        raise ValueError(
            f"the local vision mask has {local_tokens} entries, but cu_seqlens[-1] // cp = {global_tokens} // {cp} "
            f"= {global_tokens // cp}: the mask must be this rank's whole local row"
        )


def check_host_cu_seqlens(cu: torch.Tensor, local_tokens: int, cp: int) -> None:
    """The checks that are free when ``cu_seqlens`` lives on the host: mask length, divisibility.

    Eagerly they raise ``ValueError`` naming the numbers. While ``torch.compile`` traces they
    become ``torch._assert_async`` on the host tensors (part of the graph, no device read), which
    raise ``RuntimeError`` with a fixed message when the compiled call runs.
    """
    lengths = cu[1:] - cu[:-1]
    if torch.compiler.is_compiling():
        torch._assert_async(cu[-1] == local_tokens * cp, _MASK_LENGTH_MESSAGE)
        if cp > 1:
            torch._assert_async((lengths % (2 * cp) == 0).all(), _DIVISIBLE_MESSAGE)
        return
    check_mask_length(local_tokens, int(cu[-1]), cp)
    if cp > 1 and bool((lengths % (2 * cp)).any()):
        seg = int(torch.nonzero(lengths % (2 * cp))[0])
        raise ValueError(
            f"segment {seg} has physical length {int(lengths[seg])}, not divisible by 2*cp = {2 * cp}: "
            "the zigzag layout needs every physical segment padded to a multiple of 2*cp"
        )


_MASK_LENGTH_MESSAGE = ("local_vision_row_map: cu_seqlens[-1] differs from cp x the local vision mask's length; "
                        "the mask must be this rank's whole local row")
_DIVISIBLE_MESSAGE = ("local_vision_row_map: a segment length of cu_seqlens is not a multiple of 2*cp; the zigzag "
                      "layout needs every physical segment padded to a multiple of 2*cp")
