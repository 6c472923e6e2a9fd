"""Point-to-point for the simulated group: ``send``/``recv``, ``isend``/``irecv`` and, through them,
``batch_isend_irecv``.

Each op is posted to a mailbox shared by the group and matched by (src, dst, tag) in posting
order; a matched pair must agree on shape and dtype, else the pair is a divergence naming both
ranks and call sites. A blocking ``send`` waits until its receive is posted (as NCCL does), so a
ring in which every rank sends first deadlocks here as in a real job, and is named: the wait has
the group's progress-based deadline (``timeout`` after the last progress anywhere in the group),
and a rank waiting on a peer that has returned or raised is reported at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cpinspect.groups.coordinator import CollectiveAbort, Coordinator, describe_tensors


@dataclass
class P2POp:
    """One posted send or receive: who, to or from whom, with which tag and tensor, from where."""

    kind: str  # "send" or "recv"
    rank: int
    peer: int
    tag: int
    tensor: torch.Tensor
    site: str
    done: bool = False

    @property
    def route(self) -> tuple[int, int, int]:
        """(src, dst, tag), the key a send and its receive share."""
        return (self.rank, self.peer, self.tag) if self.kind == "send" else (self.peer, self.rank, self.tag)

    def signature(self) -> str:
        (shape,), (dtype,) = describe_tensors([self.tensor])
        return f"{list(shape)} {dtype}"

    def describe(self) -> str:
        direction = "to" if self.kind == "send" else "from"
        return f"{self.kind} {direction} rank {self.peer} (tag {self.tag}, {self.signature()}) at {self.site}"


class PointToPoint:
    """The group's mailbox of unmatched sends and receives; every method takes the coordinator's lock."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.unmatched: list[P2POp] = []

    def post(self, op: P2POp) -> None:
        """Match ``op`` with the first opposite op of the same route, or keep it until one is posted."""
        c = self.coordinator
        with c.cond:
            if c.failure is not None:
                raise CollectiveAbort(str(c.failure))
            if not 0 <= op.peer < c.size or op.peer == op.rank:
                raise ValueError(f"{op.kind} on rank {op.rank}: peer rank {op.peer} is not another rank of this "
                                 f"group of {c.size}")
            other = next((o for o in self.unmatched if o.kind != op.kind and o.route == op.route), None)
            if other is None:
                self.unmatched.append(op)
                return
            self.unmatched.remove(other)
            send, recv = (op, other) if op.kind == "send" else (other, op)
            if send.tensor.shape != recv.tensor.shape or send.tensor.dtype != recv.tensor.dtype:
                c.fail("divergence", f"point-to-point mismatch: rank {send.rank} sends {send.signature()} to rank "
                                     f"{recv.rank} (tag {send.tag}) at {send.site}, but rank {recv.rank} receives "
                                     f"{recv.signature()} from rank {send.rank} at {recv.site}; a send and its "
                                     "receive must agree on shape and dtype")
                raise CollectiveAbort(str(c.failure))
            recv.tensor.copy_(send.tensor)
            send.done = recv.done = True
            c.progress = time.monotonic()
            c.cond.notify_all()

    def wait(self, op: P2POp) -> None:
        """Block ``op``'s rank until ``op`` is matched; the wait has the group's deadline."""
        c = self.coordinator
        with c.cond:
            state = c.states[op.rank]
            state.status, state.blocked = "waiting", op.describe()
            try:
                while c.failure is None and not op.done:
                    if self.peer_gone(op):
                        break
                    remaining = c.progress + c.timeout - time.monotonic()
                    if remaining <= 0:
                        self.fail_timeout()
                        break
                    c.cond.wait(remaining)
                if not op.done:
                    raise CollectiveAbort(str(c.failure))
            finally:
                state.status, state.blocked = "running", ""

    def peer_gone(self, op: P2POp) -> bool:
        """Fail the group when unmatched ``op`` waits on a peer that returned or raised (hold the lock)."""
        c = self.coordinator
        peer = c.states[op.peer]
        if op.done or peer.status not in ("returned", "raised"):
            return False
        c.fail("divergence", f"rank {op.rank} is blocked in {op.describe()}, which can never complete: "
                             f"{peer.describe()}. In a real job rank {op.rank} would hang until the NCCL/gloo timeout")
        return True

    def fail_timeout(self) -> None:
        """Nothing progressed for ``timeout`` seconds while a rank was blocked in a send or receive."""
        c = self.coordinator
        live = [s for s in c.states if s.status in ("running", "waiting")]
        lines = "; ".join(s.describe() for s in live)
        unmatched = "; ".join(f"rank {o.rank} posted {o.describe()}" for o in self.unmatched)
        ring = ""
        if live and all(s.blocked.startswith("send ") for s in live):
            ring = (". Every rank is blocked in a blocking send and none has posted its receive: a ring of "
                    "blocking sends deadlocks; post the receives first on odd ranks, or use isend/irecv or "
                    "batch_isend_irecv")
        c.fail("timeout", f"point-to-point did not complete within {c.timeout:g} s of the group's last progress: "
                          f"{lines}; unmatched: {unmatched or 'none'}{ring}", [s.rank for s in live if s.computing])


class P2PWork(dist.Work):
    """The ``Work`` of one send or receive: ``wait()`` blocks until it is matched (or the group failed)."""

    def __init__(self, mailbox: PointToPoint, op: P2POp) -> None:
        super().__init__()
        self._mailbox = mailbox
        self._op = op

    def wait(self, timeout: object = None) -> bool:
        self._mailbox.wait(self._op)
        return True

    def is_completed(self) -> bool:
        return self._op.done

    def is_success(self) -> bool:
        return self._op.done
