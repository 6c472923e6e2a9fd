"""Padded [B, T] and flattened batches become one THD row; valid-only rows are explained (VALID_ONLY_ROW)."""

import pytest
import torch

from cpinspect.core.errors import InputError
from cpinspect.core.loading import load_batch
from cpinspect.core.valid_only import chunk_slices, is_valid_only, valid_only_finding


def _literal_pack(rows, masks, align):
    """Bridge preprocess_packed_seqs by hand: valid tokens of each row, zero-padded to a multiple of align."""
    out, cu, cu_padded = [], [0], [0]
    for row, mask in zip(rows, masks):
        valid = [t for t, m in zip(row, mask) if m]
        padded = -(-len(valid) // align) * align
        out += valid + [0] * (padded - len(valid))
        cu.append(cu[-1] + len(valid))
        cu_padded.append(cu_padded[-1] + padded)
    return out, cu, cu_padded


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("align", [1, 4, 6, 16])
def test_padded_batch_is_packed_like_bridge(side, align):
    gen = torch.Generator().manual_seed(align)
    lengths = [7, 3, 10]
    width = 12
    rows, masks = [], []
    for n in lengths:
        tokens = torch.randint(1, 1000, (n,), generator=gen).tolist()
        pad = [0] * (width - n)
        rows.append(tokens + pad if side == "right" else pad + tokens)
        masks.append([1] * n + [0] * (width - n) if side == "right" else [0] * (width - n) + [1] * n)
    positions = torch.arange(width).expand(3, len(lengths), width).clone()
    batch = load_batch({"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(masks),
                        "position_ids": positions}, align=align)
    want, cu, cu_padded = _literal_pack(rows, masks, align)
    assert batch.rows[0].tolist() == want
    if align == 1:
        assert batch.cu_seqlens.tolist() == cu
    else:
        assert batch.cu_seqlens.tolist() == cu_padded and batch.logical_cu_seqlens.tolist() == cu
    note = batch.notes[0]
    assert note.code == "PACKED_FROM_PADDED" and f"{side} padding" in note.message
    assert str(cu_padded) in note.message and batch.form == f"Hugging Face padded ({side})"
    pos_want = []
    for b, mask in enumerate(masks):
        valid = [int(positions[0, b, t]) for t in range(width) if mask[t]]
        pos_want += valid + [1] * (cu_padded[b + 1] - cu_padded[b] - len(valid))
    assert batch.position_ids[0][0].tolist() == pos_want


def test_flattened_row_boundaries_from_position_ids():
    pos = [0, 1, 2, 3, 0, 1, 0, 1, 2]
    batch = load_batch({"input_ids": torch.arange(9).view(1, 9), "position_ids": torch.tensor([pos])})
    assert batch.cu_seqlens.tolist() == [0, 4, 6, 9]
    assert batch.notes[0].code == "PACKED_FROM_POSITION_IDS" and "[4, 2, 3]" in batch.notes[0].message
    mrope = torch.tensor([pos, pos, pos]).view(3, 1, 9)
    assert load_batch({"input_ids": torch.arange(9), "position_ids": mrope}).cu_seqlens.tolist() == [0, 4, 6, 9]
    with pytest.raises(InputError, match="do not start at 0"):
        load_batch({"input_ids": torch.arange(3), "position_ids": torch.tensor([1, 2, 3])})


def test_cu_seqlens_present_means_no_repacking():
    batch = load_batch({"input_ids": torch.arange(6), "cu_seqlens": torch.tensor([0, 6]),
                        "position_ids": torch.tensor([0, 1, 2, 0, 1, 2])})
    assert batch.cu_seqlens.tolist() == [0, 6] and batch.notes == []


@pytest.mark.parametrize("valid, padded, cp", [([5, 2], [8, 4], 2), ([3, 9, 1], [4, 12, 4], 2), ([7], [12], 3)])
def test_valid_only_chunks_match_direct_slicing(valid, padded, cp):
    logical = torch.tensor([0, *torch.tensor(valid).cumsum(0).tolist()])
    phys = torch.tensor([0, *torch.tensor(padded).cumsum(0).tolist()])
    row = list(range(sum(valid)))
    assert is_valid_only(len(row), logical, phys)
    got = {(c.rank, c.segment, c.chunk): c.got for c in chunk_slices(len(row), phys, cp)}
    for seg, length in enumerate(padded):
        size = length // (2 * cp)
        for rank in range(cp):
            for chunk in (rank, 2 * cp - 1 - rank):
                start = int(phys[seg]) + chunk * size
                assert got[(rank, seg, chunk)] == len(row[start:start + size])
    finding = valid_only_finding(len(row), logical, phys, cp)
    assert finding.code == "VALID_ONLY_ROW" and finding.severity == "error"
    first_padded = next(i for i, (v, p) in enumerate(zip(valid, padded)) if v != p)
    assert finding.segment == first_padded and f"{valid[first_padded]} valid" in finding.message

