"""The per-call plan of the training-path selection: host bounds, host checks, the table cache.

The host-side bounds (eager calls with host ``cu_seqlens`` and a CUDA mask) are checked here as
arithmetic against the local piece starts written out from the zigzag definition; the CUDA tests
(``tests/process/test_gpu_sync.py``) run them end to end against the literal oracle. The cache
tests pin what a captured CUDA graph relies on: a table it read is never dropped.
"""

import numpy as np
import pytest
import torch

from cpinspect.core import selection_plan
from cpinspect.core.selection_plan import check_host_cu_seqlens, write_host_bounds, zigzag_bounds, zigzag_tables


def literal_piece_starts(cu, cp):
    """Local start of each of a rank's 2S pieces, then the row's end: chunk lengths laid end to end."""
    starts, at = [], 0
    for s in range(len(cu) - 1):
        length = cu[s + 1] - cu[s]
        halves = [length // 2, length - length // 2] if cp == 1 else [length // (2 * cp)] * 2
        for half in halves:
            starts.append(at)
            at += half
    return starts + [at]


def random_cu(generator, segments, cp):
    unit = 2 if cp == 1 else 2 * cp
    lengths = torch.randint(0, 9, (segments,), generator=generator) * unit + (
        torch.randint(0, 2, (segments,), generator=generator) if cp == 1 else 0)  # odd lengths at cp 1
    return [0, *torch.cumsum(lengths, 0).tolist()]


@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
def test_host_bounds_are_the_literal_piece_starts_and_equal_the_device_formula(cp):
    generator = torch.Generator().manual_seed(cp)
    for _ in range(40):
        segments = int(torch.randint(1, 12, (1,), generator=generator))
        cu = random_cu(generator, segments, cp)
        out = np.empty(2 * segments + 1, dtype=np.int64)
        write_host_bounds(out, np.array(cu, dtype=np.int64), cp)
        assert out.tolist() == literal_piece_starts(cu, cp)
        pair, _ = zigzag_tables(segments, cp, 0, torch.device("cpu"))
        device_formula = zigzag_bounds(torch.tensor(cu), cp, pair, cu[-1] // cp)[: 2 * segments + 1]
        assert out.tolist() == device_formula.tolist()


BAD_CU = [  # (cu, cp, message): every refusal of the host checks
    ([4, 8, 16], 2, "cu_seqlens\\[0\\] is 4: cu_seqlens must start at 0"),
    ([0, 12, 8, 16], 2, "cu_seqlens\\[2\\] is 8, below cu_seqlens\\[1\\] = 12"),
    ([0, 16, 0, 16], 2, "cu_seqlens\\[2\\] is 0, below cu_seqlens\\[1\\] = 16"),  # a decrease by a multiple of 2cp
    ([0, 6, 12], 2, "segment 0 has physical length 6, not divisible by 2\\*cp = 4"),
    ([0, 12, 16, 24], 3, "segment 1 has physical length 4, not divisible by 2\\*cp = 6"),
    ([0, 18, 6, 24], 3, "cu_seqlens\\[2\\] is 6, below cu_seqlens\\[1\\] = 18"),  # not a power of two
    ([0, 8, 4], 1, "cu_seqlens\\[2\\] is 4, below cu_seqlens\\[1\\] = 8"),
    ([0, 2**31 - 8, 2**31 - 2], 2, "segment 1 has physical length 6, not divisible by 2\\*cp = 4"),
]


@pytest.mark.parametrize("numpy_path", [True, False])
@pytest.mark.parametrize("cu, cp, message", BAD_CU)
def test_host_checks_refuse_bad_cu_seqlens_through_numpy_and_torch_alike(cu, cp, message, numpy_path, monkeypatch):
    if not numpy_path:
        monkeypatch.setattr(selection_plan, "_np", None)
    for dtype in (torch.int32, torch.int64):
        if max(cu) >= 2**31 and dtype == torch.int32:
            continue
        with pytest.raises(ValueError, match=message):
            check_host_cu_seqlens(torch.tensor(cu, dtype=dtype), cu[-1] // cp, cp)


@pytest.mark.parametrize("numpy_path", [True, False])
def test_host_checks_accept_every_valid_cu_seqlens(numpy_path, monkeypatch):
    if not numpy_path:
        monkeypatch.setattr(selection_plan, "_np", None)
    generator = torch.Generator().manual_seed(7)
    for cp in (1, 2, 3, 4, 6, 8):
        for _ in range(20):
            cu = random_cu(generator, int(torch.randint(1, 10, (1,), generator=generator)), cp)
            for dtype in (torch.int32, torch.int64):
                check_host_cu_seqlens(torch.tensor(cu, dtype=dtype), cu[-1] // cp, cp)  # raises if refused


def test_int32_lengths_that_wrap_around_are_still_refused():
    """cu values near the int32 limit: a decrease computed in int32 would wrap to a positive length."""
    cu = torch.tensor([0, 2**31 - 16, -(2**31) + 16, 32], dtype=torch.int32)
    with pytest.raises(ValueError, match="below cu_seqlens\\[1\\]"):
        check_host_cu_seqlens(cu, 16, 2)


def test_a_table_read_during_capture_is_never_dropped_and_outlives_its_replacement(monkeypatch):
    """What a captured CUDA graph needs: the tensors it read stay alive (the graph holds no reference)."""
    monkeypatch.setattr(selection_plan, "_TABLES", {})
    monkeypatch.setattr(selection_plan, "_VIEWS", {})
    monkeypatch.setattr(selection_plan, "_PINNED", set())
    monkeypatch.setattr(selection_plan, "_RETIRED", [])
    cpu = torch.device("cpu")
    captured_pair, _ = zigzag_tables(3, 2, 0, cpu)
    steps_view = selection_plan.multiples(4, 10, torch.int64, cpu)
    monkeypatch.setattr(selection_plan, "_capturing", lambda device: True)  # as inside torch.cuda.graph
    assert zigzag_tables(3, 2, 0, cpu)[0] is captured_pair
    assert selection_plan.multiples(4, 10, torch.int64, cpu) is steps_view
    monkeypatch.setattr(selection_plan, "_capturing", lambda device: False)
    for segments in range(4, 4 + 2 * selection_plan._MAX_TABLES):  # far more shapes than the cache keeps
        zigzag_tables(segments, 2, 0, cpu)
        selection_plan.multiples(4, 10 + segments, torch.int64, cpu)
    assert zigzag_tables(3, 2, 0, cpu)[0] is captured_pair
    assert selection_plan.multiples(4, 10, torch.int64, cpu) is steps_view
    assert len(selection_plan._TABLES) <= selection_plan._MAX_TABLES + 1
    assert zigzag_tables(4, 2, 0, cpu)[0] is not None  # unpinned keys were dropped and are rebuilt
    assert steps_view.tolist() == [4 * k for k in range(1, 11)]  # its grown base was replaced, not freed


def test_unpinned_tables_are_dropped_oldest_first(monkeypatch):
    monkeypatch.setattr(selection_plan, "_TABLES", {})
    monkeypatch.setattr(selection_plan, "_PINNED", set())
    cpu = torch.device("cpu")
    first, _ = zigzag_tables(1, 2, 0, cpu)
    for segments in range(2, 2 + selection_plan._MAX_TABLES):
        zigzag_tables(segments, 2, 0, cpu)
    assert ("zigzag", 1, 2, 0, cpu) not in selection_plan._TABLES
    assert zigzag_tables(1, 2, 0, cpu)[0] is not first
    assert len(selection_plan._TABLES) == selection_plan._MAX_TABLES


def test_threads_that_fill_the_cache_at_once_never_collide(monkeypatch):
    """The simulated ranks are threads: inserts and evictions of several ranks at once (a KeyError before the lock)."""
    import sys
    import threading

    monkeypatch.setattr(selection_plan, "_TABLES", {})
    monkeypatch.setattr(selection_plan, "_PINNED", set())
    monkeypatch.setattr(selection_plan, "_MAX_TABLES", 8)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter allows
    errors = []

    def fill(worker):
        try:
            for i in range(300):
                zigzag_tables(1 + (i * 7 + worker) % 50, 2, worker % 2, torch.device("cpu"))
                selection_plan._PINNED.add(("zigzag", 1 + i % 5, 2, 0, torch.device("cpu")))
        except Exception as error:  # noqa: BLE001 - the test reports every thread's failure
            errors.append(repr(error))

    try:
        threads = [threading.Thread(target=fill, args=(w,)) for w in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
