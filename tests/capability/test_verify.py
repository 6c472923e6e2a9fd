"""verify: one small all-gather on the real group; every rank raises the same diagnosis together.

Expected rows and counts come from the published Megatron-Bridge vector (reference §3.1) and from
tests/literal.py, never from cpinspect's own selection.
"""

import pytest
import torch

from cpinspect.core import synth
from cpinspect.groups.gloo import execute_gloo
from cpinspect.groups.simulated import execute_spmd
from cpinspect.jobs.verify import VerificationError, verify
from tests import literal

# Megatron-Bridge test_get_cp_local_vision_embed_indices_multiple_segments: cu [0, 8, 16], cp 2.
BRIDGE_CU = torch.tensor([0, 8, 16], dtype=torch.int32)
BRIDGE_MASKS = [[1, 0, 1, 1, 0, 0, 1, 0], [1, 1, 0, 0, 1, 0, 1, 1]]
BRIDGE_ROWS = [[0, 3, 4, 8], [1, 2, 5, 6, 7]]
BRIDGE_FULL_COUNTS = [[1, 2, 0, 2], [0, 1, 2, 1]]


def bridge_rank(group, rows=None, embeds=9, cu=None, mask=None, timeout=None):
    """Verify one rank of the Bridge vector; per-rank overrides come as dicts keyed by rank."""
    r = group.rank()

    def pick(override, default):
        return override[r] if override and r in override else default

    return verify(
        vision_mask=torch.tensor(pick(mask, BRIDGE_MASKS[r]), dtype=torch.bool),
        cu_seqlens=pick(cu, BRIDGE_CU),
        selected_rows=torch.tensor(pick(rows, BRIDGE_ROWS[r])),
        vision_embed_count=embeds, cp_group=group, timeout=timeout,
    )


def raised_together(states) -> VerificationError:
    """Every rank raised a VerificationError with the same findings; return rank 0's."""
    assert [s.status for s in states] == ["raised"] * len(states)
    errors = [s.error for s in states]
    assert all(isinstance(e, VerificationError) for e in errors), [type(e) for e in errors]
    assert all(e.findings == errors[0].findings for e in errors)
    assert [e.cp_rank for e in errors] == list(range(len(states)))
    return errors[0]


def test_right_rows_pass_and_return_the_published_count_table():
    states, failure = execute_spmd(2, bridge_rank)
    assert failure is None
    assert [s.value.full_counts.tolist() for s in states] == [BRIDGE_FULL_COUNTS] * 2
    assert states[0].value.vision_tokens == 9


def test_verify_issues_exactly_one_small_all_gather():
    states, _ = execute_spmd(2, bridge_rank)
    calls = [[c.describe().split(" #")[0] for c in s.calls] for s in states]
    assert calls == [["all_gather([19] int64)"]] * 2  # 7 header + 6 x 2 segments


def test_wrong_order_on_one_rank_raises_rows_mismatch_on_every_rank_with_segment_and_chunk():
    states, _ = execute_spmd(2, bridge_rank, {1: [2, 1, 5, 6, 7]})
    error = raised_together(states)
    assert error.codes == ["ROWS_MISMATCH"] and error.ranks == [1] and error.segments == [0]
    (finding,) = error.findings
    assert (finding.rank, finding.segment, finding.chunk) == (1, 0, 1)  # rank 1's first chunk of segment 0
    assert "rows that are not consecutive for the 2 vision token(s) of segment 0 chunk 1" in finding.message
    assert "that chunk's rows are 1..2 in natural order" in finding.message


def test_an_off_by_one_row_names_its_segment_and_chunk():
    # rank 0 selects row 7 for its one vision token of segment 1 chunk 3, whose row is 8
    states, _ = execute_spmd(2, bridge_rank, {0: [0, 3, 4, 7]})
    error = raised_together(states)
    assert [(f.code, f.rank, f.segment, f.chunk) for f in error.findings] == [("ROWS_MISMATCH", 0, 1, 3)]
    assert "rows starting at 7 for the 1 vision token(s) of segment 1 chunk 3, but that chunk's rows are 8..8" in \
        error.findings[0].message


def test_embedding_count_mismatch_uses_the_upstream_message():
    states, _ = execute_spmd(2, bridge_rank, None, 10)
    error = raised_together(states)
    assert error.codes == ["EMBED_COUNT_MISMATCH"]
    assert error.findings[0].message == ("Packed CP ranks contain 9 vision tokens, but the vision encoder produced "
                                         "10 embeddings.")


def test_a_rank_selecting_too_few_rows_is_a_scatter_shape_mismatch():
    states, _ = execute_spmd(2, bridge_rank, {0: [0, 3, 4]})
    error = raised_together(states)
    assert error.codes == ["SCATTER_SHAPE_MISMATCH"] and error.ranks == [0]
    assert error.findings[0].message == "rank 0 selected 3 rows but holds 4 vision tokens"


def test_ranks_given_different_cu_seqlens_are_named():
    states, _ = execute_spmd(2, bridge_rank, None, 9, {1: torch.tensor([0, 4, 16], dtype=torch.int32)})
    error = raised_together(states)
    assert error.codes == ["CU_SEQLENS_DIFFER"]
    assert "rank(s) 0 passed cu_seqlens ending at 16" in error.findings[0].message
    assert "rank(s) 1 passed" in error.findings[0].message


def test_a_mask_of_the_wrong_length_is_named_with_both_numbers():
    states, _ = execute_spmd(2, bridge_rank, None, 9, None, {1: [1, 1, 0, 0, 1, 0]})
    error = raised_together(states)
    assert error.codes == ["LOCAL_LENGTH_MISMATCH"] and error.ranks == [1]
    assert "rank 1's vision_mask has 6 tokens, but cu_seqlens ends at 16, so a rank of 2 holds 8" in \
        error.findings[0].message


def literal_case(seed: int, cp: int):
    """A random batch; per rank its local mask and the literal expected rows."""
    raw = synth.random_batch(seed, cp)
    ids = raw["input_ids"].reshape(-1).tolist()
    mask = [i in (151655, 151656) for i in ids]
    cu = raw["cu_seqlens"].tolist()
    held = literal.zigzag_indices(cu, cp)
    return raw["cu_seqlens"], mask, held, sum(mask)


def random_rank(group, seed, corrupt_rank):
    cu, mask, held, total = literal_case(seed, group.size())
    r = group.rank()
    rows = torch.tensor(literal.expected_rows(mask, held[r]), dtype=torch.long)
    if r == corrupt_rank:
        rows[[0, -1]] = rows[[-1, 0]]
    local_mask = torch.tensor([mask[g] for g in held[r]], dtype=torch.bool)
    return verify(vision_mask=local_mask, cu_seqlens=cu, selected_rows=rows, vision_embed_count=total, cp_group=group)


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_random_batches_pass_with_literal_rows_and_fail_when_two_rows_swap(cp):
    for seed in range(15):
        cu, mask, held, _ = literal_case(seed, cp)
        states, failure = execute_spmd(cp, random_rank, seed, -1)
        assert failure is None, (seed, str(failure))
        full = [[sum(mask[g] for g in range(cu[s] + k * (cu[s + 1] - cu[s]) // (2 * cp),
                                              cu[s] + (k + 1) * (cu[s + 1] - cu[s]) // (2 * cp)))
                 for k in range(2 * cp)] for s in range(len(cu) - 1)] if cp > 1 else None
        if full is not None:
            assert states[0].value.full_counts.tolist() == full
        rows_on = [literal.expected_rows(mask, h) for h in held]
        victim = next((r for r in range(cp) if len(set(rows_on[r][:1] + rows_on[r][-1:])) == 2), None)
        if victim is None:
            continue
        states, _ = execute_spmd(cp, random_rank, seed, victim)
        error = raised_together(states)
        assert error.codes == ["ROWS_MISMATCH"] and error.ranks == [victim], (seed, str(error))


def bridge_steps(group):
    """Step 0 right, step 1 wrong on rank 1: verify raises at step 1 on both processes."""
    bridge_rank(group, timeout=30.0)
    bridge_rank(group, {1: [1, 2, 5, 7, 6]}, timeout=30.0)


def test_on_a_real_gloo_group_every_process_raises_the_same_findings_and_none_waits():
    states, failure = execute_gloo(2, bridge_steps, timeout=30.0)
    error = raised_together(states)
    assert failure is not None and failure.kind == "exception" and str(failure).startswith("all ranks raised")
    assert [len(s.calls) for s in states] == [2, 2]  # both reached the second verify's all-gather
    assert [(f.code, f.rank, f.segment, f.chunk) for f in error.findings] == [("ROWS_MISMATCH", 1, 1, 2)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_on_a_simulated_group():
    def on_cuda(group):
        r = group.rank()
        return verify(vision_mask=torch.tensor(BRIDGE_MASKS[r], dtype=torch.bool, device="cuda"),
                      cu_seqlens=BRIDGE_CU.cuda(), selected_rows=torch.tensor(BRIDGE_ROWS[r], device="cuda"),
                      vision_embed_count=torch.tensor(9, device="cuda"), cp_group=group)

    states, failure = execute_spmd(2, on_cuda)
    assert failure is None and states[0].value.full_counts.tolist() == BRIDGE_FULL_COUNTS
