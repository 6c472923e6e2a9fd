"""Every layout's per-rank index map against the words of its definition (tests/literal.py) and,
for the PyTorch-named ones, against torch's own load balancers; ``file`` maps are validated."""

import random

import pytest
import torch

from cpinspect.core.errors import InputError
from cpinspect.core.layout import LAYOUTS, make_layout
from cpinspect.core.layout_maps import check_index_map, layout_from_indices
from tests.literal import layout_indices


def random_lengths(rng: random.Random, cp: int) -> list[int]:
    lengths = [2 * cp * rng.randint(0, 5) for _ in range(rng.randint(1, 6))]
    lengths[rng.randrange(len(lengths))] += 2 * cp
    return lengths


def cumulative(lengths: list[int]) -> list[int]:
    cu = [0]
    for length in lengths:
        cu.append(cu[-1] + length)
    return cu


CASES = [(cp, seed) for cp in range(1, 9) for seed in range(4)]


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize(("cp", "seed"), CASES)
def test_every_layout_holds_what_its_definition_says(kind, cp, seed):
    cu = cumulative(random_lengths(random.Random(seed * 31 + cp), cp))
    layout = make_layout(torch.tensor(cu), cp, kind)
    expected = layout_indices(kind, cu, cp)
    assert layout.all_global_indices().tolist() == expected
    assert [layout.global_indices(r).tolist() for r in range(cp)] == expected
    for rank, held in enumerate(expected):  # locate and locate_position agree with the map, token by token
        for local, position in enumerate(held):
            assert layout.locate(rank, local).position == position
            place = layout.locate_position(position)
            assert (place.rank, place.local) == (rank, local)
    assert layout.local_piece_len(0).numel() == layout.pieces_per_rank  # equal piece counts: one fixed-shape gather


@pytest.mark.parametrize(("cp", "seed"), CASES)
def test_pytorch_named_layouts_equal_torchs_own_balancers(cp, seed):
    balancers = pytest.importorskip("torch.distributed.tensor.experimental._context_parallel._load_balancer")
    lengths = random_lengths(random.Random(seed * 17 + cp), cp)
    cu = torch.tensor(cumulative(lengths))
    total = sum(lengths)
    head_tail = balancers._HeadTailLoadBalancer(total, cp, "cpu")._generate_indices()[0].long()
    per_doc = balancers._PerDocumentHeadTailLoadBalancer([lengths], cp, "cpu")._generate_indices()[0].long()
    # torch rearranges with these indices, then DTensor Shard(0) cuts the row into cp equal shares
    assert torch.equal(make_layout(cu, cp, "head-tail").all_global_indices(), head_tail.view(cp, -1))
    assert torch.equal(make_layout(cu, cp, "per-document-head-tail").all_global_indices(), per_doc.view(cp, -1))


def test_head_tail_is_sequence_zigzag_but_per_document_head_tail_is_not_megatron_zigzag():
    cu = torch.tensor([0, 4, 16])
    assert torch.equal(make_layout(cu, 2, "head-tail").all_global_indices(),
                       make_layout(cu, 2, "sequence-zigzag").all_global_indices())
    # torch goes document by document, so rank 0's share is all of document 0 and part of document 1
    assert make_layout(cu, 2, "per-document-head-tail").all_global_indices().tolist() == [
        [0, 3, 1, 2, 4, 5, 6, 13], [14, 15, 7, 8, 9, 10, 11, 12]]
    assert make_layout(cu, 2, "zigzag").all_global_indices().tolist() == [
        [0, 3, 4, 5, 6, 13, 14, 15], [1, 2, 7, 8, 9, 10, 11, 12]]


@pytest.mark.parametrize("seed", range(10))
def test_any_permutation_from_a_file_is_a_layout(seed):
    rng = random.Random(seed)
    cp = rng.randint(1, 8)
    cu = cumulative([rng.randint(0, 9) * cp for _ in range(rng.randint(1, 5))] + [cp])
    total = cu[-1]
    permutation = list(range(total))
    rng.shuffle(permutation)
    held = [permutation[r * (total // cp):(r + 1) * (total // cp)] for r in range(cp)]
    layout = layout_from_indices("file", torch.tensor(cu), cp, torch.tensor(held))
    assert layout.all_global_indices().tolist() == held
    assert int(layout.piece_len.sum()) == total
    for rank in range(cp):
        for local, position in enumerate(held[rank]):
            place = layout.locate_position(position)
            assert (place.rank, place.local) == (rank, local)
            assert cu[place.segment] <= position < cu[place.segment + 1]


@pytest.mark.parametrize(("indices", "words"), [
    ([[0, 1], [1, 2]], "position 1 is held 2 times"),
    ([[0, 1], [2, 7]], "maps to 7, outside 0..3"),
    ([[0, 1, 2], [3, 4, 5]], "cover 2 x 3 = 6 positions, but the row has 4"),
    ([[0.0, 1.0], [2.0, 3.0]], "dtype torch.float32"),
])
def test_index_maps_that_are_not_a_permutation_in_equal_shares_are_refused(indices, words):
    with pytest.raises(InputError) as error:
        check_index_map(torch.tensor(indices), 4, where="map.pt")
    assert words in error.value.what
