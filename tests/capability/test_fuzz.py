"""Bounded fuzzing: seeded random batches against the literal oracle, random divergences through the group.

* 1,050 random rows (every layout, cp 1-16, full and pre-sharded, empty segments, vision runs that
  cross chunk and rank boundaries) go through :func:`cpinspect.simulation.run.simulate`; every
  rank's held positions and selected embedding rows must equal tests/literal.py, which shares no
  code with cpinspect, and the verdict must be "consistent".
* 240 random SPMD programs (cp 2-16, 1-5 collectives of four kinds) each get one injected
  deviation on one random rank at one random step (it returns early, changes the shape, calls
  another collective, or raises); the simulated group must report it, naming that rank, within
  its deadline, and the same program without the deviation must compute the right values.

The rows are generated here with :mod:`random` (not cpinspect's synth helpers), so the inputs do
not come from the code under test either. Budget: well under a minute on a loaded 2-core machine.
"""

from __future__ import annotations

import random
import time

import pytest
import torch
import torch.distributed as dist

from cpinspect.core.loading import load_batch
from cpinspect.core.tokens import token_config
from cpinspect.groups.simulated import SpmdError, execute_spmd
from cpinspect.simulation.run import simulate
from tests import literal

TOKENS = token_config()
LAYOUTS = ("zigzag", "sequence-zigzag", "contiguous")
BATCHES, GROUPS_PER_BATCH = 1050, 35  # 30 parametrized groups of 35 seeds
DIVERGENCES, DIVERGENCES_PER_GROUP = 240, 40


def random_row(rng: random.Random, cp: int) -> tuple[list[int], list[int], list[bool]]:
    """(cu_seqlens, input ids, vision mask): segment lengths multiples of 2*cp, some empty, vision in runs."""
    lengths = [2 * cp * rng.choice((0, 1, 1, 2, 3, 5)) for _ in range(rng.randint(1, 6))]
    if not sum(lengths):
        lengths[rng.randrange(len(lengths))] = 2 * cp
    cu = [0]
    for length in lengths:
        cu.append(cu[-1] + length)
    ids, mask = [], []
    density = rng.random()
    while len(ids) < cu[-1]:
        run = min(rng.randint(1, 9), cu[-1] - len(ids))
        vision = rng.random() < density
        token = rng.choice((TOKENS.image_token_id, TOKENS.video_token_id)) if vision else None
        for _ in range(run):
            ids.append(token if vision else rng.randrange(10, 150000))
            mask.append(vision)
    return cu, ids, mask


def literal_held(cu: list[int], cp: int, kind: str) -> list[list[int]]:
    if kind == "zigzag":
        return literal.zigzag_indices(cu, cp)
    if kind == "sequence-zigzag":
        return literal.zigzag_indices([0, cu[-1]], cp)
    return literal.contiguous_indices(cu[-1], cp)


@pytest.mark.parametrize("group", range(BATCHES // GROUPS_PER_BATCH))
def test_random_batches_match_the_literal_oracle(group):
    for seed in range(group * GROUPS_PER_BATCH, (group + 1) * GROUPS_PER_BATCH):
        rng = random.Random(seed)
        cp = rng.randint(1, 16)
        kind = LAYOUTS[seed % 3]
        sharded = seed % 2 == 1
        cu, ids, mask = random_row(rng, cp)
        held = literal_held(cu, cp, kind)
        full = {"input_ids": torch.tensor([ids]), "cu_seqlens": torch.tensor(cu, dtype=torch.int32)}
        if sharded:  # what each rank's dataloader hands over: its local ids, the global boundaries
            source = [{"input_ids": torch.tensor([[ids[g] for g in mine]]), "cu_seqlens": full["cu_seqlens"]}
                      for mine in held]
            if cp == 1:
                source = source[0]
        else:
            source = full
        result = simulate(load_batch(source), cp, kind, tokens=TOKENS, timeout=30.0)
        where = f"seed {seed}: cp {cp}, {kind}, {'pre-sharded' if sharded else 'full'}, cu {cu}"
        assert result.full_mask.tolist() == mask, where
        for rank, rank_result in enumerate(result.ranks):
            assert rank_result.global_indices.tolist() == held[rank], where
            assert rank_result.selected_rows.tolist() == literal.expected_rows(mask, held[rank]), where
        assert result.ok and not result.findings, where


COLLECTIVES = ("all_gather", "all_reduce", "broadcast", "barrier")
DEVIATIONS = ("return", "shape", "other collective", "raise")


def spmd_program(steps: list[str], deviant: int | None, at: int, how: str):
    """``steps`` collectives; rank ``deviant`` deviates at step ``at`` as ``how`` says. Returns what it got."""

    def program(group):
        rank, size = group.rank(), group.size()
        got = []
        for index, name in enumerate(steps):
            if rank == deviant and index == at:
                if how == "return":
                    return got
                if how == "raise":
                    raise ValueError(f"injected on rank {rank}")
                if how == "other collective":
                    name = COLLECTIVES[(COLLECTIVES.index(name) + 1) % len(COLLECTIVES)]
            width = 3 if rank == deviant and index == at and how == "shape" else 2
            value = torch.full((width,), rank + 10 * index)
            if name == "all_gather":
                out = [torch.empty_like(value) for _ in range(size)]
                dist.all_gather(out, value, group=group)
                got.append([int(t[0]) for t in out])
            elif name == "all_reduce":
                dist.all_reduce(value, group=group)
                got.append(int(value[0]))
            elif name == "broadcast":
                dist.broadcast(value, src=index % size, group=group)
                got.append(int(value[0]))
            else:
                if width == 3:  # a barrier has no shape: make the deviation another collective
                    dist.all_reduce(value, group=group)
                else:
                    dist.barrier(group=group)
                got.append(None)
        return got

    return program


def expected_values(steps: list[str], size: int) -> list[object]:
    out: list[object] = []
    for index, name in enumerate(steps):
        values = [rank + 10 * index for rank in range(size)]
        out.append({"all_gather": values, "all_reduce": sum(values), "broadcast": values[index % size],
                    "barrier": None}[name])
    return out


@pytest.mark.parametrize("group", range(DIVERGENCES // DIVERGENCES_PER_GROUP))
def test_random_divergences_are_reported_with_the_rank_and_never_hang(group):
    for seed in range(group * DIVERGENCES_PER_GROUP, (group + 1) * DIVERGENCES_PER_GROUP):
        rng = random.Random(10_000 + seed)
        size = rng.randint(2, 16)
        steps = [rng.choice(COLLECTIVES) for _ in range(rng.randint(1, 5))]
        deviant, at, how = rng.randrange(size), rng.randrange(len(steps)), rng.choice(DEVIATIONS)
        where = f"seed {seed}: cp {size}, {steps}, rank {deviant} {how} at step {at}"
        states, failure = execute_spmd(size, spmd_program(steps, None, 0, how), timeout=10.0)
        assert failure is None, where
        assert [s.value for s in states] == [expected_values(steps, size)] * size, where
        start = time.monotonic()
        states, failure = execute_spmd(size, spmd_program(steps, deviant, at, how), timeout=10.0)
        assert time.monotonic() - start < 5.0, where  # reported when it happens, not at the deadline
        assert isinstance(failure, SpmdError), where
        if how == "raise":
            assert failure.kind in ("exception", "divergence"), where
            assert f"rank {deviant} raised ValueError: injected on rank {deviant}" in str(failure), where
        else:
            assert failure.kind == "divergence", where
            assert f"rank {deviant}" in str(failure), where
