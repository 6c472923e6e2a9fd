"""Issue 14 class 9: check's rank messages say what the rows are (no bare "-"; a permutation is named)."""

import torch

from cpinspect.check import run_case
from cpinspect.check.batch_cases import case_from_local_masks
from cpinspect.check.verdicts import WRONG_LENGTH, WRONG_ROWS


def test_a_permutation_of_the_right_rows_says_same_rows_wrong_order():
    # reference §3.5 worked example: rank 1 must select [0, 1, 2, 3, 6, 7, 8, 9, 10, 11]
    case = case_from_local_masks([0, 8, 24], [[0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0],
                                              [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]], vision_embed_count=12)
    rows = {0: [4, 5], 1: [0, 1, 2, 3, 6, 7, 8, 9, 11, 10]}

    def swapped(vision_mask, cu_seqlens, *, vision_embed_count, cp_group):
        return torch.tensor(rows[cp_group.rank()])

    result = run_case(swapped, case)
    rank1 = result.ranks[1]
    assert rank1.verdict == WRONG_ROWS and "same rows, wrong order" in rank1.message
    assert result.ranks[0].verdict != WRONG_ROWS


def test_rows_for_a_rank_without_vision_tokens_say_no_rows_expected():
    case = case_from_local_masks([0, 4], [[0, 0], [1, 0]])  # rank 0 holds no vision token

    def one_row_each(vision_mask, cu_seqlens, *, vision_embed_count, cp_group):
        return torch.tensor([0])

    result = run_case(one_row_each, case)
    rank0 = result.ranks[0]
    assert rank0.verdict == WRONG_LENGTH
    assert "expected no rows, got 0" in rank0.message and "expected -" not in rank0.message


def test_a_padding_bug_shrinks_to_a_case_line_with_logical_and_physical_lengths():
    """Issue 14 class 9: the trigger is logical 3 inside physical 4; the case line must show both, not "[4]"."""
    import types
    from pathlib import Path

    from cpinspect.check import load_function, run_check

    correct = load_function(f"{Path(__file__).resolve().parents[2] / 'examples/impls/correct.py'}"
                            ":get_cp_local_vision_embed_indices")

    def uses_logical(vision_mask, packed_seq_params, *, vision_embed_count, cp_group, embed_device):
        logical = packed_seq_params.cu_seqlens_q  # the bug: the logical boundaries where the padded ones belong
        params = types.SimpleNamespace(cu_seqlens_q_padded=logical, cu_seqlens_q=logical)
        return correct(vision_mask, params, vision_embed_count=vision_embed_count, cp_group=cp_group,
                       embed_device=embed_device)

    report = run_check(uses_logical, cp=[2], cases=14, signature="megatron-bridge")
    assert not report.ok and report.shrunk
    for case in [report.failures[0].case, *(s.result.case for s in report.shrunk)]:
        cu, logical = case.cu_seqlens.tolist(), case.logical_or_physical.tolist()
        parts = [str(b - a) if (d - c) == (b - a) else f"{d - c} in {b - a}"
                 for a, b, c, d in zip(cu, cu[1:], logical, logical[1:])]
        assert case.logical_cu_seqlens is not None and " in " in ", ".join(parts)  # the trigger is padding
        assert f"segment(s) [{', '.join(parts[:6])}" in case.describe()
        assert f"segment(s) [{', '.join(parts[:6])}" in report.text()
