"""The gloo backend's group inside each rank process: real gloo collectives, announced to the watchdog first.

:class:`RecordingGroup` is a ``ProcessGroup`` whose methods describe each call exactly as the
simulated group fingerprints it (op, shapes, dtypes, root, reduce op, the uneven-split key; see
:mod:`cpinspect.groups.simulated` and :mod:`cpinspect.groups.collectives`), send that to the
watchdog, and *wait for its word* before the real gloo op runs. The watchdog answers only once
every rank has entered the same collective and what they passed fits together (all-to-all splits,
gather/scatter slots), so a mismatch is reported in the simulated group's words and never reaches
gloo, which would abort the process (``op.preamble.length <= op.nbytes``) or hang.

Point-to-point is announced the same way: each ``send``/``recv`` (and so ``isend``, ``irecv``,
``batch_isend_irecv``) is posted to the watchdog's mailbox, which matches it by (src, dst, tag) and
checks shape and dtype before gloo sees it; its ``Work`` tells the watchdog when the rank blocks in
``wait()`` and when that returns, so a send without a receive, or a ring of blocking sends (gloo's
send also waits for the receive), is named as the simulated group names it. ``async_op=True``
collectives complete at the call, as in the simulated group; only point-to-point is deferred.

Each group of the run has its own ``RecordingGroup`` (the world, a mesh's subgroups, each
``dist.new_group``: see :class:`cpinspect.groups.gloo.RankGroups`), and every event carries the
group's key, so the watchdog matches calls per group, as the simulated world does.

What gloo itself does not implement is refused before anything moves, with
:class:`GlooLimitError` naming the op (never the user's line): an all-gather whose ranks send
different sizes, and the list ``all_to_all`` with tensors of different shapes (the simulated
group and NCCL accept both).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from cpinspect.groups.callsite import call_site
from cpinspect.groups.collectives import _splits, require_contiguous
from cpinspect.groups.coordinator import CollectiveAbort, CollectiveCall, describe_tensors, reduce_op_name

Report = Callable[[tuple[Any, ...]], None]
Ask = Callable[[tuple[Any, ...]], "bytes | None"]


class GlooLimitError(NotImplementedError):
    """A call gloo itself does not implement (torch's ``ProcessGroupGloo``): the backend's limit, not the user's bug."""

    def __init__(self, op: str, why: str) -> None:
        super().__init__(f"{op} is not implemented by gloo ({why}); NCCL and cpinspect's simulated group accept it, so "
                         "this is a limit of the gloo backend, not an error in your code: run it under the simulated "
                         "group (--backend threads)")


def _root(opts: Any) -> int:
    return int(getattr(opts, "rootRank", 0))


class RecordingGroup(dist.ProcessGroup):
    """A real gloo group that has the watchdog check each collective and send/receive before it runs.

    Recorded: all_gather (equal sizes: uneven ones raise :class:`GlooLimitError`),
    all_gather_into_tensor, all_reduce, broadcast, barrier, reduce, all_to_all (equal shapes),
    all_to_all_single, reduce_scatter, reduce_scatter_tensor, gather, scatter, send and recv (with
    everything torch builds on them: the object collectives, isend/irecv, batch_isend_irecv).
    Any other op still runs on the real gloo backend, unrecorded.
    """

    def __init__(self, inner: dist.ProcessGroup, report: Report, ask: Ask, gid: Any = None, label: str = "") -> None:
        super().__init__(inner.rank(), inner.size())
        self._inner = inner
        self.gid = gid  # the watchdog's name for this group: None for the world, else the subgroup's key
        self.label = label
        self._report = report
        self._ask = ask
        self._seq = 0
        self._p2p = 0
        self.released = False  # the watchdog said "exit" while this rank waited for its word
        cpu = torch.device("cpu")
        self._register_backend(cpu, dist.ProcessGroup.BackendType.GLOO, inner._get_backend(cpu))
        self._set_default_backend(dist.ProcessGroup.BackendType.GLOO)

    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return "gloo"

    def _answer(self, event: tuple[Any, ...]) -> None:
        word = self._ask(event)
        if word is not None and word.startswith(b"err:"):
            raise ValueError(word[4:].decode())
        if word not in (b"go", b"ok"):
            self.released = True
            raise CollectiveAbort("the run was stopped by the watchdog while this rank waited (another rank's "
                                  "failure is the report)")

    def _run(self, op: str, tensors: Sequence[torch.Tensor], detail: str, start: Callable[[], dist.Work],
             key: tuple[Any, ...] = (), meta: Any = None) -> dist.Work:
        shapes, dtypes = describe_tensors(tensors)
        call = CollectiveCall(self._seq, op, shapes, dtypes, detail, call_site(3), key)
        self._seq += 1
        self._answer(("enter", self.gid, call, meta))
        work = start()
        work.wait()
        self._report(("left", self.gid, call.seq))
        return work

    def allgather(self, output_tensors: list[list[torch.Tensor]], input_tensors: list[torch.Tensor],
                  opts: Any = None) -> dist.Work:
        opts = opts if opts is not None else dist.AllgatherOptions()
        (tensor,) = input_tensors
        out_shapes, out_dtypes = describe_tensors(output_tensors[0])
        uneven = any(shape != tuple(tensor.shape) for shape in out_shapes)
        if uneven:
            raise GlooLimitError(f"all_gather with different sizes per rank (out={[list(s) for s in out_shapes]})",
                                 "ProcessGroupGloo::allgather needs every rank's tensor to have the same size")
        return self._run("all_gather", input_tensors, "", lambda: self._inner.allgather(output_tensors,
                         input_tensors, opts), key=(out_shapes, out_dtypes))

    def all_gather_single(self, output: torch.Tensor, tensor: torch.Tensor, opts: Any = None) -> dist.Work:
        opts = opts if opts is not None else dist.AllgatherOptions()
        require_contiguous("all_gather_into_tensor", self.rank(), output=output, input=tensor)
        inner = getattr(self._inner, "all_gather_single", None) or self._inner._allgather_base  # older torch
        return self._run("all_gather_into_tensor", [tensor], "", lambda: inner(output, tensor, opts))

    _allgather_base = all_gather_single

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        opts = opts if opts is not None else dist.AllreduceOptions()
        return self._run("all_reduce", tensors, f"op={reduce_op_name(opts)}",
                         lambda: self._inner.allreduce(tensors, opts))

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        opts = opts if opts is not None else dist.BroadcastOptions()
        return self._run("broadcast", tensors, f"src={_root(opts)}", lambda: self._inner.broadcast(tensors, opts))

    def barrier(self, opts: Any = None) -> dist.Work:
        opts = opts if opts is not None else dist.BarrierOptions()
        return self._run("barrier", [], "", lambda: self._inner.barrier(opts))

    def reduce(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        opts = opts if opts is not None else dist.ReduceOptions()
        return self._run("reduce", tensors, f"dst={_root(opts)}, op={reduce_op_name(opts)}",
                         lambda: self._inner.reduce(tensors, opts))

    def alltoall_base(self, output: torch.Tensor, tensor: torch.Tensor, output_split_sizes: list[int],
                      input_split_sizes: list[int], opts: Any = None) -> dist.Work:
        opts = opts if opts is not None else dist.AllToAllOptions()
        size = self.size()
        require_contiguous("all_to_all_single", self.rank(), output=output, input=tensor)
        sends = _splits(input_split_sizes, tensor.shape[0] if tensor.dim() else 0, size, "the input")
        receives = _splits(output_split_sizes, output.shape[0] if output.dim() else 0, size, "the output")
        detail = f"in_splits={sends}, out_splits={receives}" if input_split_sizes or output_split_sizes else ""
        key = (tuple(tensor.shape[1:]), tensor.dtype, tuple(output.shape[1:]), output.dtype)
        return self._run("all_to_all_single", [tensor], detail,
                         lambda: self._inner.alltoall_base(output, tensor, output_split_sizes, input_split_sizes, opts),
                         key=key, meta=(sends, receives))

    def alltoall(self, output_tensors: list[torch.Tensor], input_tensors: list[torch.Tensor],
                 opts: Any = None) -> dist.Work:
        opts = opts if opts is not None else dist.AllToAllOptions()
        key = (len(input_tensors), len(output_tensors), tuple(str(t.dtype) for t in input_tensors))
        meta = ([tuple(t.shape) for t in output_tensors], [tuple(t.shape) for t in input_tensors])
        if len({*meta[0], *meta[1]}) > 1:
            raise GlooLimitError(f"all_to_all with tensors of different shapes ({[list(s) for s in meta[1]]} in, "
                                 f"{[list(s) for s in meta[0]]} out)", "ProcessGroupGloo::alltoall needs every "
                                 "tensor to have the same shape; all_to_all_single with split sizes works")
        return self._run("all_to_all", input_tensors, "",
                         lambda: self._inner.alltoall(output_tensors, input_tensors, opts), key=key, meta=meta)

    def reduce_scatter(self, output_tensors: list[torch.Tensor], input_tensors: list[list[torch.Tensor]],
                       opts: Any = None) -> dist.Work:
        opts = opts if opts is not None else dist.ReduceScatterOptions()
        (output,), (inputs,) = output_tensors, input_tensors
        return self._run("reduce_scatter", [output, *inputs], f"op={reduce_op_name(opts)}",
                         lambda: self._inner.reduce_scatter(output_tensors, input_tensors, opts))

    def reduce_scatter_single(self, output: torch.Tensor, tensor: torch.Tensor, opts: Any = None) -> dist.Work:
        opts = opts if opts is not None else dist.ReduceScatterOptions()
        require_contiguous("reduce_scatter_tensor", self.rank(), output=output, input=tensor)
        inner = getattr(self._inner, "reduce_scatter_single", None) or self._inner._reduce_scatter_base
        return self._run("reduce_scatter_tensor", [output, tensor], f"op={reduce_op_name(opts)}",
                         lambda: inner(output, tensor, opts))

    _reduce_scatter_base = reduce_scatter_single

    def gather(self, output_tensors: list[list[torch.Tensor]], input_tensors: list[torch.Tensor],
               opts: Any = None) -> dist.Work:
        opts = opts if opts is not None else dist.GatherOptions()
        outputs = output_tensors[0] if output_tensors else []
        return self._run("gather", input_tensors, f"dst={_root(opts)}",
                         lambda: self._inner.gather(output_tensors, input_tensors, opts),
                         meta=(_root(opts), len(outputs)))

    def scatter(self, output_tensors: list[torch.Tensor], input_tensors: list[list[torch.Tensor]],
                opts: Any = None) -> dist.Work:
        opts = opts if opts is not None else dist.ScatterOptions()
        inputs = input_tensors[0] if input_tensors else []
        return self._run("scatter", output_tensors, f"src={_root(opts)}",
                         lambda: self._inner.scatter(output_tensors, input_tensors, opts),
                         meta=(_root(opts), len(inputs)))

    def _post(self, kind: str, tensors: list[torch.Tensor], peer: int, tag: int,
              start: Callable[[], dist.Work]) -> dist.Work:
        (tensor,) = tensors
        op_id = self._p2p
        self._p2p += 1
        self._answer(("post", self.gid, op_id, kind, int(peer), int(tag), tuple(tensor.shape), tensor.dtype,
                      call_site(3)))
        return RecordingWork(start(), self._report, (self.gid, op_id))

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> dist.Work:
        return self._post("send", tensors, dst, tag, lambda: self._inner.send(tensors, dst, tag))

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int = 0) -> dist.Work:
        return self._post("recv", tensors, src, tag, lambda: self._inner.recv(tensors, src, tag))

    def __repr__(self) -> str:
        group = f", group={self.label}" if self.label else ""
        return f"RecordingGroup(gloo{group}, rank={self.rank()}, size={self.size()})"


class RecordingWork(dist.Work):
    """A gloo send's or receive's ``Work``: ``wait()`` tells the watchdog the rank blocks, then that it is done."""

    def __init__(self, inner: dist.Work, report: Report, op_id: tuple[Any, int]) -> None:
        super().__init__()
        self._inner = inner
        self._report = report
        self._op_id = op_id
        self._done = False

    def wait(self, timeout: object = None) -> bool:
        if not self._done:
            self._report(("wait", *self._op_id))
            self._inner.wait()
            self._done = True
            self._report(("done", *self._op_id))
        return True

    def is_completed(self) -> bool:
        return self._done or bool(self._inner.is_completed())

    def is_success(self) -> bool:
        return self.is_completed()
