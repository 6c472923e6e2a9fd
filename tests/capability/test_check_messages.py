"""Issue 14 class 9: check's rank messages say what the rows are (no bare "-"; a permutation is named)."""

import torch

from cpinspect.check import run_case
from cpinspect.check.cases import case_from_local_masks
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
