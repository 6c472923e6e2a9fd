"""What the selection needs from ``cu_seqlens`` and the layout alone: bounds, index tables, checks.

The index tables depend only on ``(S, cp, rank)``: built once, cached.

Two small integer tables turn the per-call work into a handful of fixed-shape kernels
(:mod:`cpinspect.core.selection`):

* ``later`` ``[cp * 2S]``: for every entry of the all-gathered count table (rank ``r'``, local
  piece ``j``), the first of *this* rank's pieces that comes after it in natural order; this
  rank's own entries point past its last piece (``2S``). A vision token of local piece ``k``
  has, before it in natural order, exactly its own rank's vision tokens before it plus the
  gathered counts whose ``later`` is at most ``k``: one scatter-add and one running sum give
  every row (:func:`cpinspect.core.selection.dense_rows`).
* ``pair`` ``[2S + 1 + cp * 2S, 2]``: local bound ``k`` of this rank's pieces is
  ``units[pair[k, 0]] + units[pair[k, 1]]`` with ``units = cu // 2cp`` (the chunk length of a
  segment is ``(cu[s+1] - cu[s]) / 2cp``). Rank ``r`` holds chunks ``r`` and ``2cp-1-r`` of
  every segment back to back, so its local row starts segment ``s`` at ``2 units[s]`` and the
  second chunk at ``units[s] + units[s+1]``. The rows after the first ``2S + 1`` are
  ``pair[later]``: the same gather yields the bounds the scatter-add needs, no second index.

``units`` is one ``bucketize`` of ``cu_seqlens`` by ``2cp, 4cp, ...`` (:func:`multiples`, in
``cu_seqlens``' own dtype, so an int32 ``cu`` needs no cast): it divides and clamps to
``[0, T // 2]`` at once, so any device ``cu_seqlens`` give bounds inside the local row. At
cp 1 (chunks need not have equal halves there) the bounds are ``(cu[pair[k, 0]] +
cu[pair[k, 1]]) // 2``, one kernel more.

The cache holds device tensors keyed by ``(segments, cp, rank, device)`` (the steps by
``(step, dtype, device)``), at most 64 keys, oldest dropped first: a CUDA graph captured with a
table reads it at every replay, so keep fewer captured shapes per process than that. Nothing is added to it
while ``torch.compile`` traces (a table missing then is built inside the graph, from ``arange``
arithmetic; one already cached becomes a graph input) or while a CUDA graph is being captured (a
table made there would hold no values until the graph is replayed).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def zigzag_tables(segments: int, cp: int, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pair, later)`` for rank ``rank`` of ``cp`` under per-document zigzag, on ``device``."""
    pair, later = _cached(("zigzag", segments, cp, rank, device),
                          lambda: build_zigzag_tables(segments, cp, rank, device), device)
    return pair, later


def multiples(step: int, count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[count]`` ``step, 2 step, ..., count step`` in ``dtype``: bucketizing by it divides and clamps.

    One table per ``(step, dtype, device)``, grown to the next power of two when a longer row comes,
    so rows of changing length reuse it (a slice is a view: no kernel). Values past the dtype's
    range are clamped to its maximum (they lie past any ``cu_seqlens`` of that dtype anyway).
    """
    key = ("steps", step, dtype, device)
    steps = _TABLES.get(key)
    if steps is None or steps[0].numel() < count:
        size = 1 << max(count - 1, 1).bit_length()

        def build() -> tuple[torch.Tensor]:
            values = torch.arange(1, size + 1, device=device) * step
            return (values.clamp_(max=torch.iinfo(dtype).max).to(dtype),)

        steps = _cached(key, build, device, replace=True)
    return steps[0][:count]


def minus_one(device: torch.device) -> torch.Tensor:
    """A 0-dim int64 ``-1`` on ``device``: ``torch.where`` with it launches no fill (a Python ``-1`` does)."""
    return _cached(("minus_one", device), lambda: (torch.full((), -1, dtype=torch.long, device=device),), device)[0]


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
    later = torch.where(sender == rank, 2 * segments, later).reshape(-1)
    return torch.cat([pair, pair[later]]), later


def zigzag_bounds(cu: torch.Tensor, cp: int, pair: torch.Tensor, local_tokens: int) -> torch.Tensor:
    """Local bounds ``[len(pair)]``: the ``2S + 1`` piece bounds, then the bound of every ``later`` entry.

    Three kernels from cp 2 on: one ``bucketize`` of ``cu`` by ``2cp, 4cp, ...`` (``units``,
    clamped to ``[0, local_tokens // 2]``), the gather through ``pair`` and the pair sum; so device
    ``cu_seqlens`` that disagree with the mask (found later by :meth:`VisionRowMap.check`) can
    never index out of bounds. For a valid layout these are exactly the chunk starts.
    """
    if cu.dtype not in (torch.int32, torch.int64):
        cu = cu.to(torch.int64)
    if cp == 1:  # odd segments are fine at cp 1: halve the pair sum instead
        twice = cu.take(pair).sum(-1, dtype=torch.long)
        return torch.bucketize(twice, multiples(2, local_tokens, torch.long, cu.device), right=True)
    units = torch.bucketize(cu, multiples(2 * cp, local_tokens // 2, cu.dtype, cu.device), right=True)
    return units.take(pair).sum(-1)


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
    """The checks that are free when ``cu_seqlens`` lives on the host: mask length, order, divisibility.

    Eagerly they raise ``ValueError`` naming the numbers. While ``torch.compile`` traces they
    become ``torch._assert_async`` on the host tensors (part of the graph, no device read), which
    raise ``RuntimeError`` with a fixed message when the compiled call runs.
    """
    lengths = torch.diff(cu)
    if torch.compiler.is_compiling():
        torch._assert_async(cu[-1] == local_tokens * cp, _MASK_LENGTH_MESSAGE)
        torch._assert_async((cu[0] == 0) & (lengths >= 0).all(), _ORDER_MESSAGE)
        if cp > 1:
            torch._assert_async((lengths % (2 * cp) == 0).all(), _DIVISIBLE_MESSAGE)
        return
    if cu.numel() == 0:
        raise ValueError("cu_seqlens is empty: it needs the start 0 and the end of every segment")
    ends = cu[:: cu.numel() - 1].tolist() if cu.numel() > 1 else cu.tolist() * 2  # no tensor operator
    first, last = ends[0], ends[-1]
    check_mask_length(local_tokens, last, cp)
    if first != 0 or (lengths.numel() and int(lengths.min()) < 0):
        bad = int(torch.nonzero(lengths < 0)[0]) + 1 if first == 0 else 0
        below = f", below cu_seqlens[{bad - 1}] = {int(cu[bad - 1])}" if bad else ""
        raise ValueError(f"cu_seqlens[{bad}] is {int(cu[bad])}{below}: cu_seqlens must start at 0 and never "
                         "decrease (the boundaries of the packed row)")
    if cp > 1 and bool((lengths % (2 * cp)).any()):
        seg = int(torch.nonzero(lengths % (2 * cp))[0])
        raise ValueError(
            f"segment {seg} has physical length {int(lengths[seg])}, not divisible by 2*cp = {2 * cp}: "
            "the zigzag layout needs every physical segment padded to a multiple of 2*cp"
        )


_ORDER_MESSAGE = "local_vision_row_map: cu_seqlens must start at 0 and never decrease"
_MASK_LENGTH_MESSAGE = ("local_vision_row_map: cu_seqlens[-1] differs from cp x the local vision mask's length; "
                        "the mask must be this rank's whole local row")
_DIVISIBLE_MESSAGE = ("local_vision_row_map: a segment length of cu_seqlens is not a multiple of 2*cp; the zigzag "
                      "layout needs every physical segment padded to a multiple of 2*cp")
