"""Time ``cpinspect.local_vision_rows`` against the per-segment loop reference, per rank.

    python -m bench.selection                 # CPU, and CUDA when available
    python -m bench.selection --device cuda   # one device only
    python -m bench.selection --quick         # small shapes: a smoke run

Each rank's call is timed alone, with a *replay group*: a ``ProcessGroup`` whose all-gather
hands back what the real collective would deliver (every rank's counts, computed from the full
mask beforehand). Both implementations go through it, so the table compares the per-rank work
only, as a real job would pay it next to an NCCL all-gather. Before timing, every rank's rows
from both implementations are checked against the oracle (:mod:`cpinspect.core.oracle`).

On CUDA the table also counts device-to-host synchronisations per call, by running one call
under ``torch.cuda.set_sync_debug_mode("warn")`` and counting the warnings.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bench.batches import packed_batch
from bench.kernels import count_per_call, count_syncs
from bench.loop_reference import loop_vision_rows
from bench.modes import mode_calls, time_modes, verify_modes
from bench.replay import ReplayGroup
from cpinspect.core.oracle import expected_rows, global_positions
from cpinspect.core.selection import local_vision_row_map, local_vision_rows

CONFIGS = (  # (tokens, segments, cp); vision fraction ~0.4
    (524_288, 256, 8),
    (1_048_576, 1_024, 16),
)
QUICK_CONFIGS = ((16_384, 32, 4),)
TARGETS = {"cpu": 10.0, "cuda": 20.0}


@dataclass
class Case:
    """One shape on one device: per-rank masks, the global cu_seqlens and the replayed counts."""

    label: str
    cp: int
    cu: torch.Tensor
    masks: list[torch.Tensor]
    expected: list[torch.Tensor]
    gathered: torch.Tensor
    vision_total: int


def build_case(tokens: int, segments: int, cp: int, device: str, seed: int = 0) -> Case:
    batch = packed_batch(tokens, segments, multiple=2 * cp, seed=seed)
    ids, cu = batch["input_ids"].reshape(-1), batch["cu_seqlens"].to(torch.long)
    full_mask = (ids == 151655) | (ids == 151656)
    held = [global_positions("zigzag", cu, cp, r) for r in range(cp)]
    expected = [expected_rows(full_mask, h) for h in held]
    chunk_counts = _chunk_counts(full_mask, cu, cp)
    gathered = torch.stack([torch.stack([chunk_counts[:, r], chunk_counts[:, 2 * cp - 1 - r]], 1).reshape(-1)
                            for r in range(cp)])
    label = f"{tokens:,} tok, {segments:,} seg, cp {cp}"
    return Case(label, cp, cu.to(device), [full_mask[h].to(device) for h in held], expected, gathered.to(device),
                int(full_mask.sum()))


def _chunk_counts(full_mask: torch.Tensor, cu: torch.Tensor, cp: int) -> torch.Tensor:
    """``[S, 2cp]`` vision tokens per chunk of every segment, from the full row (no layout code)."""
    bounds = cu[:-1, None] + (cu[1:] - cu[:-1])[:, None] // (2 * cp) * torch.arange(2 * cp + 1)
    running = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(full_mask.long(), 0)])
    return running[bounds[:, 1:]] - running[bounds[:, :-1]]


Impl = Callable[[Case, int, dist.ProcessGroup], torch.Tensor]


def impls() -> dict[str, Impl]:
    """Name -> call for one rank; each returns the compact rows in local order."""
    return {
        "loop reference": lambda c, r, g: loop_vision_rows(c.masks[r], c.cu, cp_group=g,
                                                           vision_embed_count=c.vision_total),
        "local_vision_rows": lambda c, r, g: local_vision_rows(c.masks[r], c.cu, cp_group=g,
                                                               vision_embed_count=c.vision_total),
        "… local_vision_count=n": lambda c, r, g: local_vision_rows(c.masks[r], c.cu, cp_group=g,
                                                                    local_vision_count=c.expected[r].numel()),
        "local_vision_row_map": lambda c, r, g: local_vision_row_map(c.masks[r], c.cu, cp_group=g).row_of_position,
    }


def verify(case: Case) -> None:
    """Every implementation's rows equal the oracle's on every rank (the row map: at vision positions)."""
    for rank in range(case.cp):
        group = ReplayGroup(rank, case.gathered, check_inputs=True)
        for name, fn in impls().items():
            got = fn(case, rank, group).cpu()
            if name == "local_vision_row_map":
                got = got[case.masks[rank].cpu()]
            if not torch.equal(got, case.expected[rank]):
                raise AssertionError(f"{name} differs from the oracle on rank {rank} of {case.label}")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_per_rank(case: Case, fns: dict[str, Impl], device: str, budget_s: float) -> dict[str, float]:
    """Per implementation: mean over ranks of each rank's median call time (seconds).

    The implementations take turns in blocks of calls (about 10 ms each, A B C D A B C D ...),
    so load from other processes on a shared machine lands on all of them alike, while each
    block still runs with its own data in cache, as a training step would.
    """
    per_rank: dict[str, list[float]] = {name: [] for name in fns}
    for rank in range(case.cp):
        group = ReplayGroup(rank, case.gathered)
        times: dict[str, list[float]] = {name: [] for name in fns}
        deadline = time.perf_counter() + budget_s / case.cp
        rounds = 0
        while rounds < 2 or time.perf_counter() < deadline:
            for name, fn in fns.items():
                fn(case, rank, group)  # the block's warm-up call
                block_end = time.perf_counter() + 0.01
                while True:
                    _sync(device)
                    start = time.perf_counter()
                    fn(case, rank, group)
                    _sync(device)
                    times[name].append(time.perf_counter() - start)
                    if time.perf_counter() >= block_end:
                        break
            rounds += 1
        for name in fns:
            per_rank[name].append(statistics.median(times[name]))
    return {name: statistics.fmean(values) for name, values in per_rank.items()}


def syncs_of(case: Case, fn: Impl) -> int:
    """Device-to-host synchronisations of one call on rank 0 (CUDA only)."""
    group = ReplayGroup(0, case.gathered)
    return count_syncs(lambda: fn(case, 0, group))


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    base = (f"{platform.node()} ({os.cpu_count()} cores, {cpu}, {torch.get_num_threads()} torch thread(s)), "
            f"Python {platform.python_version()}, torch {torch.__version__}")
    if device == "cuda":
        return base + f", {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return base


def run_device(device: str, configs: tuple[tuple[int, int, int], ...], budget_s: float) -> bool:
    """Print one table for ``device``; True when every config meets the target ratio."""
    print(f"\n## {device.upper()}: {machine(device)}")
    syncs = " syncs / call |" if device == "cuda" else ""
    header = "| shape | implementation | ms / rank | speed-up vs loop |" + syncs
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    met = True
    for tokens, segments, cp in configs:
        case = build_case(tokens, segments, cp, device)
        verify(case)
        timed = time_per_rank(case, impls(), device, budget_s)
        base = timed["loop reference"]
        for name, seconds in timed.items():
            ratio = base / seconds
            cells = [case.label, name, f"{seconds * 1e3:.3f}", f"{ratio:.1f}x"]
            if device == "cuda":
                cells.append(str(syncs_of(case, impls()[name])))
            print("| " + " | ".join(cells) + " |")
            if name == "local_vision_rows" and ratio < TARGETS[device]:
                met = False
        print(f"| {case.label} | target for local_vision_rows | | >= {TARGETS[device]:g}x |" + (" |" if device == "cuda"
                                                                                          else ""))
    return met


def run_modes(device: str, configs: tuple[tuple[int, int, int], ...], budget_s: float, backend: str) -> None:
    """Print the eager / compiled / graph-replay table for ``device`` (rank 0 of every shape)."""
    print(f"\n## {device.upper()}, rank 0: eager, torch.compile(fullgraph=True, backend={backend!r}), CUDA-graph "
          f"replay of local_vision_row_map(...).row_of_position; {machine(device)}")
    print("| shape | mode | host ms / call | device ms / call | ops / call | kernels+copies / call | syncs / call "
          "| host speed-up vs loop | device speed-up vs loop |")
    print("|---|---|---|---|---|---|---|---|---|")
    na = "not measured (no CUDA)" if device == "cpu" else "n/a"
    for tokens, segments, cp in configs:
        case = build_case(tokens, segments, cp, device)
        calls = mode_calls(case, device, backend)
        failed = verify_modes(case, calls)
        timed = time_modes(calls, device, budget_s)
        base_host, base_dev = timed["loop reference"]
        for name, (host, dev) in timed.items():
            ops, kernels, _ = count_per_call(calls[name], device)
            syncs = na if device == "cpu" else str(count_syncs(calls[name]))
            cells = [case.label, name, f"{host * 1e3:.3f}", na if dev is None else f"{dev * 1e3:.3f}", f"{ops:g}",
                     na if kernels is None else f"{kernels:g}", syncs,
                     f"{base_host / host:.1f}x", na if dev is None or base_dev is None else f"{base_dev / dev:.1f}x"]
            print("| " + " | ".join(cells) + " |")
        for name, error in failed.items():
            print(f"| {case.label} | {name} | failed: {error} | | | | | | |")
    if device == "cpu":
        print("\nGPU columns not measured: no CUDA device in this run (graph replay needs one).")


def profile(device: str, tokens: int, segments: int, cp: int) -> None:
    """The torch profiler's top operators over 100 calls of ``local_vision_rows`` on rank 0."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    case = build_case(tokens, segments, cp, device)
    group = ReplayGroup(0, case.gathered)
    call = impls()["local_vision_rows"]
    for _ in range(20):
        call(case, 0, group)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(100):
            call(case, 0, group)
        _sync(device)
    print(f"\n## torch profiler: 100 calls of local_vision_rows, {case.label}, {machine(device)}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=28))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="small shapes only (a smoke run)")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timing per shape (all implementations)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads on the CPU (default 1: one rank's share of a host; on a "
                             "small shared machine a wider pool stalls on descheduled workers)")
    parser.add_argument("--profile", action="store_true", help="print the torch profiler table for the first shape")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend for the compiled mode (default: inductor on CUDA, aot_eager on "
                             "the CPU, where inductor's C++ build takes minutes on a small machine)")
    parser.add_argument("--no-modes", action="store_true", help="skip the eager / compiled / graph-replay table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            raise SystemExit("CUDA is not available")
        devices.remove("cuda")
        print("(CUDA not available: CPU only)")
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    print("# bench/selection.py: per-rank time of local_vision_rows vs the per-segment .item() loop")
    print("Each rank timed alone (replay group for the one all-gather); mean over ranks of the median call.")
    if args.profile:
        for device in devices:
            profile(device, *configs[0])
        return
    verdicts = {d: run_device(d, configs, args.budget) for d in devices}
    if not args.no_modes:
        for device in devices:
            backend = args.compile_backend or ("inductor" if device == "cuda" else "aot_eager")
            run_modes(device, configs, args.budget, backend)
        if "cuda" not in devices:
            print("CUDA: not available in this run; eager/compiled/graph-replay GPU times, kernel counts and syncs "
                  "were not measured.")
    for device, met in verdicts.items():
        print(f"{device}: target >= {TARGETS[device]:g}x {'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
