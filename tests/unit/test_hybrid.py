"""Hybrid CP (one CP size per segment) against the literal definition in tests/literal.py, cp 1-8."""

import random

import pytest
import torch

from cpinspect.core.errors import InputError
from cpinspect.core.hybrid import segment_cp_sizes, segment_ranks, with_pad_sequences
from cpinspect.core.layout import make_layout, padded_boundaries
from tests.literal import hybrid_indices, hybrid_rank_padding


def divisors(cp):
    return [d for d in range(1, cp + 1) if cp % d == 0]


def balanced_mix(rng, cp, rounds=3):
    """Rounds in which aligned blocks of random sizes fill every rank with the same share u."""
    lengths, sizes = [], []
    for _ in range(rounds):
        share, rank = 2 * rng.randint(0, 3), 0
        while rank < cp:
            size = rng.choice([d for d in divisors(cp) if rank % d == 0 and rank + d <= cp])
            lengths.append(size * share)
            sizes.append(size)
            rank += size
    return lengths, sizes


def random_mix(rng, cp):
    """Any sizes dividing cp, lengths cut evenly by 2c: the shares may come out unequal."""
    sizes = [rng.choice(divisors(cp)) for _ in range(rng.randint(1, 6))]
    return [(2 * c if c > 1 else 1) * rng.randint(0, 4) for c in sizes], sizes


def cu_of(lengths):
    return [0, *torch.cumsum(torch.tensor(lengths), 0).tolist()] if lengths else [0]


@pytest.mark.parametrize("cp", range(1, 9))
@pytest.mark.parametrize("seed", range(12))
def test_balanced_mixes_give_the_literal_indices(cp, seed):
    lengths, sizes = balanced_mix(random.Random(seed * 10 + cp), cp)
    cu = cu_of(lengths)
    layout = make_layout(torch.tensor(cu), cp, "hybrid", torch.tensor(sizes))
    assert layout.kind == "hybrid"
    assert layout.all_global_indices().tolist() == hybrid_indices(cu, cp, sizes)


@pytest.mark.parametrize("cp", range(1, 9))
@pytest.mark.parametrize("seed", range(12))
def test_random_mixes_give_the_literal_indices_or_the_unequal_shares_error(cp, seed):
    lengths, sizes = random_mix(random.Random(seed * 10 + cp), cp)
    cu = cu_of(lengths)
    held = hybrid_indices(cu, cp, sizes)
    if len({len(h) for h in held}) == 1:
        assert make_layout(torch.tensor(cu), cp, "hybrid", torch.tensor(sizes)).all_global_indices().tolist() == held
    else:
        with pytest.raises(InputError, match="unequal shares"):
            make_layout(torch.tensor(cu), cp, "hybrid", torch.tensor(sizes))


def test_locate_names_the_block_member_and_chunk():
    # cp 4: segment 0 (16, cp 2) on ranks 0-1, segments 1, 2 (8, cp 1) on ranks 2 and 3, segment 3 (16, cp 4) on all
    layout = make_layout(torch.tensor([0, 16, 24, 32, 48]), 4, "hybrid", torch.tensor([2, 1, 1, 4]))
    assert segment_ranks(layout) == [(0, 1), (2, 2), (3, 3), (0, 3)]
    place = layout.locate_position(12)  # chunk 3 of segment 0 = rank 0's tail, after its head (4 tokens)
    assert (place.rank, place.local, place.segment, place.chunk) == (0, 4, 0, 3)
    place = layout.locate_position(41)  # chunk 4 of segment 3's 8 chunks of 2 = member 3's tail
    assert (place.rank, place.local, place.segment, place.chunk) == (3, 11, 3, 4)


def test_pad_rounds_each_segment_to_twice_its_own_cp_then_fills_the_short_ranks():
    # 5 -> 8 (cp 2: ranks 0-1 hold 4 each), 4 stays (cp 1: rank 2), 3 -> 8 (cp 4: 2 each); rank 3 then holds 2
    # of the others' 6, so a pad sequence of 4 follows
    padded = padded_boundaries(torch.tensor([0, 5, 9, 12]), 4, "zigzag", 1, torch.tensor([2, 1, 4]))
    assert padded.tolist() == [0, 8, 12, 20, 24]
    # with sp 2: 5 -> 8 (2*2*2), 4 stays (a multiple of 1*2); rank 3 holds nothing of the others' 4
    assert padded_boundaries(torch.tensor([0, 5, 9]), 4, "zigzag", 2, torch.tensor([2, 1])).tolist() == [0, 8, 12, 16]


@pytest.mark.parametrize(("option", "value", "words"), [
    ("2,3", None, "does not divide the CP group size --cp 4"),
    ("2,2,2", None, "gives 3 CP size(s), but the row has 2 segment(s)"),
    ("2,x", None, "entry 1 is 'x'"),
    (None, torch.tensor([2]), "local_cp_size is 2: one micro-batch held by a subgroup of 2"),
    (None, torch.tensor([4, 2, 1]), "gives 3 CP size(s)"),
])
def test_bad_sizes_are_one_paragraph_input_errors(option, value, words):
    with pytest.raises(InputError) as caught:
        segment_cp_sizes(4, 2, option=option, batch_value=value)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_a_scalar_local_cp_size_equal_to_cp_is_per_document_zigzag():
    cu = torch.tensor([0, 16, 48])
    sizes = segment_cp_sizes(4, 2, batch_value=torch.tensor(4))
    assert sizes.tolist() == [4, 4]
    hybrid = make_layout(cu, 4, "hybrid", sizes).all_global_indices()
    assert torch.equal(hybrid, make_layout(cu, 4, "zigzag").all_global_indices())


def test_a_segment_its_chunks_cannot_cut_names_the_segment():
    with pytest.raises(InputError, match=r"segment 1 has physical length 6 and local CP size 2.*not divisible by 4"):
        make_layout(torch.tensor([0, 8, 14]), 2, "hybrid", torch.tensor([1, 2]))


@pytest.mark.parametrize("cp", range(1, 9))
@pytest.mark.parametrize("seed", range(12))
def test_pad_fills_every_rank_to_one_share_with_trailing_pad_sequences(cp, seed):
    lengths, sizes = random_mix(random.Random(seed * 10 + cp), cp)
    cu = cu_of(lengths)
    padded_cu, padded_sizes = hybrid_rank_padding(cu, cp, sizes)
    held = hybrid_indices(padded_cu, cp, padded_sizes)
    assert len({len(h) for h in held}) == 1  # the definition's claim, checked on the literal layout
    assert padded_boundaries(torch.tensor(cu), cp, "zigzag", 1, torch.tensor(sizes)).tolist() == padded_cu
    sizes_after = with_pad_sequences(torch.tensor(sizes), torch.tensor(padded_cu))
    assert sizes_after.tolist() == padded_sizes
    assert make_layout(torch.tensor(padded_cu), cp, "hybrid", sizes_after).all_global_indices().tolist() == held
