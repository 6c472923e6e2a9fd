"""The sync-free forms of the library routine, checked against the literal oracle on the CPU.

``local_vision_row_map`` (a dense row per local position) and ``local_vision_rows(...,
local_vision_count=n)`` are what a training step calls to avoid device-to-host syncs; the GPU
proof that they do is ``tests/process/test_gpu_sync.py``. Here: same answers as the oracle, one
collective, and the deferred checks.
"""

import pytest
import torch

from cpinspect.core import synth
from cpinspect.core.selection import VisionCountMismatch, local_vision_row_map, local_vision_rows
from cpinspect.groups.simulated import SpmdError, execute_spmd, run_spmd
from tests.literal import expected_rows, local_counts, zigzag_indices

VISION = (151655, 151656)


def literal_case(seed, cp):
    """Per-rank masks and oracle rows of a seeded random batch, from the literal definitions."""
    raw = synth.random_batch(seed, cp)
    cu = raw["cu_seqlens"].tolist()
    mask = [t in VISION for t in raw["input_ids"].reshape(-1).tolist()]
    held = zigzag_indices(cu, cp)
    masks = [torch.tensor([mask[g] for g in h], dtype=torch.bool) for h in held]
    return raw["cu_seqlens"], masks, [expected_rows(mask, h) for h in held], sum(mask)


@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
def test_row_map_holds_the_oracle_row_at_vision_positions_and_minus_one_elsewhere(cp):
    for seed in range(6):
        cu, masks, expected, _ = literal_case(seed * 7 + cp, cp)

        def program(group, masks, cu):
            return local_vision_row_map(masks[group.rank()], cu, cp_group=group).row_of_position.tolist()

        for rank, row_map in enumerate(run_spmd(cp, program, masks, cu)):
            mask = masks[rank].tolist()
            assert [r for r, m in zip(row_map, mask) if m] == expected[rank]
            assert all(r == -1 for r, m in zip(row_map, mask) if not m)


@pytest.mark.parametrize("cp", [2, 4, 6])
def test_given_local_count_gives_the_oracle_rows(cp):
    for seed in range(6):
        cu, masks, expected, total = literal_case(seed * 11 + cp, cp)

        def program(group, masks, cu, expected, total):
            rank = group.rank()
            return local_vision_rows(masks[rank], cu, cp_group=group, local_vision_count=len(expected[rank]),
                                     vision_embed_count=total).tolist()

        assert run_spmd(cp, program, masks, cu, expected, total) == expected


def test_scatter_through_the_row_map_equals_the_boolean_scatter():
    cu, masks, expected, total = literal_case(3, 4)
    embeds = torch.arange(total * 3, dtype=torch.float32).view(total, 3)

    def program(group):
        mask = masks[group.rank()]
        rows = local_vision_row_map(mask, cu, cp_group=group).row_of_position
        hidden = torch.full((mask.numel(), 3), -5.0)
        return torch.where(mask[:, None], embeds[rows.clamp(min=0)], hidden)

    for rank, got in enumerate(run_spmd(4, program)):
        want = torch.full((masks[rank].numel(), 3), -5.0)
        want[masks[rank]] = embeds[torch.tensor(expected[rank], dtype=torch.long)]
        assert torch.equal(got, want)


def test_exactly_one_collective_per_rank_with_the_count_shape():
    cu, masks, _, _ = literal_case(5, 4)
    segments = cu.numel() - 1
    states, failure = execute_spmd(4, lambda g: local_vision_rows(masks[g.rank()], cu, cp_group=g))
    assert failure is None
    for state in states:
        calls = [(c.op, c.shapes, c.dtypes) for c in state.calls]
        assert calls == [("all_gather_into_tensor", ((2 * segments,),), ("int64",))]


def test_deferred_check_raises_on_every_rank_together():
    masks = [torch.tensor([1, 0, 0, 0], dtype=torch.bool), torch.tensor([0, 0, 0, 1], dtype=torch.bool)]
    cu = torch.tensor([0, 8], dtype=torch.int32)

    def program(group, count):
        row_map = local_vision_row_map(masks[group.rank()], cu, cp_group=group)
        row_map.check(count)
        return row_map.rows().tolist()

    assert run_spmd(2, program, 2) == [[0], [1]]
    with pytest.raises(SpmdError) as info:
        run_spmd(2, program, 5)
    assert info.value.raised_ranks == [0, 1]
    assert all(isinstance(s.error, VisionCountMismatch) for s in info.value.ranks)
    assert "contain 2 vision tokens, but the vision encoder produced 5 embeddings" in str(info.value)


def test_wrong_local_count_on_cpu_names_both_numbers():
    def program(group):
        return local_vision_rows(torch.tensor([1, 1, 0, 0], dtype=torch.bool), torch.tensor([0, 8]),
                                 cp_group=group, local_vision_count=3)

    with pytest.raises(SpmdError, match="local_vision_count is 3, but the local vision mask holds 2"):
        run_spmd(2, program)


def test_mask_of_the_wrong_length_is_refused_before_the_collective():
    def program(group):
        return local_vision_rows(torch.zeros(6, dtype=torch.bool), torch.tensor([0, 8]), cp_group=group)

    states, failure = execute_spmd(2, program)
    assert failure is not None
    assert all(not s.calls for s in states)
    assert "the local vision mask has 6 entries, but cu_seqlens[-1] // cp = 8 // 2 = 4" in str(failure)


def test_segment_not_divisible_by_2cp_is_refused():
    def program(group):
        return local_vision_rows(torch.zeros(6, dtype=torch.bool), torch.tensor([0, 6, 12]), cp_group=group)

    with pytest.raises(SpmdError, match="segment 0 has physical length 6, not divisible by 2\\*cp = 4"):
        run_spmd(2, program)


@pytest.mark.parametrize("cu, message", [
    ([4, 8, 16], "cu_seqlens\\[0\\] is 4: cu_seqlens must start at 0"),
    ([0, 12, 8, 16], "cu_seqlens\\[2\\] is 8, below cu_seqlens\\[1\\] = 12: cu_seqlens must start at 0 and never "
                     "decrease"),
])
def test_cu_seqlens_that_do_not_start_at_0_or_decrease_are_refused(cu, message):
    """Both would pass the length and divisibility checks, and give rows silently wrong."""
    def program(group):
        return local_vision_row_map(torch.zeros(8, dtype=torch.bool), torch.tensor(cu), cp_group=group)

    with pytest.raises(SpmdError, match=message):
        run_spmd(2, program)


def test_sync_free_forms_are_public_names():
    import cpinspect

    assert cpinspect.local_vision_row_map is local_vision_row_map
    assert cpinspect.local_vision_rows is local_vision_rows
    assert "VisionRowMap" in dir(cpinspect)


@pytest.mark.parametrize("cp", [2, 4])
def test_bucketed_shapes_keep_the_oracle_rows(cp):
    """The static-shape recipe of the README: empty segments pad S, a text-only segment pads T."""
    cu, masks, expected, _ = literal_case(17 + cp, cp)
    extra_tokens = 2 * cp * 3
    bucketed = torch.cat([cu, cu[-1:].repeat(3), cu[-1:] + extra_tokens])  # 3 empty segments, 1 padding segment
    padded = [torch.cat([m, torch.zeros(extra_tokens // cp, dtype=torch.bool)]) for m in masks]

    def program(group):
        rank = group.rank()
        return local_vision_row_map(padded[rank], bucketed, cp_group=group).row_of_position

    for rank, row_map in enumerate(run_spmd(cp, program)):
        assert row_map[padded[rank]].tolist() == expected[rank]
        assert (row_map[~padded[rank]] == -1).all()


def test_operators_per_call_do_not_grow_with_segments_or_cp():
    """The profiler's top-level operators of one row-map call: the same count at every shape, and few."""
    from bench.kernels import count_per_call
    from bench.replay import ReplayGroup

    counts = []
    for seed, cp in ((1, 2), (2, 8)):
        cu, masks, expected, _ = literal_case(seed, cp)
        full = [t in VISION for t in synth.random_batch(seed, cp)["input_ids"].reshape(-1).tolist()]
        gathered = torch.tensor([sum(local_counts(cu.tolist(), cp, r, full), []) for r in range(cp)])
        group = ReplayGroup(0, gathered, check_inputs=True)

        def call(mask=masks[0], cu=cu, group=group):
            return local_vision_row_map(mask, cu, cp_group=group).row_of_position

        assert call()[masks[0]].tolist() == expected[0]
        counts.append(count_per_call(call, "cpu")[0])
    # 10 of the row map, the all-gather's copy and the replay group's input check (aten::equal); the host
    # checks of cu_seqlens run in numpy, which the profiler does not count
    assert counts[0] == counts[1] <= 12


@pytest.mark.parametrize("cp", [1, 2, 3])
def test_bounds_are_the_chunk_starts_and_stay_inside_the_row_for_any_cu_seqlens(cp):
    """The bounds against the chunk starts written out, and clamped inside the row for nonsense values."""
    from cpinspect.core.selection_plan import zigzag_bounds, zigzag_tables

    local_tokens = 10 * cp
    for cu in ([0, 4 * cp, 10 * cp * cp], [0, 0, 2 * cp, 2 * cp, 10 * cp * cp], [0, -8, 10 ** 6], [3, 5, 7],
               [0, 2 * cp, 10 ** 9]):
        for dtype in (torch.int32, torch.int64):
            segments = len(cu) - 1
            pair, later = zigzag_tables(segments, cp, 0, torch.device("cpu"))
            got = zigzag_bounds(torch.tensor(cu, dtype=dtype), cp, pair, local_tokens).tolist()
            pieces, destinations = got[: 2 * segments + 1], got[2 * segments + 1:]
            assert destinations == [pieces[k] for k in later.tolist()]
            want = []
            for s in range(segments):
                want += [cu[s] // cp, cu[s] // cp + (cu[s + 1] - cu[s]) // (2 * cp)]
            want.append(cu[-1] // cp)
            valid = cu == sorted(cu) and cu[-1] == cp * local_tokens and all(c % (2 * cp) == 0 for c in cu)
            if valid:  # a valid layout: exactly the chunk starts
                assert pieces == want
            if cp == 1:  # the pair sum halved, clamped to the row
                assert pieces == [min(max((cu[k // 2] + cu[(k + 1) // 2]) // 2, 0), local_tokens)
                                  for k in range(len(pieces))]
            else:  # whole chunks of 2cp: each boundary's chunk index clamped to [0, T // 2], then paired
                units = [min(max(c // (2 * cp), 0), local_tokens // 2) for c in cu]
                assert pieces == [units[k // 2] + units[(k + 1) // 2] for k in range(len(pieces))]
            assert all(0 <= b <= local_tokens for b in got)


def test_row_map_selection_holds_the_literal_counts_in_natural_order():
    cp = 3
    cu, masks, expected, total = literal_case(23, cp)
    full = [t in VISION for t in synth.random_batch(23, cp)["input_ids"].reshape(-1).tolist()]
    per_rank = [local_counts(cu.tolist(), cp, r, full) for r in range(cp)]
    natural = []  # chunk c of segment s: rank c's first piece, or rank 2cp-1-c's second
    for s in range(cu.numel() - 1):
        natural += [per_rank[c][s][0] if c < cp else per_rank[2 * cp - 1 - c][s][1] for c in range(2 * cp)]

    def program(group):
        row_map = local_vision_row_map(masks[group.rank()], cu, cp_group=group)
        return row_map.selection, row_map.row_of_position

    for rank, (selection, dense) in enumerate(run_spmd(cp, program)):
        assert selection.local_counts.view(-1, 2).tolist() == per_rank[rank]
        assert selection.full_counts.tolist() == natural
        assert selection.offsets.tolist() == [sum(natural[:i]) for i in range(len(natural))]
        assert selection.row_map is dense and int(selection.full_counts.sum()) == total
