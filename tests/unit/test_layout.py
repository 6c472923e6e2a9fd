import pytest
import torch

from cpinspect.core.errors import InputError
from cpinspect.core.layout import make_layout, pad_row, padded_cu_seqlens
from cpinspect.core.oracle import global_positions
from tests.literal import contiguous_indices, zigzag_indices


def indices(cu, cp, kind="zigzag"):
    return make_layout(torch.tensor(cu), cp, kind).all_global_indices().tolist()


def test_reference_two_segments_cp2():
    assert indices([0, 8, 24], 2) == [
        [0, 1, 6, 7, 8, 9, 10, 11, 20, 21, 22, 23],
        [2, 3, 4, 5, 12, 13, 14, 15, 16, 17, 18, 19],
    ]


def test_reference_two_segments_cp4():
    assert indices([0, 8, 24], 4) == [
        [0, 7, 8, 9, 22, 23], [1, 6, 10, 11, 20, 21], [2, 5, 12, 13, 18, 19], [3, 4, 14, 15, 16, 17],
    ]


def test_transformer_engine_vector():
    assert indices([0, 8, 16], 2) == [[0, 1, 6, 7, 8, 9, 14, 15], [2, 3, 4, 5, 10, 11, 12, 13]]


def test_sequence_zigzag_treats_row_as_one_sequence():
    assert indices([0, 8, 24], 2, "sequence-zigzag") == [
        [0, 1, 2, 3, 4, 5, 18, 19, 20, 21, 22, 23], list(range(6, 18)),
    ]


def test_contiguous_cuts_row_into_cp_pieces():
    assert indices([0, 8, 24], 3, "contiguous") == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]


def test_cp1_is_identity_even_for_odd_segments():
    assert indices([0, 3, 8], 1) == [list(range(8))]


@pytest.mark.parametrize("cp", range(1, 9))
def test_zigzag_matches_literal_definition_for_random_segment_mixes(cp):
    gen = torch.Generator().manual_seed(cp)
    for _ in range(25):
        lengths = (torch.randint(0, 5, (int(torch.randint(1, 7, (1,), generator=gen)),), generator=gen) * 2 * cp)
        cu = [0, *torch.cumsum(lengths, 0).tolist()]
        if cu[-1] == 0:
            continue
        assert indices(cu, cp) == zigzag_indices(cu, cp)
        assert indices(cu, cp, "sequence-zigzag") == zigzag_indices([0, cu[-1]], cp)
        if cu[-1] % cp == 0:
            assert indices(cu, cp, "contiguous") == contiguous_indices(cu[-1], cp)


@pytest.mark.parametrize("kind", ["zigzag", "sequence-zigzag", "contiguous"])
@pytest.mark.parametrize("cp", [1, 2, 3, 5, 8])
def test_oracle_formula_matches_literal_definition(kind, cp):
    cu = [0, 4 * cp, 10 * cp, 12 * cp, 20 * cp]
    literal = {
        "zigzag": zigzag_indices(cu, cp),
        "sequence-zigzag": zigzag_indices([0, cu[-1]], cp),
        "contiguous": contiguous_indices(cu[-1], cp),
    }[kind]
    for rank in range(cp):
        assert global_positions(kind, torch.tensor(cu), cp, rank).tolist() == literal[rank]


def test_every_token_owned_exactly_once():
    plan = make_layout(torch.tensor([0, 16, 48, 64]), 4)
    assert sorted(plan.all_global_indices().reshape(-1).tolist()) == list(range(64))


def test_owner_of_piece_is_zigzag():
    plan = make_layout(torch.tensor([0, 8]), 2)
    assert plan.owner_of_piece().tolist() == [0, 1, 1, 0]


def test_indivisible_segment_names_segment_length_and_next_multiple():
    with pytest.raises(InputError) as info:
        make_layout(torch.tensor([0, 8, 21]), 2)
    message = str(info.value)
    assert "segment 1 has physical length 13" in message
    assert "2*cp = 4" in message and "next multiple is 16" in message and "--pad" in message


def test_pad_moves_segments_to_padded_offsets():
    cu = torch.tensor([0, 3, 8])
    new_cu = padded_cu_seqlens(cu, 4)
    assert new_cu.tolist() == [0, 4, 12]
    row = torch.arange(1, 9)
    assert pad_row(row, cu, new_cu, 0).tolist() == [1, 2, 3, 0, 4, 5, 6, 7, 8, 0, 0, 0]


@pytest.mark.parametrize("cu, text", [
    ([1, 8], "starts at 1"),
    ([0, 8, 4], "decreases at segment 1"),
    ([0], "needs at least 2"),
])
def test_bad_cu_seqlens_are_named(cu, text):
    with pytest.raises(InputError, match=text):
        make_layout(torch.tensor(cu), 2)


def test_float_cu_seqlens_rejected():
    with pytest.raises(InputError, match="must be integers"):
        make_layout(torch.tensor([0.0, 8.0]), 2)


def test_megatron_rope_vector_uses_segment_offsets():
    # Megatron-LM PR #5243: cu_seqlens [0, 4, 8], cp 2 -> rank 0 uses positions [0, 3, 4, 7]
    assert indices([0, 4, 8], 2)[0] == [0, 3, 4, 7]


@pytest.mark.parametrize("cp, sample_lens", [(2, [10, 7, 13]), (2, [16, 16]), (4, [20, 9, 30, 5]), (2, [3]),
                                             (4, [40, 17])])
def test_sharding_then_reassembling_is_identity_for_miles_style_padding(cp, sample_lens):
    padded = [-(-n // (2 * cp)) * 2 * cp for n in sample_lens]
    cu = torch.cumsum(torch.tensor([0, *padded]), 0)
    plan = make_layout(cu, cp)
    row = torch.randperm(int(cu[-1]))
    local = row[plan.all_global_indices()]
    rebuilt = torch.empty_like(row)
    rebuilt[plan.all_global_indices()] = local
    assert torch.equal(rebuilt, row)
    assert local.shape == (cp, int(cu[-1]) // cp)
