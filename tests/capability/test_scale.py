"""The thread-per-rank simulation at cp 64 and cp 128: completes, stays right, grows linearly.

No timings here (those live in bench/). "No quadratic blow-up" is checked on what the design
controls: the coordinator's work per arrival, the number of times the oracle ranks the full row,
and the count tables the simulated ranks keep. Every run has a deadline, so nothing can hang.
"""

import threading

import pytest
import torch
import torch.distributed as dist

from cpinspect.core import synth
from cpinspect.core.loading import load_batch
from cpinspect.groups.simulated import CollectiveCall, SpmdError, run_spmd
from cpinspect.simulation import run as simulation
from tests.literal import expected_rows, zigzag_indices

VISION = (151655, 151656)


def collectives(group, rounds):
    """A mix of every simulated collective, with results a closed form predicts."""
    rank, size = group.rank(), group.size()
    seen = []
    for round_ in range(rounds):
        mine = torch.tensor([rank, round_])
        gathered = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(gathered, mine, group=group)
        total = torch.tensor([rank + 1])
        dist.all_reduce(total, group=group)
        root_value = torch.tensor([rank * 10])
        dist.broadcast(root_value, src=size - 1, group=group)
        dist.barrier(group=group)
        seen.append((sum(int(g[0]) for g in gathered), int(total), int(root_value)))
    return seen


@pytest.mark.parametrize("cp", [64, 128])
def test_every_collective_completes_with_the_right_data(cp):
    before = threading.active_count()
    results = run_spmd(cp, collectives, 3, timeout=60.0)
    want = [(cp * (cp - 1) // 2, cp * (cp + 1) // 2, (cp - 1) * 10)] * 3
    assert results == [want] * cp
    assert threading.active_count() == before  # every rank thread was joined


@pytest.mark.parametrize("cp", [64, 128])
def test_coordinator_compares_each_arrival_once(cp, monkeypatch):
    calls = {"n": 0}
    fingerprint = CollectiveCall.fingerprint

    def counted(self):
        calls["n"] += 1
        return fingerprint(self)

    monkeypatch.setattr(CollectiveCall, "fingerprint", counted)
    run_spmd(cp, collectives, 2, timeout=60.0)
    arrivals = cp * 2 * 4  # ranks x rounds x collectives per round
    assert calls["n"] == arrivals  # comparing all arrivals each time would be ~cp/2 times more


def test_divergence_at_cp128_names_the_odd_rank():
    def odd_rank_out(group):
        t = torch.zeros(2 if group.rank() != 77 else 3)
        dist.all_reduce(t, group=group)

    with pytest.raises(SpmdError) as info:
        run_spmd(128, odd_rank_out, timeout=60.0)
    assert info.value.kind == "divergence"
    assert "rank 77 called all_reduce([3] float32, op=SUM)" in str(info.value)


def small_batch(cp, seed):
    """A few segments whose lengths divide 2*cp, vision runs crossing chunks (the literal oracle's input)."""
    raw = synth.random_batch(seed, cp, max_segments=3, max_chunk=2)
    cu = raw["cu_seqlens"].tolist()
    mask = [t in VISION for t in raw["input_ids"].reshape(-1).tolist()]
    return raw, cu, mask


@pytest.mark.parametrize("cp", [64, 128])
def test_simulate_matches_the_literal_oracle(cp):
    raw, cu, mask = small_batch(cp, seed=cp)
    result = simulate_small(raw, cp)
    held = zigzag_indices(cu, cp)
    assert result.ok, result.findings
    for rank in range(cp):
        assert result.ranks[rank].global_indices.tolist() == held[rank]
        assert result.ranks[rank].selected_rows.tolist() == expected_rows(mask, held[rank])


def simulate_small(raw, cp):
    return simulation.simulate(load_batch(raw), cp, timeout=60.0)


def test_simulated_ranks_keep_one_copy_of_the_gathered_tables():
    raw, _, _ = small_batch(64, seed=3)
    result = simulate_small(raw, 64)
    for name in ("gathered", "full_counts", "offsets"):
        assert len({id(getattr(r.selection, name)) for r in result.ranks}) == 1, name
    first = result.ranks[0].selection
    assert first.gathered.shape == (64, 2 * result.layout.num_segments)
    assert int(first.full_counts.sum()) == result.vision_tokens


def test_a_rank_with_different_counts_keeps_its_own_table():
    shared = {}
    tables = []
    for counts in ([[1, 2], [3, 4]], [[1, 2], [3, 4]], [[9, 9], [9, 9]]):
        selection = _FakeSelection(torch.tensor(counts))
        tables.append(simulation.share_tables(selection, shared))
    assert tables[1].gathered is tables[0].gathered
    assert tables[2].gathered is not tables[0].gathered and tables[2].gathered.tolist() == [[9, 9], [9, 9]]


class _FakeSelection:
    def __init__(self, gathered):
        self.gathered = gathered
        self.full_counts = gathered.reshape(-1)
        self.offsets = torch.cumsum(self.full_counts, 0) - self.full_counts


def test_the_oracle_ranks_the_full_row_once_whatever_cp(monkeypatch):
    raw, _, _ = small_batch(64, seed=5)
    calls = {"n": 0}
    rank_rows = simulation.expected_rows

    def counted(full_mask, global_index):
        calls["n"] += 1
        return rank_rows(full_mask, global_index)

    monkeypatch.setattr(simulation, "expected_rows", counted)
    assert simulate_small(raw, 64).ok
    assert calls["n"] == 1


def test_streamed_json_is_byte_identical_to_json_dumps(monkeypatch):
    import io
    import json

    from cpinspect.cli import common as cli

    raw, _, _ = small_batch(64, seed=9)
    result = simulate_small(raw, 64)
    monkeypatch.setattr(cli, "JSON_SLICE", 7)  # many slices per list, uneven last slice
    streamed = io.StringIO()
    cli.write_json(result.document(), streamed)
    assert streamed.getvalue() == json.dumps(result.to_dict())
