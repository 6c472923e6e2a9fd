"""A tiny CP job that goes wrong on purpose with torch's flight recorder on, and dumps every rank's record.

    torchrun --nproc-per-node 2 examples/torchrun_hang.py --out fr/                    # a hang: rank 1 skips
    torchrun --nproc-per-node 2 examples/torchrun_hang.py --out fr/ --mismatch shape   # no hang, wrong rows
    torchrun --nproc-per-node 2 examples/torchrun_hang.py --out fr/ --mismatch dtype   # no hang, wrong rows
    cpinspect analyze --flight-recorder fr/

Each step does what a Qwen-VL model with vision data parallelism over CP does: every rank selects
its rows of the vision embeddings with cpinspect's count all-gather (``cpinspect.local_vision_rows``),
the ranks all-gather the rows each encoded (a ``torch.autograd.Function`` shaped like
Megatron-Bridge's ``AllGatherVisionEmbeddings``), and backward all-reduces the rows' gradient.

At ``--bug-step`` (default 1) rank 1 goes wrong:

* ``--mismatch skip`` (default): it skips the count all-gather, the way a rank without vision tokens
  returns early. Rank 0 waits in the all-gather until ``--timeout`` and dumps. Rank 1 dumps at once
  and enters no further collective (under gloo a rank that went on would send the *next*
  collective's bytes into rank 0's all-gather, and gloo aborts the process on the size mismatch
  before anything can be dumped); it stays alive until every rank has dumped (all on one host).
* ``--mismatch shape``: it hands the rows all-gather its padded rows as a ``[hidden, rows]`` buffer;
* ``--mismatch dtype``: its vision tower runs in float16 while the others run in bfloat16.

gloo checks only byte counts, and both mismatches keep them equal, so the job runs to the end with
scrambled rows; only the flight record shows it. Every rank writes ``<out>/fr_trace_rank_<rank>``
(``torch._C._distributed_c10d._dump_fr_trace()``: gloo has no dump-on-timeout in torch 2.13; NCCL
jobs get the same files from ``TORCH_FR_DUMP_TEMP_FILE``). Flight recording is turned on by
``TORCH_FR_BUFFER_SIZE``, set here before torch creates any process group.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "2000")  # > 0 records (older name: TORCH_NCCL_TRACE_BUFFER_SIZE)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from torchrun_capture import shard, step_batch  # noqa: E402

from cpinspect import local_vision_rows  # noqa: E402

HIDDEN = 8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for the flight-recorder dumps")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bug-step", type=int, default=1, help="the step at which rank 1 goes wrong")
    parser.add_argument("--mismatch", choices=("skip", "shape", "dtype"), default="skip")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds any collective may take")
    return parser.parse_args()


class GatherVisionRows(torch.autograd.Function):
    """Every rank's encoded rows, padded to the largest count, all-gathered; backward all-reduces the grad."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, rows_per_rank: list[int], group: dist.ProcessGroup,  # type: ignore[override]
                transposed: bool) -> torch.Tensor:
        width, rank = max(rows_per_rank), dist.get_rank(group)
        padded = local.new_zeros((width, local.shape[1]))
        padded[: local.shape[0]] = local
        if transposed:  # the bug: the same bytes as a [hidden, rows] buffer
            padded = padded.reshape(local.shape[1], width)
        received = [torch.empty_like(padded) for _ in rows_per_rank]
        dist.all_gather(received, padded, group=group)
        ctx.group, ctx.start, ctx.rows = group, sum(rows_per_rank[:rank]), rows_per_rank[rank]
        return torch.cat([part.reshape(width, -1)[:n] for part, n in zip(received, rows_per_rank)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        return total[ctx.start: ctx.start + ctx.rows], None, None, None


def run_step(step: int, args: argparse.Namespace, group: dist.ProcessGroup) -> bool:
    """One step; ``False`` when this rank skipped the count all-gather (and must stop)."""
    cp, cp_rank = group.size(), group.rank()
    bug = step == args.bug_step and cp_rank == 1
    local = shard(step_batch(step, cp, 0), cp, cp_rank, torch.device("cpu"))
    if bug and args.mismatch == "skip":
        return False
    rows = local_vision_rows(local["vision_mask"], local["cu_seqlens"], cp_group=group,
                             vision_embed_count=int(local["vision_embed_count"]))
    encoded = [2 + (step + r) % 3 for r in range(cp)]  # rows each rank's vision tower encodes this step
    dtype = torch.float16 if bug and args.mismatch == "dtype" else torch.bfloat16
    mine = torch.randn(encoded[cp_rank], HIDDEN, generator=torch.Generator().manual_seed(step)).to(dtype)
    mine.requires_grad_(True)
    table = GatherVisionRows.apply(mine, encoded, group, bug and args.mismatch == "shape")
    (table.float().sum() * (1 + rows.numel())).backward()
    return True


def dump(out: Path, rank: int) -> Path:
    """Write this rank's record once gloo has noted the end of every collective it ran (at most 2 s).

    gloo notes a finished collective a little after the call returned; a dump taken at once can
    show the last ones as pending.
    """
    deadline = time.monotonic() + 2
    while True:
        data = torch._C._distributed_c10d._dump_fr_trace()
        status = pickle.loads(data).get("pg_status", {})  # our own process's record
        if time.monotonic() > deadline or all(s["last_completed_collective"] == s["last_enqueued_collective"]
                                              for s in status.values()):
            break
        time.sleep(0.05)
    path = out / f"fr_trace_rank_{rank}"
    path.write_bytes(data)
    return path


def wait_for_dumps(out: Path, world: int, limit: float) -> None:
    """Keep this rank's connections open until every rank has dumped (all ranks run on this host)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and not all((out / f"fr_trace_rank_{r}").exists() for r in range(world)):
        time.sleep(0.2)


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    timeout = timedelta(seconds=args.timeout)
    dist.init_process_group("gloo", timeout=timeout)
    rank = dist.get_rank()
    group = dist.new_group(list(range(dist.get_world_size())), timeout=timeout)  # new_group's default: 30 min
    try:
        for step in range(args.steps):
            if not run_step(step, args, group):
                print(f"rank {rank}: skipped the count all-gather at step {step}; flight record: "
                      f"{dump(args.out, rank)}", flush=True)
                wait_for_dumps(args.out, dist.get_world_size(), 10 * args.timeout + 30)
                return
    except RuntimeError as exc:  # the collective timed out (or a peer left)
        print(f"rank {rank}: {str(exc).splitlines()[0][:160]}", flush=True)
    print(f"rank {rank}: flight record: {dump(args.out, rank)}", flush=True)


if __name__ == "__main__":
    main()
