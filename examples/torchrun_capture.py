"""A tiny CP job that records what each rank saw, verifies it in the job, and times the check.

    torchrun --nproc-per-node 2 examples/torchrun_capture.py --out capture/                  # CPU, gloo
    torchrun --nproc-per-node 2 examples/torchrun_capture.py --out capture/ --backend nccl   # one GPU per rank
    cpinspect analyze capture/

Each step packs a batch (step 0: the bundled demo; later steps: seeded random batches), gives every
rank its zigzag shard the way miles/slime pre-shard it, and then does what a Qwen-VL model does
before its scatter: selects its rows of the vision embeddings with one all-gather of counts on the
real CP group and scatters them. Just before the scatter it calls ``cpinspect.jobs.capture.record`` and
``cpinspect.verify``. ``--bug-step N`` makes rank 1 select rolled rows at step N: verify then
raises on every rank together (each rank notes it and goes on), and ``cpinspect analyze`` names
the rank, segment and chunk.

Rank 0 writes ``run.json`` (backend, versions, GPU, verify cost); every rank writes
``verify-rank{R}.json`` (what verify said at each step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from cpinspect import capture, local_vision_rows, verify  # noqa: E402
from cpinspect.core.layout import make_layout  # noqa: E402
from cpinspect.core.synth import demo_batch_dict, random_batch  # noqa: E402
from cpinspect.core.tokens import token_config  # noqa: E402
from cpinspect.jobs.verify import VerificationError  # noqa: E402

HIDDEN = 8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for the capture files and reports")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--cp", type=int, default=None, help="CP group size (default: the world size)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bug-step", type=int, default=None, help="rank 1 selects wrong rows at this step")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls for the verify cost")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds any collective may take")
    return parser.parse_args()


def setup(backend: str, timeout: float) -> torch.device:
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timedelta(seconds=timeout), device_id=device)
        return device
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
    return torch.device("cpu")


def cp_groups(cp: int, timeout: float) -> tuple[dist.ProcessGroup, int]:
    """This rank's CP group (consecutive ranks) and its index; every rank creates every group.

    ``new_group`` does not inherit ``init_process_group``'s timeout (its default is 30 minutes), so it is passed.
    """
    world = dist.get_world_size()
    if world % cp:
        raise SystemExit(f"world size {world} is not a multiple of --cp {cp}")
    groups = [dist.new_group(list(range(start, start + cp)), timeout=timedelta(seconds=timeout))
              for start in range(0, world, cp)]
    index = dist.get_rank() // cp
    return groups[index], index


def step_batch(step: int, cp: int, data_group: int) -> dict[str, torch.Tensor]:
    if step == 0:
        return demo_batch_dict()
    return random_batch(seed=1000 * data_group + step, cp=cp, max_segments=6, max_chunk=8)


def shard(batch: dict[str, torch.Tensor], cp: int, cp_rank: int, device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's pre-sharded inputs (local ids, local mask) and the global metadata, on ``device``."""
    tokens = token_config()
    cu = batch.get("cu_seqlens_padded", batch["cu_seqlens"]).to(torch.int32)
    ids = batch["input_ids"].reshape(-1)
    local_ids = ids[make_layout(cu, cp).global_indices(cp_rank)]
    mask = (ids == tokens.image_token_id) | (ids == tokens.video_token_id)
    embed_count = int(batch["vision_embed_count"]) if "vision_embed_count" in batch else int(mask.sum())
    local_mask = (local_ids == tokens.image_token_id) | (local_ids == tokens.video_token_id)
    return {"input_ids": local_ids.view(1, -1).to(device), "cu_seqlens": cu.to(device),
            "vision_mask": local_mask.to(device), "vision_embed_count": torch.tensor(embed_count, device=device)}


def run_step(step: int, args: argparse.Namespace, group: dist.ProcessGroup, data_group: int,
             device: torch.device) -> dict[str, object]:
    cp, cp_rank = group.size(), group.rank()
    local = shard(step_batch(step, cp, data_group), cp, cp_rank, device)
    embed_count = int(local["vision_embed_count"])
    rows = local_vision_rows(local["vision_mask"], local["cu_seqlens"], cp_group=group, vision_embed_count=embed_count)
    if step == args.bug_step and cp_rank == 1:
        rows = torch.roll(rows, 1)  # the bug: right rows, wrong order
    capture.record(args.out, step=step, input_ids=local["input_ids"], cu_seqlens=local["cu_seqlens"],
                   vision_mask=local["vision_mask"], vision_embed_count=embed_count, selected_rows=rows,
                   cp_group=group, enabled=True)
    outcome: dict[str, object] = {"step": step, "cp_rank": cp_rank, "ok": True}
    try:
        verify(vision_mask=local["vision_mask"], cu_seqlens=local["cu_seqlens"], selected_rows=rows,
               vision_embed_count=embed_count, cp_group=group, timeout=args.timeout)
    except VerificationError as exc:
        outcome.update(ok=False, codes=exc.codes, ranks=exc.ranks, segments=exc.segments, message=str(exc))
    scatter(local["vision_mask"], rows, embed_count, device)
    return outcome


def scatter(mask: torch.Tensor, rows: torch.Tensor, embed_count: int, device: torch.device) -> None:
    """What the model does next: ``combined[mask] = vision_embeds[rows]``."""
    vision_embeds = torch.arange(embed_count * HIDDEN, dtype=torch.float32, device=device).view(embed_count, HIDDEN)
    combined = torch.zeros(mask.numel(), HIDDEN, device=device)
    combined[mask.reshape(-1)] = vision_embeds.index_select(0, rows)


def time_calls(fn, repeats: int, device: torch.device) -> dict[str, float]:
    """Median and p90 wall time of ``fn`` in microseconds (each call ends with the result on the host)."""
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - start) * 1e6)
    samples.sort()
    p90 = samples[int(0.9 * (len(samples) - 1))]
    return {"median_us": round(statistics.median(samples), 1), "p90_us": round(p90, 1), "repeats": repeats}


def large_batch(cp: int, segments: int = 256, chunk: int = 32) -> dict[str, torch.Tensor]:
    """``segments`` segments of ``2*cp*chunk`` tokens, 40% vision placeholders in runs: a big packed row."""
    generator = torch.Generator().manual_seed(7)
    total = segments * 2 * cp * chunk
    ids = torch.randint(100, 150000, (total,), generator=generator)
    runs = torch.cumsum(torch.rand(total, generator=generator) < 0.05, 0)
    ids[(torch.rand(int(runs[-1]) + 1, generator=generator) < 0.4)[runs]] = token_config().image_token_id
    cu = torch.arange(segments + 1, dtype=torch.int32) * (2 * cp * chunk)
    return {"input_ids": ids.view(1, -1), "cu_seqlens": cu}


def measure_cost(args: argparse.Namespace, group: dist.ProcessGroup, device: torch.device) -> dict[str, object]:
    """verify on the demo batch and on a large row, next to the selection it checks and a bare count all-gather."""
    return {"demo": cost_on(demo_batch_dict(), args, group, device),
            "large": cost_on(large_batch(group.size()), args, group, device)}


def cost_on(batch: dict[str, torch.Tensor], args: argparse.Namespace, group: dist.ProcessGroup,
            device: torch.device) -> dict[str, object]:
    local = shard(batch, group.size(), group.rank(), device)
    embed_count = int(local["vision_embed_count"])
    rows = local_vision_rows(local["vision_mask"], local["cu_seqlens"], cp_group=group, vision_embed_count=embed_count)
    segments = local["cu_seqlens"].numel() - 1
    counts = torch.zeros(segments, 2, dtype=torch.long, device=device)

    def bare_all_gather() -> None:
        out = [torch.empty_like(counts) for _ in range(group.size())]
        dist.all_gather(out, counts, group=group)
        torch.stack(out).cpu()

    return {
        "segments": segments, "local_tokens": int(local["vision_mask"].numel()),
        "verify": time_calls(lambda: verify(vision_mask=local["vision_mask"], cu_seqlens=local["cu_seqlens"],
                                            selected_rows=rows, vision_embed_count=embed_count, cp_group=group),
                             args.repeats, device),
        "selection": time_calls(lambda: local_vision_rows(local["vision_mask"], local["cu_seqlens"], cp_group=group,
                                                          vision_embed_count=embed_count).cpu(), args.repeats, device),
        "bare_all_gather": time_calls(bare_all_gather, args.repeats, device),
    }


def environment(backend: str, device: torch.device) -> dict[str, object]:
    env: dict[str, object] = {"backend": backend, "world_size": dist.get_world_size(), "torch": torch.__version__,
                              "python": platform.python_version(), "cuda": torch.version.cuda, "host": platform.node()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return env


def main() -> None:
    args = parse_args()
    device = setup(args.backend, args.timeout)
    rank = dist.get_rank()
    group, data_group = cp_groups(args.cp or dist.get_world_size(), args.timeout)
    outcomes = [run_step(step, args, group, data_group, device) for step in range(args.steps)]
    cost = measure_cost(args, group, device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"verify-rank{rank}.json").write_text(json.dumps(outcomes, indent=1) + "\n")
    if rank == 0:
        report = {**environment(args.backend, device), "cp": group.size(), "steps": args.steps,
                  "bug_step": args.bug_step, "verify_cost": cost}
        (args.out / "run.json").write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(report, indent=1))
    for outcome in outcomes:
        status = "ok" if outcome["ok"] else f"raised {outcome['codes']} (ranks {outcome['ranks']})"
        print(f"[rank {rank}] step {outcome['step']}: verify {status}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
