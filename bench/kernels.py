"""Per call: how many operators, kernels and copies it enqueues (torch profiler), and its syncs.

* ``ops``: top-level ATen operators that do work, from the profiler's CPU events. Views,
  reshapes, allocations and no-op ``.to()`` calls are not counted (they launch nothing); an
  operator called by another operator is not counted twice. On the CPU this is the closest
  thing to a kernel count.
* ``kernels``: on CUDA, the device activities the profiler records (kernels, memcpy, memset).
* ``syncs``: on CUDA, the device-to-host synchronisations ``torch.cuda.set_sync_debug_mode("warn")``
  reports for one call.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

NO_WORK = frozenset({
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::_unsafe_view", "aten::view_as", "aten::as_strided",
    "aten::select", "aten::slice", "aten::narrow", "aten::expand", "aten::expand_as", "aten::unsqueeze",
    "aten::squeeze", "aten::t", "aten::transpose", "aten::permute", "aten::alias", "aten::detach", "aten::unbind",
    "aten::split", "aten::chunk", "aten::flatten", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg",
    "aten::result_type", "aten::to", "aten::scalar_tensor", "aten::resize_",
})


def _top_level_ops(prof: Any) -> Counter[str]:
    """Operators with no ATen caller: the ones the traced code itself issued."""
    names: Counter[str] = Counter()
    for event in prof.events():
        parent = event.cpu_parent
        if not event.name.startswith("aten::") or (parent is not None and parent.name.startswith("aten::")):
            continue
        if event.name == "aten::to" and any(c.name.startswith("aten::_to_copy") for c in event.cpu_children):
            names["aten::_to_copy"] += 1  # a real copy
        elif event.name not in NO_WORK:
            names[event.name] += 1
    return names


def count_per_call(fn: Callable[[], Any], device: str, calls: int = 5) -> tuple[float, float | None, Counter[str]]:
    """``(ops, kernels or None, op names)`` per call, averaged over ``calls`` calls after a warm-up."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    names = _top_level_ops(prof)
    kernels = None
    if device == "cuda":
        cuda = torch.autograd.DeviceType.CUDA
        kernels = sum(1 for e in prof.events() if e.device_type == cuda) / calls
    return sum(names.values()) / calls, kernels, Counter({k: v // calls for k, v in names.items()})


def count_syncs(fn: Callable[[], Any]) -> int:
    """Device-to-host synchronisations of one call (CUDA only)."""
    fn()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)
