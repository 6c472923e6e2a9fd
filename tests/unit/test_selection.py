"""The per-rank selection against the published vectors and the literal oracle."""

import pytest
import torch

from cpinspect.core import synth
from cpinspect.core.loading import load_batch
from cpinspect.core.selection import VisionCountMismatch, local_vision_rows
from cpinspect.groups.simulated import SpmdError, run_spmd
from cpinspect.simulation.run import simulate
from tests.literal import expected_rows, local_counts, zigzag_indices

IMG = 151655


def run_local(masks, cu, count=None):
    def program(group):
        return local_vision_rows(torch.tensor(masks[group.rank()], dtype=torch.bool), torch.tensor(cu),
                                 cp_group=group, vision_embed_count=count).tolist()

    return run_spmd(len(masks), program)


def test_bridge_vector_multiple_segments():
    masks = [[1, 0, 1, 1, 0, 0, 1, 0], [1, 1, 0, 0, 1, 0, 1, 1]]
    assert run_local(masks, [0, 8, 16], count=9) == [[0, 3, 4, 8], [1, 2, 5, 6, 7]]


def test_bridge_vector_rank_without_vision_tokens_selects_nothing():
    masks = [[0, 0, 0, 0], [1, 0, 0, 1]]
    rows = run_local(masks, [0, 8], count=2)
    assert rows == [[], [0, 1]]


def test_bridge_forward_vector_single_segment():
    masks = [[1, 0, 1, 0], [1, 0, 1, 0]]
    assert run_local(masks, [0, 8], count=4)[0] == [0, 3]


def test_areal_vector_local_order():
    ids = [10, IMG, IMG, IMG, IMG, 11, 12, 13, 20, 21, 22, IMG, IMG, IMG, IMG, 23]
    result = simulate(load_batch({"input_ids": torch.tensor(ids), "cu_seqlens": torch.tensor([0, 8, 16])}), 2)
    assert [r.selected_rows.tolist() for r in result.ranks] == [[0, 7], [1, 2, 3, 4, 5, 6]]
    assert [r.selection.local_counts.view(-1, 2).tolist() for r in result.ranks] == [[[1, 0], [0, 1]], [[2, 1], [1, 2]]]
    assert result.gathered_counts.tolist() == [[1, 2, 1, 0], [0, 1, 2, 1]]
    assert result.ok


def test_worked_vision_example_from_reference():
    ids = torch.zeros(24, dtype=torch.long)
    ids[2:6] = IMG
    ids[10:18] = IMG
    result = simulate(load_batch({"input_ids": ids, "cu_seqlens": torch.tensor([0, 8, 24])}), 2)
    assert result.ranks[0].local_mask.int().tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0]
    assert result.ranks[0].selected_rows.tolist() == [4, 5]
    assert result.ranks[1].selected_rows.tolist() == [0, 1, 2, 3, 6, 7, 8, 9, 10, 11]
    assert result.gathered_counts.tolist() == [[0, 2, 2, 0], [2, 4, 2, 0]]


def test_count_mismatch_raises_on_every_rank_together():
    masks = [[1, 0, 0, 0], [0, 0, 0, 1]]
    with pytest.raises(SpmdError) as info:
        run_local(masks, [0, 8], count=3)
    assert info.value.kind == "exception"
    assert info.value.raised_ranks == [0, 1]
    assert all(isinstance(s.error, VisionCountMismatch) for s in info.value.ranks)
    assert "Packed CP ranks contain 2 vision tokens, but the vision encoder produced 3 embeddings." in str(info.value)


@pytest.mark.parametrize("cp", range(1, 9))
def test_simulate_matches_literal_oracle_on_random_batches(cp):
    for seed in range(12):
        raw = synth.random_batch(seed * 31 + cp, cp)
        cu = raw["cu_seqlens"].tolist()
        mask = [t in (151655, 151656) for t in raw["input_ids"].reshape(-1).tolist()]
        result = simulate(load_batch(raw), cp)
        held = zigzag_indices(cu, cp)
        for rank in range(cp):
            assert result.ranks[rank].global_indices.tolist() == held[rank]
            assert result.ranks[rank].selected_rows.tolist() == expected_rows(mask, held[rank])
            if cp > 1:
                counts = result.ranks[rank].selection.local_counts.view(-1, 2).tolist()
                assert counts == local_counts(cu, cp, rank, mask)
        assert result.ok, result.findings


@pytest.mark.parametrize("layout", ["sequence-zigzag", "contiguous"])
def test_other_layouts_select_oracle_rows(layout):
    raw = synth.random_batch(7, 4)
    mask = [t in (151655, 151656) for t in raw["input_ids"].reshape(-1).tolist()]
    result = simulate(load_batch(raw), 4, layout)
    total = len(mask)
    held = zigzag_indices([0, total], 4) if layout == "sequence-zigzag" else [
        list(range(r * total // 4, (r + 1) * total // 4)) for r in range(4)]
    assert [r.selected_rows.tolist() for r in result.ranks] == [expected_rows(mask, h) for h in held]


def test_presharded_batch_reassembles_full_row():
    full = synth.demo_batch_dict()
    shards = synth.shard_batch(full, 2)
    from_full = simulate(load_batch(full), 2)
    from_shards = simulate(load_batch(shards), 2)
    assert from_shards.input_form == "presharded"
    assert torch.equal(from_shards.full_ids, full["input_ids"].reshape(-1))
    assert [r.selected_rows.tolist() for r in from_shards.ranks] == [r.selected_rows.tolist() for r in from_full.ranks]


def test_embed_count_mismatch_is_a_finding():
    raw = synth.demo_batch_dict()
    raw["vision_embed_count"] = torch.tensor(120)
    result = simulate(load_batch(raw), 2)
    assert not result.ok
    codes = [f.code for f in result.findings]
    assert codes == ["EMBED_COUNT_MISMATCH"]
    assert "contain 124 vision tokens, but the vision encoder produced 120" in result.findings[0].message


def test_explicit_vision_mask_wins_over_token_ids():
    ids = torch.zeros(8, dtype=torch.long)
    mask = torch.tensor([0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.bool)
    result = simulate(load_batch({"input_ids": ids, "cu_seqlens": torch.tensor([0, 8]), "vision_mask": mask}), 2)
    assert result.vision_tokens == 3
    assert [r.selected_rows.tolist() for r in result.ranks] == [[0, 2], [1]]


def test_pad_option_pads_each_segment_and_reports_it():
    ids = torch.zeros(13, dtype=torch.long)
    ids[2:6] = IMG
    result = simulate(load_batch({"input_ids": ids, "cu_seqlens": torch.tensor([0, 5, 13])}), 2, pad=True)
    assert result.layout.cu_seqlens.tolist() == [0, 8, 16]
    assert [f.code for f in result.findings] == ["SEGMENTS_PADDED"]
    assert result.ok
    # segment 0 -> [t t I I I p p p]: its 3 vision tokens sit in chunks 1-2 (rank 1); segment 1 starts
    # with the 4th vision token, in chunk 0 (rank 0)
    assert [r.selected_rows.tolist() for r in result.ranks] == [[3], [0, 1, 2]]


def test_user_tensors_are_not_modified():
    raw = synth.demo_batch_dict()
    before = {k: v.clone() for k, v in raw.items()}
    simulate(load_batch(raw), 4, pad=True)
    assert all(torch.equal(raw[k], before[k]) for k in raw)


def test_public_api_names():
    import cpinspect

    batch = cpinspect.load_batch(synth.demo_batch_dict())
    result = cpinspect.simulate(batch, cp=2, layout="zigzag")
    assert result.ok and result.to_dict()["ok"] is True
    assert result.ranks[1].selected_rows.dtype == torch.long
    assert callable(cpinspect.run_spmd) and callable(cpinspect.local_vision_rows)
