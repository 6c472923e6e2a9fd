"""On CUDA the library routine reads nothing back to the host: proved under sync debug mode "error".

``torch.cuda.set_sync_debug_mode("error")`` turns every device-to-host synchronisation torch
performs (``.item()``, ``.tolist()``, ``nonzero``, blocking copies, stream syncs) into a
``RuntimeError``. The mode is process-wide, so it also covers the simulated ranks' threads; the
first test shows that it does, so the others cannot pass vacuously. Results are moved to the CPU
only after the mode is switched off, and compared with the literal oracle. Skipped without CUDA.

The last tests capture the row map in a CUDA graph (device and pinned host ``cu_seqlens``) and
replay it on new batches of the same shape, under the same mode, through a replay group whose
all-gather is one device copy from a captured buffer (the counts the literal oracle says every
rank sends), and compile the two local stages with the all-gather between them.
"""

from contextlib import contextmanager

import pytest
import torch

from bench.replay import ReplayGroup, warm_up_then_capture
from cpinspect.core import synth
from cpinspect.core.selection import VisionCountMismatch, local_vision_row_map, local_vision_rows
from cpinspect.groups.simulated import SpmdError, run_spmd
from tests.literal import expected_rows, local_counts, zigzag_indices

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
VISION = (151655, 151656)
DEVICE_CU_KERNELS, HOST_CU_KERNELS = 14, 13  # issue 16: at most 15


@contextmanager
def syncs_are_errors():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def cuda_case(seed, cp, *, cu_on_device=True):
    """Per-rank CUDA masks, cu_seqlens and the literal oracle's rows for a seeded random batch."""
    raw = synth.random_batch(seed, cp, max_segments=8)
    cu = raw["cu_seqlens"].tolist()
    mask = [t in VISION for t in raw["input_ids"].reshape(-1).tolist()]
    held = zigzag_indices(cu, cp)
    masks = [torch.tensor([mask[g] for g in h], dtype=torch.bool, device="cuda") for h in held]
    cu_tensor = raw["cu_seqlens"].to("cuda") if cu_on_device else raw["cu_seqlens"]
    return cu_tensor, masks, [expected_rows(mask, h) for h in held], sum(mask)


def test_sync_debug_mode_reaches_the_rank_threads():
    def program(group):
        return torch.ones(3, device="cuda").sum().item()

    with syncs_are_errors(), pytest.raises(SpmdError, match="synchroniz"):
        run_spmd(2, program)


@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("cu_on_device", [True, False])
def test_row_map_and_counted_rows_are_sync_free_and_match_the_oracle(cp, cu_on_device):
    for seed in range(4):
        cu, masks, expected, _ = cuda_case(seed * 13 + cp, cp, cu_on_device=cu_on_device)

        def program(group, masks, cu, counts):
            rank = group.rank()
            row_map = local_vision_row_map(masks[rank], cu, cp_group=group)
            dense = row_map.row_of_position
            rows = local_vision_rows(masks[rank], cu, cp_group=group, local_vision_count=counts[rank])
            return dense, rows

        with syncs_are_errors():
            results = run_spmd(cp, program, masks, cu, [len(e) for e in expected], timeout=60.0)
        for rank, (dense, rows) in enumerate(results):
            assert dense.is_cuda and rows.is_cuda
            mask = masks[rank].cpu()
            assert dense.cpu()[mask].tolist() == expected[rank]
            assert (dense.cpu()[~mask] == -1).all()
            assert rows.cpu().tolist() == expected[rank]


def test_sync_free_scatter_places_every_embedding_row():
    cu, masks, expected, total = cuda_case(21, 4)
    embeds = torch.randn(total, 8, device="cuda")

    def program(group):
        mask = masks[group.rank()]
        rows = local_vision_row_map(mask, cu, cp_group=group).row_of_position
        hidden = torch.zeros(mask.numel(), 8, device="cuda")
        return torch.where(mask[:, None], embeds[rows.clamp(min=0)], hidden)

    with syncs_are_errors():
        results = run_spmd(4, program, timeout=60.0)
    for rank, got in enumerate(results):
        want = torch.zeros(masks[rank].numel(), 8)
        want[masks[rank].cpu()] = embeds.cpu()[torch.tensor(expected[rank], dtype=torch.long)]
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("cu_on_device", [True, False])
def test_deferred_count_check_after_the_sync_free_part(cu_on_device):
    cu, masks, expected, total = cuda_case(5, 2, cu_on_device=cu_on_device)

    def program(group):
        return local_vision_row_map(masks[group.rank()], cu, cp_group=group)

    with syncs_are_errors():
        row_maps = run_spmd(2, program, timeout=60.0)
    for rank, row_map in enumerate(row_maps):  # the one sync each, where the caller chose it
        row_map.check(total)
        assert row_map.rows().cpu().tolist() == expected[rank]
        with pytest.raises(VisionCountMismatch, match=f"contain {total} vision tokens, but .* produced {total + 1}"):
            row_map.check(total + 1)


def test_default_call_with_the_count_check_matches_the_oracle_on_cuda():
    cu, masks, expected, total = cuda_case(8, 4)

    def program(group):
        return local_vision_rows(masks[group.rank()], cu, cp_group=group, vision_embed_count=total).cpu().tolist()

    assert run_spmd(4, program, timeout=60.0) == expected


def static_batches(cp, segments, tokens, seeds):
    """Batches of one shape (``segments``, ``tokens``): cu_seqlens, per-rank masks, oracle rows, gathered counts."""
    batches = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        unit = 2 * cp
        cuts = torch.randperm(tokens // unit - 1, generator=g)[: segments - 1].add(1).sort().values * unit
        cu = [0, *cuts.tolist(), tokens]
        mask = (torch.rand(tokens, generator=g) < 0.4).tolist()
        held = zigzag_indices(cu, cp)
        gathered = [sum(local_counts(cu, cp, r, mask), []) for r in range(cp)]
        batches.append((cu, [[mask[i] for i in h] for h in held], [expected_rows(mask, h) for h in held], gathered))
    return batches


@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("cu_form", ["device", "pinned host"])
def test_row_map_replays_from_a_cuda_graph_against_the_oracle_without_syncs(cp, cu_form):
    batches = static_batches(cp, segments=5, tokens=2 * cp * 40, seeds=[cp, cp + 10, cp + 20])
    cu0, masks0, _, gathered0 = batches[0]
    for rank in range(cp):
        mask = torch.tensor(masks0[rank], dtype=torch.bool, device="cuda")
        gathered = torch.tensor(gathered0, dtype=torch.long, device="cuda")
        cu = torch.tensor(cu0, dtype=torch.int32)
        cu = cu.pin_memory() if cu_form == "pinned host" else cu.cuda()
        group = ReplayGroup(rank, gathered)
        def call(mask=mask, cu=cu, group=group):
            return local_vision_row_map(mask, cu, cp_group=group).row_of_position

        graph, out = warm_up_then_capture(call)
        for cu_b, masks_b, expected_b, gathered_b in batches:  # new values in the captured buffers, then replay
            mask.copy_(torch.tensor(masks_b[rank], dtype=torch.bool))
            gathered.copy_(torch.tensor(gathered_b, dtype=torch.long))
            cu.copy_(torch.tensor(cu_b, dtype=torch.int32))
            with syncs_are_errors():
                graph.replay()
            torch.cuda.synchronize()
            got, host_mask = out.cpu(), mask.cpu()
            assert got[host_mask].tolist() == expected_b[rank]
            assert (got[~host_mask] == -1).all()


@pytest.mark.parametrize("cu_form", ["device", "pinned host"])
def test_compiled_stages_match_the_oracle_on_cuda(cu_form):
    from cpinspect.core.selection import LocalCounts, local_vision_counts

    counts_fn = torch.compile(local_vision_counts, fullgraph=True, backend="aot_eager")
    finish_fn = torch.compile(LocalCounts.row_map, fullgraph=True, backend="aot_eager")
    cp = 4
    for cu_list, masks, expected, gathered in static_batches(cp, segments=6, tokens=2 * cp * 50, seeds=[1, 2]):
        cu = torch.tensor(cu_list, dtype=torch.int32)
        cu = cu.pin_memory() if cu_form == "pinned host" else cu.cuda()
        for rank in range(cp):
            mask = torch.tensor(masks[rank], dtype=torch.bool, device="cuda")
            group = ReplayGroup(rank, torch.tensor(gathered, dtype=torch.long, device="cuda"))
            counts = counts_fn(mask, cu, cp=cp, cp_rank=rank)
            got = finish_fn(counts, counts.gather(group)).row_of_position.cpu()
            assert got[mask.cpu()].tolist() == expected[rank]
            assert (got[~mask.cpu()] == -1).all()


@pytest.mark.parametrize("cu_form", ["device", "pinned host"])
@pytest.mark.parametrize("segments, cp", [(8, 2), (256, 8), (1024, 16)])
def test_one_call_enqueues_at_most_15_kernels_and_copies(segments, cp, cu_form):
    """The profiler's device activities of one eager row-map call, the all-gather's copy included (issue 16)."""
    from bench.kernels import count_per_call

    batches = static_batches(cp, segments=segments, tokens=2 * cp * 8 * segments, seeds=[segments])
    cu_list, masks, expected, gathered = batches[0]
    mask = torch.tensor(masks[0], dtype=torch.bool, device="cuda")
    cu = torch.tensor(cu_list, dtype=torch.int32)
    cu = cu.pin_memory() if cu_form == "pinned host" else cu.cuda()
    group = ReplayGroup(0, torch.tensor(gathered, dtype=torch.long, device="cuda"))

    def call():
        return local_vision_row_map(mask, cu, cp_group=group).row_of_position

    assert call().cpu()[mask.cpu()].tolist() == expected[0]
    _, kernels, _ = count_per_call(call, "cuda")
    assert kernels <= (HOST_CU_KERNELS if cu_form == "pinned host" else DEVICE_CU_KERNELS)


def test_a_captured_graph_still_replays_right_after_the_cache_moved_past_its_tables():
    """More shapes than the table cache keeps, and freed memory reused, between capture and replay."""
    from cpinspect.core import selection_plan

    cp = 2
    batches = static_batches(cp, segments=5, tokens=2 * cp * 40, seeds=[31, 32])
    cu0, masks0, _, gathered0 = batches[0]
    mask = torch.tensor(masks0[0], dtype=torch.bool, device="cuda")
    gathered = torch.tensor(gathered0, dtype=torch.long, device="cuda")
    cu = torch.tensor(cu0, dtype=torch.int32, device="cuda")
    group = ReplayGroup(0, gathered)
    graph, out = warm_up_then_capture(lambda: local_vision_row_map(mask, cu, cp_group=group).row_of_position)
    device = torch.device("cuda", torch.cuda.current_device())
    for segments in range(6, 6 + 2 * selection_plan._MAX_TABLES):  # every unpinned key is dropped
        selection_plan.zigzag_plan(segments, cp, 0, 1000 + segments, torch.int32, device)
    torch.cuda.empty_cache()
    scribble = [torch.full((1 << 16,), 7, dtype=torch.long, device="cuda") for _ in range(64)]
    cu_b, masks_b, expected_b, gathered_b = batches[1]
    mask.copy_(torch.tensor(masks_b[0], dtype=torch.bool))
    gathered.copy_(torch.tensor(gathered_b, dtype=torch.long))
    cu.copy_(torch.tensor(cu_b, dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    got, host_mask = out.cpu(), mask.cpu()
    assert got[host_mask].tolist() == expected_b[0] and (got[~host_mask] == -1).all()
    del scribble
