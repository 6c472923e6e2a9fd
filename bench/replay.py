"""A process group that replays a known all-gather: time or capture one rank's call alone.

:class:`ReplayGroup` is rank ``rank`` of a group whose all-gather hands back what the real
collective would deliver (every rank's counts, computed beforehand from the full mask). The
benchmarks time each rank through it, so they compare per-rank work only, as a real job would
pay it next to an NCCL all-gather; the CUDA-graph test captures through it, because its
all-gather is one device-to-device copy (capturable) where the simulated group's is not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


class ReplayGroup(dist.ProcessGroup):
    """Rank ``rank`` of a group whose all-gather returns the precomputed ``[cp, ...]`` ``gathered``.

    With ``check_inputs`` the counts a rank sends are compared with its replayed row (a host
    read, so only outside CUDA-graph capture and sync-free timing).
    """

    def __init__(self, rank: int, gathered: torch.Tensor, *, check_inputs: bool = False) -> None:
        super().__init__(rank, gathered.shape[0])
        self._gathered = gathered
        self.check_inputs = check_inputs

    def _check(self, tensor: torch.Tensor) -> None:
        if self.check_inputs and not torch.equal(tensor.reshape(-1), self._gathered[self.rank()].reshape(-1)):
            raise AssertionError(f"rank {self.rank()} sent counts that differ from the replayed ones")

    def allgather(self, output_tensors: list[list[torch.Tensor]], input_tensors: list[torch.Tensor],
                  opts: object = None) -> dist.Work:
        (tensor,) = input_tensors
        self._check(tensor)
        for out, src in zip(output_tensors[0], self._gathered):
            out.copy_(src.view_as(out))
        return _done()

    def all_gather_single(self, output: torch.Tensor, tensor: torch.Tensor, opts: object = None) -> dist.Work:
        self._check(tensor)
        output.view(-1).copy_(self._gathered.reshape(-1))
        return _done()

    _allgather_base = all_gather_single


def _done() -> dist.Work:
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(None)
    return torch._C._distributed_c10d._create_work_from_future(future)


def warm_up_then_capture(fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run ``fn`` once on a side stream (that builds cpinspect's cached tables), then capture it in a CUDA graph.

    Returns ``(graph, output)``: every ``graph.replay()`` rewrites ``output``.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
