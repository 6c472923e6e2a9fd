"""The CP programs of examples/cp_programs under gloo (real processes): the three attention programs match
full attention on random packed rows (outputs and q/k/v gradients), and the padded vision all-gather
matches the unsharded encoder (forward and backward), with the oracles of
tests/capability/test_cp_programs.py (torch's scaled_dot_product_attention per document; the encoder on
all patches). One process run executes all four programs (real processes are slow to start). The
Megatron-Bridge-style vision all-gather (uneven sizes) is refused under gloo as gloo's limit."""

import pytest
import torch
import torch.distributed as dist

from cpinspect.groups.gloo import execute_gloo
from cpinspect.groups.recording import GlooLimitError, RecordingGroup
from tests.capability.test_cp_programs import (
    assert_matches_full_attention,
    assert_vision_matches_unsharded,
    attention,
    random_row,
    rank_program,
    vision_case,
    vision_rank,
)
from tests.threaded_gloo import run_gloo_threads

PROGRAMS = ["allgather_kv_attention", "ulysses_attention", "ring_attention"]


def every_program(group, rows, vision):
    """Each rank: every attention program on each row (programs named: the example is loaded by path), then
    the vision all-gather in the padded form (gloo has no uneven all-gather; see the last test)."""
    out = {(name, i): rank_program(group, getattr(attention, name), *row)
           for i, row in enumerate(rows) for name in PROGRAMS}
    out["vision"] = vision_rank(group, *vision, True)
    return out


def test_cp_programs_under_gloo_match_full_attention_and_the_unsharded_encoder():
    # one process run (cp 3: two ring hops; 6 heads so that Ulysses splits them) on two random rows
    rows, vision = [random_row(seed, 3, heads=6) for seed in (5, 6)], vision_case(3, 7)
    states, failure = execute_gloo(3, every_program, rows, vision, timeout=120.0)
    assert failure is None, str(failure)
    ops = {c.op for c in states[0].calls}
    # the programs' collectives and point-to-point went through real gloo, recorded
    assert {"all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single", "all_reduce"} <= ops
    for i, row in enumerate(rows):
        for name in PROGRAMS:
            assert_matches_full_attention([s.value[(name, i)] for s in states], *row)
    assert_vision_matches_unsharded([s.value["vision"] for s in states], *vision)


def bridge_vision(group, vision):
    return vision_rank(group, *vision, False)


def test_the_bridge_style_uneven_all_gather_is_named_as_a_limit_of_gloo_not_as_the_users_error():
    vision = vision_case(2, 1)
    assert len({vision[1][r + 1] - vision[1][r] for r in range(2)}) == 2  # the ranks hold different row counts
    states, failure = execute_gloo(2, bridge_vision, vision, timeout=60.0)
    assert failure is not None and failure.kind == "exception"
    text = str(failure)
    assert text.startswith("all ranks raised: rank 0 raised GlooLimitError: all_gather with different sizes per "
                           "rank (out=[")
    assert "is not implemented by gloo (ProcessGroupGloo::allgather needs every rank's tensor to have the same " \
           "size)" in text
    assert "attention.py" not in text and "test_" not in text  # not the user's line: the program is right on NCCL
    assert [len(s.calls) for s in states] == [1, 1]  # the count all-gather ran; the uneven one never reached gloo


def _uneven_call(op, group, r):
    if op == "all_to_all":
        ins, outs = [torch.zeros(r + j + 1) for j in range(2)], [torch.empty(s + r + 1) for s in range(2)]
        return lambda g: dist.all_to_all(outs, ins, group=g)
    return lambda g: dist.all_gather([torch.empty(s + 1) for s in range(2)], torch.zeros(r + 1), group=g)


@pytest.mark.parametrize("op, gloo_says, ours", [
    ("all_to_all", "ProcessGroupGloo::alltoall: invalid tensor size",
     "all_to_all with tensors of different shapes ("),
    ("all_gather", "ProcessGroupGloo::allgather: invalid tensor size",
     "all_gather with different sizes per rank (out=[[1], [2]])"),
])
def test_what_gloo_itself_refuses_is_named_as_its_limit_before_the_watchdog_is_asked(op, gloo_says, ours):
    # in-process: real gloo backends on threads (tests/threaded_gloo.py), bare and under the recording group
    def rank(group):
        asked = []
        recording = RecordingGroup(group, asked.append, lambda event: asked.append(event) or b"go")
        with pytest.raises(RuntimeError, match=gloo_says):  # torch's own gloo backend refuses the call
            _uneven_call(op, group, group.rank())(group)
        with pytest.raises(GlooLimitError) as limit:
            _uneven_call(op, group, group.rank())(recording)
        return str(limit.value), asked

    for text, asked in run_gloo_threads(2, rank, timeout=60.0):
        assert text.startswith(ours) and "is not implemented by gloo (ProcessGroupGloo::" in text
        assert asked == []  # refused before the watchdog (and gloo) saw it
