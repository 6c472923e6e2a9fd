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
``(step, dtype, device)``, their views by row length apart), at most 64 keys per store, oldest
dropped first, except that a table read while a CUDA graph is being captured is pinned: never
dropped, and kept alive when a longer row replaces it, because every replay of that graph reads
it. Nothing is added to it while ``torch.compile`` traces (a table missing then is built inside
the graph, from ``arange`` arithmetic; one already cached becomes a graph input) or while a CUDA
graph is being captured (a table made there would hold no values until the graph is replayed).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import torch

try:  # optional: the host checks of cu_seqlens are cheaper through it (see _scan_host)
    import numpy as _np
except ImportError:  # pragma: no cover - torch runs without numpy
    _np = None  # type: ignore[assignment]


def zigzag_tables(segments: int, cp: int, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pair, later)`` for rank ``rank`` of ``cp`` under per-document zigzag, on ``device``."""
    pair, later = _cached(("zigzag", segments, cp, rank, device),
                          lambda: build_zigzag_tables(segments, cp, rank, device), device)
    return pair, later


class ZigzagPlan(NamedTuple):
    """What one call reads that depends only on ``(S, cp, rank, T, cu dtype, device)``: one lookup per call."""

    pair: torch.Tensor
    later: torch.Tensor
    steps: torch.Tensor  # multiples() to bucketize cu_seqlens by
    zero: torch.Tensor  # zero_prefix()
    minus_one: torch.Tensor


def zigzag_plan(segments: int, cp: int, rank: int, local_tokens: int, dtype: torch.dtype,
                device: torch.device) -> ZigzagPlan:
    """The tables of one call, from one cache lookup (a plan holds its tensors, so a pinned plan keeps them alive)."""
    def build() -> ZigzagPlan:
        steps = (multiples(2, local_tokens, torch.long, device) if cp == 1
                 else multiples(2 * cp, local_tokens // 2, dtype, device))
        return ZigzagPlan(*zigzag_tables(segments, cp, rank, device), steps, zero_prefix(device), minus_one(device))

    return cast(ZigzagPlan, _cached((segments, cp, rank, local_tokens, dtype, device), build, device, store=_PLANS))


def multiples(step: int, count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[count]`` ``step, 2 step, ..., count step`` in ``dtype``: bucketizing by it divides and clamps.

    One table per ``(step, dtype, device)``, grown to the next power of two when a longer row comes,
    so rows of changing length reuse it. The ``[count]`` views of it are kept apart (a slice costs
    a dispatch per call; many row lengths must not push the index tables out). Values past the
    dtype's range are clamped to its maximum (they lie past any ``cu_seqlens`` of that dtype anyway).
    """
    def view() -> tuple[torch.Tensor]:
        key = ("steps", step, dtype, device)
        steps = _TABLES.get(key)
        if steps is None or steps[0].numel() < count:
            size = 1 << max(count - 1, 1).bit_length()

            def build() -> tuple[torch.Tensor]:
                values = torch.arange(1, size + 1, device=device) * step
                return (values.clamp_(max=torch.iinfo(dtype).max).to(dtype),)

            steps = _cached(key, build, device, replace=True)
        return (steps[0][:count],)

    return _cached((step, count, dtype, device), view, device, store=_VIEWS)[0]


def minus_one(device: torch.device) -> torch.Tensor:
    """A 0-dim int64 ``-1`` on ``device``: ``torch.where`` with it launches no fill (a Python ``-1`` does)."""
    return _cached(("minus_one", device), lambda: (torch.full((), -1, dtype=torch.long, device=device),), device)[0]


def zero_prefix(device: torch.device) -> torch.Tensor:
    """A ``[1]`` int64 ``0`` on ``device``: ``cat([zero, mask])`` is the running count's input in one call."""
    return _cached(("zero", device), lambda: (torch.zeros(1, dtype=torch.long, device=device),), device)[0]


Tables = dict[tuple[object, ...], tuple[torch.Tensor, ...]]


def _cached(key: tuple[object, ...], build: Callable[[], tuple[torch.Tensor, ...]], device: torch.device,
            replace: bool = False, store: Tables | None = None) -> tuple[torch.Tensor, ...]:
    store = _TABLES if store is None else store
    tables = None if replace else store.get(key)
    capturing = not torch.compiler.is_compiling() and _capturing(device)
    if tables is not None:  # while tracing too: dynamo lifts the cached tensors into graph inputs
        if capturing:
            _PINNED.add(key)
        return tables
    tables = build()
    if not torch.compiler.is_compiling() and not capturing:
        with _LOCK:  # the simulated ranks are threads: no other insert while this one scans the store
            old = store.pop(key, None)
            if old is not None and key in _PINNED:
                _RETIRED.append(old)  # a captured graph may still read it
            if len(store) >= _MAX_TABLES:
                evictable = next((k for k in store if k not in _PINNED), None)
                if evictable is not None:
                    store.pop(evictable)
            store[key] = tables
    return tables


_LOCK = threading.Lock()
_TABLES: Tables = {}
_VIEWS: Tables = {}
_PLANS: Tables = {}
_MAX_TABLES = 64  # per store; pinned keys do not count against eviction
# Keys read while a CUDA graph was being captured: never evicted, and kept alive when replaced,
# since every replay of that graph reads them (a graph holds no reference of its own).
_PINNED: set[tuple[object, ...]] = set()
_RETIRED: list[tuple[torch.Tensor, ...]] = []


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


def zigzag_bounds(cu: torch.Tensor, cp: int, pair: torch.Tensor, local_tokens: int,
                  steps: torch.Tensor | None = None) -> torch.Tensor:
    """Local bounds ``[len(pair)]``: the ``2S + 1`` piece bounds, then the bound of every ``later`` entry.

    Three kernels from cp 2 on: one ``bucketize`` of ``cu`` by ``2cp, 4cp, ...`` (``units``,
    clamped to ``[0, local_tokens // 2]``), the gather through ``pair`` and the pair sum; so device
    ``cu_seqlens`` that disagree with the mask (found later by :meth:`VisionRowMap.check`) can
    never index out of bounds. For a valid layout these are exactly the chunk starts. ``steps``
    is the plan's :func:`multiples` table (looked up here when not given).
    """
    if cu.dtype not in (torch.int32, torch.int64):
        cu = cu.to(torch.int64)
    if cp == 1:  # odd segments are fine at cp 1: halve the pair sum instead
        twice = cu.take(pair).sum(-1, dtype=torch.long)
        steps = multiples(2, local_tokens, torch.long, cu.device) if steps is None else steps
        return torch.bucketize(twice, steps, right=True)
    steps = multiples(2 * cp, local_tokens // 2, cu.dtype, cu.device) if steps is None else steps
    return torch.bucketize(cu, steps, right=True).take(pair).sum(-1)


def host_zigzag_bounds(values: Any, cp: int, device: torch.device) -> torch.Tensor | None:
    """The ``2S + 1`` local piece bounds of *validated* host ``cu_seqlens``, made on the host, on ``device``.

    ``values`` is what :func:`check_host_cu_seqlens` returned. For eager calls with host
    ``cu_seqlens`` and a CUDA mask: a few numpy calls on the values the checks already read,
    written into a pinned buffer from torch's caching host allocator and copied asynchronously (the
    allocator keeps the buffer until the copy has run). That is one copy instead of a copy, a
    ``bucketize``, a gather and a sum on the device. ``None`` where the device formula must run
    instead: no values (numpy missing, or a dtype it cannot view), while ``torch.compile`` traces,
    or while a CUDA graph is being captured (a capture must read the caller's own pinned buffer at
    every replay). The same bounds as :func:`zigzag_bounds` for valid ``cu_seqlens``.
    """
    if values is None or torch.compiler.is_compiling() or _capturing(device):
        return None
    staging = torch.empty(2 * values.size - 1, dtype=torch.int64, pin_memory=True)
    write_host_bounds(staging.numpy(), values.astype(_np.int64, copy=False), cp)
    return staging.to(device, non_blocking=True)


def write_host_bounds(bounds: Any, values: Any, cp: int) -> None:
    """Write the ``2S + 1`` piece bounds of valid int64 ``cu_seqlens`` ``values`` into ``bounds`` (numpy arrays)."""
    if cp == 1:  # (cu[k // 2] + cu[(k + 1) // 2]) // 2
        bounds[0::2] = values
        bounds[1::2] = (values[:-1] + values[1:]) // 2
    else:  # units[k // 2] + units[(k + 1) // 2], units = cu // 2cp
        units = values // (2 * cp)
        bounds[0::2] = 2 * units
        bounds[1::2] = units[:-1] + units[1:]


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


def check_host_cu_seqlens(cu: torch.Tensor, local_tokens: int, cp: int) -> Any:
    """The checks that are free when ``cu_seqlens`` lives on the host: mask length, order, divisibility.

    Eagerly they raise ``ValueError`` naming the numbers; a valid ``cu_seqlens`` costs one read
    of its ends and one fused test of every length (:func:`_scan_host`). While
    ``torch.compile`` traces they become ``torch._assert_async`` on the host tensors (part of the
    graph, no device read), which raise ``RuntimeError`` with a fixed message when the compiled
    call runs. Returns the values as a numpy array where numpy read them (else ``None``), for
    :func:`host_zigzag_bounds`.
    """
    if torch.compiler.is_compiling():
        lengths = torch.diff(cu)
        torch._assert_async(cu[-1] == local_tokens * cp, _MASK_LENGTH_MESSAGE)
        torch._assert_async((cu[0] == 0) & (lengths >= 0).all(), _ORDER_MESSAGE)
        if cp > 1:
            torch._assert_async((lengths % (2 * cp) == 0).all(), _DIVISIBLE_MESSAGE)
        return None
    if cu.numel() == 0:
        raise ValueError("cu_seqlens is empty: it needs the start 0 and the end of every segment")
    first, last, bad, values = _scan_host(cu, 2 * cp if cp > 1 else 1)
    check_mask_length(local_tokens, last, cp)
    if first == 0 and not bad:
        return values
    lengths = torch.diff(cu.to(torch.int64))
    if first != 0 or int(lengths.min()) < 0:
        at = int(torch.nonzero(lengths < 0)[0]) + 1 if first == 0 else 0
        below = f", below cu_seqlens[{at - 1}] = {int(cu[at - 1])}" if at else ""
        raise ValueError(f"cu_seqlens[{at}] is {int(cu[at])}{below}: cu_seqlens must start at 0 and never "
                         "decrease (the boundaries of the packed row)")
    seg = int(torch.nonzero(lengths % (2 * cp))[0])
    raise ValueError(
        f"segment {seg} has physical length {int(lengths[seg])}, not divisible by 2*cp = {2 * cp}: "
        "the zigzag layout needs every physical segment padded to a multiple of 2*cp"
    )


def _scan_host(cu: torch.Tensor, step: int) -> tuple[int, int, bool, Any]:
    """``(cu[0], cu[-1], bad, values)``: ``bad`` when a length is negative or not a multiple of ``step``.

    This is what a valid host ``cu_seqlens`` costs per call, so it is one pass over int64
    lengths (no wrap-around): through numpy where it is installed, whose calls on the host array
    cost a fraction of torch's dispatch, else the same test in torch. For a power-of-two ``step``
    both conditions are one bit test, ``lengths & (sign | step - 1)``.
    """
    mask = -(1 << 63) | (step - 1) if step & (step - 1) == 0 else None
    if _np is not None and cu.dtype in (torch.int32, torch.int64):
        try:
            values = cu.numpy()
        except (RuntimeError, TypeError):  # a tensor subclass or transform numpy cannot see: torch's path
            values = None
        if values is not None:
            lengths = _np.subtract(values[1:], values[:-1], dtype=_np.int64)
            count = _np.count_nonzero  # a C call; ndarray.any() goes through Python wrappers
            bad = bool(count(lengths & mask) if mask is not None else count(lengths % step) + count(lengths < 0))
            return int(values[0]), int(values[-1]), bad, values
    ends = cu[:: cu.numel() - 1].tolist() if cu.numel() > 1 else cu.tolist() * 2
    lengths_t = torch.diff(cu.to(torch.int64))
    if mask is not None:
        return ends[0], ends[-1], bool(lengths_t.bitwise_and(mask).any()), None
    return ends[0], ends[-1], bool((lengths_t % step).any()) or bool((lengths_t < 0).any()), None


_ORDER_MESSAGE = "local_vision_row_map: cu_seqlens must start at 0 and never decrease"
_MASK_LENGTH_MESSAGE = ("local_vision_row_map: cu_seqlens[-1] differs from cp x the local vision mask's length; "
                        "the mask must be this rank's whole local row")
_DIVISIBLE_MESSAGE = ("local_vision_row_map: a segment length of cu_seqlens is not a multiple of 2*cp; the zigzag "
                      "layout needs every physical segment padded to a multiple of 2*cp")
