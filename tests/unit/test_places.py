"""Layout.locate / locate_position, the padding rule and the rows comparison, against the definitions."""

import random

import pytest
import torch

from cpinspect.core.compare import compare_rows
from cpinspect.core.layout import make_layout, pad_multiple, padded_boundaries
from tests.literal import contiguous_indices, zigzag_indices


def literal_places(cu, cp):
    """(rank, local, segment, chunk) of every global position, straight from the zigzag definition."""
    held = zigzag_indices(cu, cp)
    places = {}
    for rank, positions in enumerate(held):
        for local, position in enumerate(positions):
            segment = max(s for s in range(len(cu) - 1) if cu[s] <= position < cu[s + 1] or cu[s] == position)
            chunk = (position - cu[segment]) // ((cu[segment + 1] - cu[segment]) // (2 * cp))
            places[position] = (rank, local, segment, chunk)
    return places


@pytest.mark.parametrize("seed", range(20))
def test_locate_agrees_with_the_zigzag_definition(seed):
    rng = random.Random(seed)
    cp = rng.randint(1, 5)
    lengths = [2 * cp * rng.randint(1, 4) for _ in range(rng.randint(1, 4))]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    layout = make_layout(torch.tensor(cu), cp)
    for position, (rank, local, segment, chunk) in literal_places(cu, cp).items():
        by_position = layout.locate_position(position)
        by_local = layout.locate(rank, local)
        assert (by_position.rank, by_position.local, by_position.segment, by_position.chunk) == (rank, local, segment,
                                                                                                  chunk)
        assert by_local == by_position and by_local.position == position


def test_locate_contiguous_pieces():
    layout = make_layout(torch.tensor([0, 12]), 3, "contiguous")
    for rank, positions in enumerate(contiguous_indices(12, 3)):
        for local, position in enumerate(positions):
            place = layout.locate(rank, local)
            assert (place.position, place.chunk, place.segment) == (position, rank, 0)


def test_padding_rule_per_layout():
    cu = torch.tensor([0, 5, 12])
    assert pad_multiple(1, "zigzag") == 1 and pad_multiple(3, "zigzag") == 6 and pad_multiple(3, "contiguous") == 3
    assert padded_boundaries(cu, 2, "zigzag").tolist() == [0, 8, 16]
    assert padded_boundaries(cu, 2, "sequence-zigzag").tolist() == [0, 5, 12]
    assert padded_boundaries(cu, 5, "sequence-zigzag").tolist() == [0, 5, 20]
    assert padded_boundaries(cu, 3, "contiguous").tolist() == [0, 5, 12]
    assert padded_boundaries(cu, 5, "contiguous").tolist() == [0, 5, 15]


def test_compare_rows_names_first_difference_and_reorderings():
    assert compare_rows(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3])) is None
    diff = compare_rows(torch.tensor([1, 5, 3, 9]), torch.tensor([1, 2, 3, 4]))
    assert (diff.first, diff.differing, diff.same_rows, diff.length_differs) == (1, 2, False, False)
    swapped = compare_rows(torch.tensor([2, 1]), torch.tensor([1, 2]))
    assert swapped.same_rows and swapped.first == 0
    shorter = compare_rows(torch.tensor([1, 2]), torch.tensor([1, 2, 3]))
    assert shorter.length_differs and shorter.first == 2 and shorter.differing == 0
    empty = compare_rows(torch.tensor([], dtype=torch.long), torch.tensor([7]))
    assert empty.first == 0 and empty.expected_count == 1
