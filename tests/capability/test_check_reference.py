"""``cpinspect check PROGRAM --reference REF``: any CP program judged by its per-token output.

The attention programs of examples/cp_programs/check_attention.py (zigzag ring, all-gather-KV,
Ulysses) pass against the example's reference, torch's own scaled_dot_product_attention with a block
mask on the unsharded row. The buggy all-gather-KV (gathered keys read as if in row order) is caught
on exactly the ranks and first tokens a literal key-set comparison predicts: for each local query the
set of keys it may see under the bug vs causal attention within its segment, with zigzag positions
written out here from the chunk rule. Integer outputs are compared exactly (a program returning the
rank's own token ids passes; one id off on one rank is named at its literal global position), a
reference that is not per-token is an exit-2 error before any program runs, and the other verdicts
(divergence, shape) stay those of row selections.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cpinspect.check import run_case, run_check
from cpinspect.check.cases import Case
from cpinspect.check.reference import Reference, reference_signature
from cpinspect.cli.app import app
from cpinspect.core.errors import InputError
from cpinspect.core.tokens import token_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cp_programs" / "check_attention.py"
_spec = importlib.util.spec_from_file_location("cpinspect_example_check_attention", EXAMPLE)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)
REFERENCE = Reference(example.full_attention, "full_attention")


def literal_zigzag(cu, cp, rank):
    """Rank ``rank``'s global positions: per segment, chunk ``rank`` then chunk ``2*cp-1-rank`` of ``2*cp``."""
    held = []
    for start, end in zip(cu[:-1], cu[1:]):
        size = (end - start) // (2 * cp)
        for chunk in (rank, 2 * cp - 1 - rank):
            held += list(range(start + chunk * size, start + (chunk + 1) * size))
    return held


def hand_case(cp, lengths, ids=None):
    cu = [0]
    for length in lengths:
        cu.append(cu[-1] + length)
    total = cu[-1]
    ids = torch.arange(100, 100 + total) if ids is None else ids
    return Case("hand", "hand", cp, ids, torch.zeros(total, dtype=torch.bool), torch.tensor(cu), None, 0,
                token_config())


@pytest.mark.parametrize("program", ["ring_program", "allgather_kv_program", "ulysses_program"])
def test_the_cp_attention_programs_match_the_reference_on_every_rank(program):
    report = run_check(getattr(example, program), cp=[2, 3], cases=6, seed=3, signature=None, shrink=False,
                       reference=REFERENCE)
    assert report.ok, report.text()
    assert len(report.results) == 6 and report.signature == "generic"
    assert all(r.verdict == "pass" for result in report.results for r in result.ranks)
    assert any("compared with the reference full_attention" in note for note in report.notes)


def expected_first_wrong(cu, cp):
    """Per rank: (number of wrong local tokens, first wrong local index) by comparing key sets literally."""
    def segment(p):
        return max(i for i in range(len(cu) - 1) if cu[i] <= p)

    gathered = [p for r in range(cp) for p in literal_zigzag(cu, cp, r)]  # what slot j of the gathered keys holds
    out = {}
    for rank in range(cp):
        wrong = []
        for index, p in enumerate(literal_zigzag(cu, cp, rank)):
            truth = {k for k in range(cu[-1]) if segment(k) == segment(p) and k <= p}
            bug = {gathered[j] for j in range(cu[-1]) if segment(j) == segment(p) and j <= p}
            wrong += [index] if truth != bug else []
        out[rank] = (len(wrong), wrong[0] if wrong else None)
    return out


@pytest.mark.parametrize("cp, lengths", [(2, [8]), (3, [12, 6]), (2, [4, 12])])
def test_gathered_keys_read_in_row_order_are_caught_at_the_literally_predicted_rank_and_token(cp, lengths):
    case = hand_case(cp, lengths)
    fn = example.allgather_kv_in_row_order
    result = run_case(fn, case, reference_signature(fn, None, REFERENCE))
    cu = case.cu_seqlens.tolist()
    predicted = expected_first_wrong(cu, cp)
    assert any(first is not None for _, first in predicted.values())
    assert result.verdict == "wrong-output"
    for verdict in result.ranks:
        count, first = predicted[verdict.rank]
        if first is None:
            assert verdict.verdict == "pass", verdict.message
            continue
        position = literal_zigzag(cu, cp, verdict.rank)[first]
        seg = max(i for i in range(len(cu) - 1) if cu[i] <= position)
        chunk = (position - cu[seg]) // ((cu[seg + 1] - cu[seg]) // (2 * cp))
        assert (verdict.verdict, verdict.first_difference, verdict.segment, verdict.chunk) == (
            "wrong-output", first, seg, chunk)
        assert f"wrong output at {count} of {len(literal_zigzag(cu, cp, verdict.rank))} local token(s)" in \
            verdict.message
        assert f"local token {first}: global position {position}, segment {seg} chunk {chunk}" in verdict.message


def own_ids(group, input_ids, **_):
    return input_ids[0]


def own_ids_one_off_on_rank_1(group, input_ids, **_):
    ids = input_ids[0].clone()
    if group.rank() == 1:
        ids[3] += 1
    return ids


def whole_row_ids(input_ids, **_):
    return input_ids[0]


def test_integer_outputs_are_compared_exactly_at_the_layouts_global_positions():
    case = hand_case(3, [12, 18], ids=torch.randperm(30, generator=torch.Generator().manual_seed(1)) + 7)
    ref = Reference(whole_row_ids, "whole_row_ids", rtol=1.0, atol=1.0)  # tolerances are for floats only
    passed = run_case(own_ids, case, reference_signature(own_ids, None, ref))
    assert passed.verdict == "pass", passed.detail_lines()
    failed = run_case(own_ids_one_off_on_rank_1, case, reference_signature(own_ids_one_off_on_rank_1, None, ref))
    assert [r.verdict for r in failed.ranks] == ["pass", "wrong-output", "pass"]
    position = literal_zigzag([0, 12, 30], 3, 1)[3]
    assert f"wrong output at 1 of 10 local token(s) (compared exactly); first at local token 3: global position " \
           f"{position}" in failed.ranks[1].message
    assert f"expected [{int(case.input_ids[position])}], got [{int(case.input_ids[position]) + 1}]" in \
        failed.ranks[1].message


def test_a_wrong_shape_and_an_early_return_keep_their_verdicts():
    case = hand_case(2, [8])

    def half(group, input_ids, **_):
        return input_ids[0, :2]

    def early(group, input_ids, cu_seqlens_padded, **_):
        if group.rank() == 0:
            return torch.zeros(4, example.HEADS, example.DIM)
        return example.ring_program(group, input_ids, cu_seqlens_padded)

    ref = Reference(whole_row_ids, "whole_row_ids")
    shape = run_case(half, case, reference_signature(half, None, ref))
    assert shape.verdict == "wrong-length"
    assert "returned [2] for its 4 local token(s)" in shape.ranks[0].message
    hung = run_case(early, case, reference_signature(early, None, REFERENCE), timeout=2.0)
    assert hung.verdict == "divergence", hung.summary
    assert "rank 0 returned" in hung.summary


@pytest.mark.parametrize("bad, shown", [
    (lambda input_ids, **_: input_ids.float().mean(), "shape []"),
    (lambda input_ids, **_: input_ids.float(), "shape [1, "),  # [1, T]: the batch dimension first
    (lambda input_ids, **_: 3, "a int"),
])
def test_a_reference_that_is_not_per_token_is_an_input_error_before_any_program_runs(bad, shown):
    calls = []

    def program(group, input_ids, **_):
        calls.append(group.rank())
        return input_ids[0]

    with pytest.raises(InputError) as error:
        run_check(program, cp=[2], cases=3, signature=None, reference=Reference(bad, "bad"))
    assert shown in error.value.what and "per-token output [T, ...]" in error.value.what
    assert calls == []


def test_cli_passes_the_ring_flags_the_bug_and_exits_2_for_a_row_reference(tmp_path):
    runner = CliRunner()
    ref = ["--reference", f"{EXAMPLE}:full_attention"]
    good = runner.invoke(app, ["check", f"{EXAMPLE}:ring_program", *ref, "--cp", "2,3", "--cases", "4", "--json"])
    assert good.exit_code == 0, good.output
    out = tmp_path / "failures"
    bad = runner.invoke(app, ["check", f"{EXAMPLE}:allgather_kv_in_row_order", *ref, "--cp", "2", "--cases", "2",
                              "--out", str(out), "--no-color"])
    assert bad.exit_code == 1, bad.output
    text = " ".join(bad.output.split())
    assert "wrong-output" in text and "first at local token" in text
    assert f"--reference {EXAMPLE}:full_attention" in text and "expected cpinspect simulate" not in text
    source = tmp_path / "mine.py"
    source.write_text("def program(group, input_ids, **_):\n    open(__file__ + '.ran', 'w').close()\n"
                      "    return input_ids[0]\n\n\ndef ref(input_ids, **_):\n    return input_ids\n\n\n"
                      "def odd_ref(hidden_states):\n    return hidden_states\n")
    refused = runner.invoke(app, ["check", f"{source}:program", "--reference", f"{source}:ref", "--cp", "2"])
    assert refused.exit_code == 2, refused.output
    text = " ".join(refused.output.split())
    assert "per-token output [T, ...]" in text and "out[0] or out.squeeze(0)" in text and "Traceback" not in text
    assert not (tmp_path / "mine.py.ran").exists()
    unfit = runner.invoke(app, ["check", f"{source}:program", "--reference", f"{source}:odd_ref", "--cp", "2"])
    assert unfit.exit_code == 2 and "ref(**batch)" in " ".join(unfit.output.split()), unfit.output
