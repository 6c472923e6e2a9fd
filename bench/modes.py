"""One rank's row map run three ways, side by side: eager, compiled, replayed from a CUDA graph.

Every mode goes through the same :class:`bench.replay.ReplayGroup` (its all-gather is one copy of
the counts every rank would send), on rank 0 of the case, and is checked against the oracle
before it is timed:

* ``eager``: ``local_vision_row_map(mask, cu, cp_group=g).row_of_position``;
* ``compiled``: ``torch.compile(..., fullgraph=True)`` of the two local stages,
  ``local_vision_counts`` and ``LocalCounts.row_map``, with the all-gather eager between them
  (the replay group is no registered c10d group, so the collective stays outside; with NCCL the
  whole ``local_vision_row_map`` compiles, as ``tests/capability/test_compile.py`` shows with gloo);
* ``graph replay`` (CUDA only): the eager call captured once in a ``torch.cuda.CUDAGraph``,
  then ``graph.replay()``.

With ``cu_seqlens`` on the host (pinned on CUDA, so that the copy can be captured) and on the
device; on the CPU the two are one form. Host time is how long the call takes to return with an
empty queue before it; device time (CUDA) is the span between CUDA events around the call.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.loop_reference import loop_vision_rows
from bench.replay import ReplayGroup, warm_up_then_capture
from cpinspect.core.selection import LocalCounts, local_vision_counts, local_vision_row_map

Call = Callable[[], Any]


def mode_calls(case: Any, device: str, backend: str) -> dict[str, Call]:
    """Name -> zero-argument call on rank 0 of ``case`` (the loop reference first)."""
    group = ReplayGroup(0, case.gathered)
    mask, cp = case.masks[0], case.cp
    calls: dict[str, Call] = {
        "loop reference": lambda: loop_vision_rows(mask, case.cu, cp_group=group, vision_embed_count=case.vision_total),
    }
    forms = {f", {form}" if form else "": cu for form, cu in cu_forms(case, device).items()}
    counts_fn = torch.compile(local_vision_counts, fullgraph=True, backend=backend)
    finish_fn = torch.compile(LocalCounts.row_map, fullgraph=True, backend=backend)
    for form, cu in forms.items():
        def eager(cu: torch.Tensor = cu) -> torch.Tensor:
            return local_vision_row_map(mask, cu, cp_group=group).row_of_position

        def compiled(cu: torch.Tensor = cu) -> torch.Tensor:
            counts = counts_fn(mask, cu, cp=cp, cp_rank=0)
            return finish_fn(counts, counts.gather(group)).row_of_position

        calls["eager" + form] = eager
        calls["compiled" + form] = compiled
        if device == "cuda":
            calls["graph replay" + form] = captured(eager)
    return calls


def cu_forms(case: Any, device: str) -> dict[str, torch.Tensor]:
    """The ``cu_seqlens`` forms every mode is timed with: int32 pinned on the host and int32 on the device
    (CUDA), or the one host tensor (CPU, where the two are one form, named "")."""
    if device == "cpu":
        return {"": case.cu.cpu()}
    return {"host cu": case.cu.cpu().to(torch.int32).pin_memory(), "device cu": case.cu.to(torch.int32)}


def captured(fn: Call) -> Call:
    """``fn`` captured in a CUDA graph (at the first call, after a warm-up on a side stream); then replays.

    Every replay writes the same output buffer, which the call returns.
    """
    state: dict[str, Any] = {}

    def replay() -> Any:
        if not state:
            state["graph"], state["out"] = warm_up_then_capture(fn)
        state["graph"].replay()
        return state["out"]

    return replay


def verify_modes(case: Any, calls: dict[str, Call]) -> dict[str, str]:
    """Check every mode's rows on rank 0 against the oracle (the row map: at the vision positions).

    A mode that raises (a compile or capture this machine cannot do) is removed from ``calls``
    and reported in the returned ``{name: error}``; a wrong answer raises ``AssertionError``.
    """
    mask = case.masks[0].cpu()
    failed = {}
    for name, fn in list(calls.items()):
        try:
            got = fn().cpu()
        except Exception as error:  # noqa: BLE001 - reported in the table, the other modes still run
            failed[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
            del calls[name]
            continue
        got = got if name == "loop reference" else got[mask]
        if not torch.equal(got, case.expected[0]):
            raise AssertionError(f"{name} differs from the oracle on rank 0 of {case.label}")
    return failed


def time_modes(calls: dict[str, Call], device: str, budget_s: float) -> dict[str, tuple[float, float | None]]:
    """Per mode: median host seconds and median device seconds (CUDA) per call.

    The modes take turns in blocks of calls (about 10 ms each), so load from other processes on
    a shared machine lands on all of them alike.
    """
    host: dict[str, list[float]] = {name: [] for name in calls}
    dev: dict[str, list[float]] = {name: [] for name in calls}
    deadline = time.perf_counter() + budget_s
    rounds = 0
    while rounds < 2 or time.perf_counter() < deadline:
        for name, fn in calls.items():
            fn()
            block_end = time.perf_counter() + 0.01
            while True:
                _one_call(fn, device, host[name], dev[name])
                if time.perf_counter() >= block_end:
                    break
        rounds += 1
    return {name: (statistics.median(host[name]), statistics.median(dev[name]) if dev[name] else None)
            for name in calls}


def _one_call(fn: Call, device: str, host: list[float], dev: list[float]) -> None:
    if device != "cuda":
        start = time.perf_counter()
        fn()
        host.append(time.perf_counter() - start)
        return
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    start = time.perf_counter()
    fn()
    host.append(time.perf_counter() - start)
    end.record()
    torch.cuda.synchronize()
    dev.append(begin.elapsed_time(end) / 1e3)
