"""Causal work per rank, checked against a brute-force count over the block-diagonal causal mask."""

import pytest
import torch

from cpinspect.core.balance import Balance, compare_layouts, prefix_work
from tests.literal import contiguous_indices, layout_indices, zigzag_indices


def brute_force_work(cu: list[int], held: list[list[int]]) -> list[int]:
    """Count unmasked (query, key) pairs in each rank's rows of the full [T, T] mask."""
    total = cu[-1]
    segment = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.tensor(cu[1:]) - torch.tensor(cu[:-1]))
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    same_segment = segment[:, None] == segment[None, :]
    mask = causal & same_segment
    return [int(mask[torch.tensor(rows, dtype=torch.long)].sum()) for rows in held]


def literal_holdings(kind: str, cu: list[int], cp: int) -> list[list[int]]:
    return layout_indices(kind, cu, cp)


def test_sixteen_tokens_cp2_contiguous_is_26_5_to_73_5_and_zigzag_is_even():
    balances, impossible = compare_layouts(torch.tensor([0, 16]), 2)
    assert impossible == {}
    assert balances["contiguous"].work.tolist() == brute_force_work([0, 16], contiguous_indices(16, 2)) == [36, 100]
    assert [round(p, 1) for p in balances["contiguous"].percent] == [26.5, 73.5]
    assert balances["zigzag"].work.tolist() == brute_force_work([0, 16], zigzag_indices([0, 16], 2)) == [68, 68]
    assert balances["zigzag"].percent == [50.0, 50.0]
    assert balances["zigzag"].imbalance == 1.0
    assert round(balances["contiguous"].imbalance, 2) == 1.47


def test_published_table_for_32_tokens_cp4_and_8192_tokens_cp8():
    """tools-and-conventions.md §4.1: contiguous 6.8/18.9/31.1/43.2 (1.73); 1.6 ... 23.4 (1.87)."""
    small, _ = compare_layouts(torch.tensor([0, 32]), 4)
    assert [round(p, 1) for p in small["contiguous"].percent] == [6.8, 18.9, 31.1, 43.2]
    assert round(small["contiguous"].imbalance, 2) == 1.73
    assert small["zigzag"].percent == [25.0] * 4
    large, _ = compare_layouts(torch.tensor([0, 8192]), 8)
    shares = [round(p, 1) for p in large["contiguous"].percent]
    assert shares[0] == 1.6 and shares[-1] == 23.4
    assert round(large["contiguous"].imbalance, 2) == 1.87
    assert large["zigzag"].percent == [12.5] * 8


@pytest.mark.parametrize("seed", range(12))
def test_every_layout_matches_brute_force_on_random_packed_rows(seed):
    generator = torch.Generator().manual_seed(seed)
    cp = int(torch.randint(1, 5, (1,), generator=generator))
    chunks = torch.randint(0, 5, (int(torch.randint(1, 6, (1,), generator=generator)),), generator=generator)
    lengths = (chunks * 2 * cp).tolist()
    lengths[0] = max(lengths[0], 2 * cp)
    cu = [0]
    for length in lengths:
        cu.append(cu[-1] + length)
    balances, impossible = compare_layouts(torch.tensor(cu), cp)
    assert impossible == {}
    for kind, balance in balances.items():
        assert balance.work.tolist() == brute_force_work(cu, literal_holdings(kind, cu, cp)), (kind, cu, cp)
        assert balance.total == brute_force_work(cu, [list(range(cu[-1]))])[0]


def test_worked_example_8_16_per_document_zigzag_is_even_but_whole_row_zigzag_is_not():
    cu = [0, 8, 24]
    balances, _ = compare_layouts(torch.tensor(cu), 2)
    assert balances["zigzag"].work.tolist() == [86, 86]
    assert balances["sequence-zigzag"].work.tolist() == brute_force_work(cu, zigzag_indices([0, 24], 2)) == [102, 70]


def test_layout_that_cannot_cut_the_row_is_reported_not_balanced():
    balances, impossible = compare_layouts(torch.tensor([0, 10, 18]), 2)
    assert set(balances) == {"contiguous"}
    assert set(impossible) == {"zigzag", "sequence-zigzag", "head-tail", "per-document-head-tail"}
    assert "segment 0 has physical length 10" in impossible["zigzag"]
    assert balances["contiguous"].work.tolist() == brute_force_work([0, 10, 18], contiguous_indices(18, 2))


def test_prefix_work_counts_whole_segments_and_the_partial_one():
    cu = torch.tensor([0, 4, 4, 10])  # an empty segment in the middle
    positions = torch.tensor([0, 3, 4, 7, 10])
    # tokens before p contribute offset+1 each: segment 0 gives 1+2+3+4, segment 2 restarts at 1.
    assert prefix_work(cu, positions).tolist() == [0, 6, 10, 16, 31]


def test_empty_row_has_no_work_and_reports_balance_one():
    balance = Balance("zigzag", torch.zeros(2, dtype=torch.long))
    assert balance.percent == [0.0, 0.0] and balance.imbalance == 1.0
    assert balance.to_dict() == {"work": [0, 0], "imbalance": 1.0}


def python_work(cu: list[int], pieces: list[tuple[int, int]]) -> int:
    """Exact Python-int work of global ranges: each query at offset k of its segment adds k + 1."""
    total = 0
    for start, end in pieces:
        for s in range(len(cu) - 1):
            a, b = max(start, cu[s]), min(end, cu[s + 1])
            if a < b:
                first, last = a - cu[s] + 1, b - cu[s]
                total += (first + last) * (last - first + 1) // 2
    return total


@pytest.mark.parametrize("cu", [[0, 4_000_000_000], [0, 2**32 - 1 - 8, 2**32 - 1],
                                [0, 3_000_000_000, 3_000_000_008, 4_000_000_000]])
def test_work_of_billions_of_tokens_is_exact_not_wrapped(cu):
    balances, _ = compare_layouts(torch.tensor(cu), 2)
    chunked = [[(r * cu[-1] // 2, (r + 1) * cu[-1] // 2)] for r in range(2)]
    if "contiguous" in balances:
        assert balances["contiguous"].work.tolist() == [python_work(cu, p) for p in chunked]
    for balance in balances.values():
        assert balance.total == python_work(cu, [(0, cu[-1])]) and min(balance.work.tolist()) >= 0


def test_a_row_beyond_the_exact_limit_is_refused():
    from cpinspect.core.errors import InputError

    with pytest.raises(InputError, match="4,294,967,295"):
        compare_layouts(torch.tensor([0, 2**32]), 1)
