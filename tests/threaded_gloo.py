"""Real gloo process groups for N ranks as threads of this process, registered for torch.compile.

``torch.compile`` turns ``dist.all_gather_into_tensor`` into a functional collective, which finds
its group by name in c10d's registry. The simulated group of :mod:`cpinspect.groups.simulated`
is not registered (and its ranks share one name), so the compile tests use real gloo groups
instead: one ``ProcessGroupGloo`` backend per rank over a shared ``HashStore``, each registered
under the same name in thread-isolation mode (every thread resolves the name to its own rank).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

_C10D = torch._C._distributed_c10d
_NAME = "cpinspect-test-gloo"
_runs = 0
_lock = threading.Lock()


def run_gloo_threads(cp: int, fn: Callable[[dist.ProcessGroup], Any], timeout: float = 120.0) -> list[Any]:
    """``[fn(group_of_rank_r) for r in range(cp)]``, the ranks running at once; re-raises a rank's error."""
    global _runs
    with _lock:
        _runs += 1
        prefix = f"run{_runs}"
    _C10D._set_thread_isolation_mode(True)
    store = dist.HashStore()
    results: list[Any] = [None] * cp
    errors: list[BaseException | None] = [None] * cp

    def body(rank: int) -> None:
        try:
            backend = dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, cp, timedelta(seconds=timeout))
            group = dist.ProcessGroup(rank, cp)
            group._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, backend)
            group._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
            group._set_group_name(_NAME)
            _C10D._register_process_group(_NAME, group)
            try:
                results[rank] = fn(group)
            finally:
                _C10D._unregister_process_group(_NAME)
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            errors[rank] = error

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(cp)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout)
    finally:
        _C10D._set_thread_isolation_mode(False)  # torch's default; nothing else here turns it on
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"gloo ranks still running after {timeout} s")
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results
