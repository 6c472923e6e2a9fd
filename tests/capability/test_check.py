"""`cpinspect check`: loading, signatures, generated cases, every verdict, rank-uniformity, exit codes.

Expected rows come from the published vectors of the reference (§3) or from hand-worked tiny
cases, never from re-running cpinspect's own selection.
"""

import json
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from cpinspect.check import load_function, run_case, run_check
from cpinspect.check.batch_cases import case_from_local_masks
from cpinspect.check.cases import KINDS, generate_cases
from cpinspect.check.verdicts import (
    BAD_RETURN,
    DIVERGENCE,
    EXCEPTION,
    PASS,
    RANK_DEPENDENT,
    TIMEOUT,
    WRONG_LENGTH,
    WRONG_ROWS,
)
from cpinspect.cli.app import app
from cpinspect.core.errors import InputError
from cpinspect.core.tokens import VIDEO_PAD

ROOT = Path(__file__).resolve().parents[2]
IMPLS = ROOT / "examples" / "impls"
runner = CliRunner()


def impl(name: str, function: str = "select_rows"):
    return load_function(f"{IMPLS / name}:{function}")


def line_of(name: str, text: str) -> str:
    """``examples/impls/<name>:<line>`` of the first line containing ``text`` (as reports print it)."""
    lines = (IMPLS / name).read_text().splitlines()
    number = next(i for i, line in enumerate(lines, 1) if text in line)
    return f"examples/impls/{name}:{number}"


def cli(*args):
    return runner.invoke(app, ["check", *[str(a) for a in args], "--no-color"])


# ---------------------------------------------------------------- acceptance 1: loading


@pytest.mark.parametrize("spec, text", [
    ("missing_file.py:select_rows", "the file missing_file.py does not exist"),
    (f"{IMPLS / 'correct.py'}:no_such_function", "has no attribute 'no_such_function'"),
    (f"{IMPLS / 'correct.py'}", "does not name a function"),
    ("no_such_package_xyz.module:fn", "No module named 'no_such_package_xyz"),
])
def test_bad_implementation_exits_2_with_one_paragraph(spec, text):
    result = cli(spec, "--cases", 4)
    assert result.exit_code == 2, result.output
    assert text in result.output
    assert "Fix:" in result.output and "Traceback" not in result.output


def test_import_error_and_non_callable_exit_2(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\n\nraise RuntimeError('cannot build the model here')\n")
    result = cli(f"{broken}:select_rows")
    assert result.exit_code == 2
    assert "importing" in result.output and "RuntimeError: cannot build the model here" in result.output
    assert "broken.py:3" in result.output  # where it raised
    constant = tmp_path / "constant.py"
    constant.write_text("select_rows = 3\n")
    result = cli(f"{constant}:select_rows")
    assert result.exit_code == 2 and "is a int, not a function" in result.output


def test_package_module_spec_loads(tmp_path, monkeypatch):
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "qwen_vl.py").write_text((IMPLS / "correct.py").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_function("mypkg.qwen_vl:get_cp_local_vision_embed_indices")
    assert fn.__name__ == "get_cp_local_vision_embed_indices" and fn.__module__ == "mypkg.qwen_vl"
    result = cli("mypkg.qwen_vl:get_cp_local_vision_embed_indices", "--signature", "megatron-bridge", "--cases", 7)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("args, text", [
    (["--signature", "torchtitan"], "unknown signature 'torchtitan'"),
    (["--cp", "2,x"], "is not a list of positive integers"),
    (["--cp", "0"], "is not a list of positive integers"),
    (["--cases", 0], "nothing to check"),
])
def test_bad_options_exit_2(args, text):
    result = cli(IMPLS / "correct.py:select_rows", *args)
    assert result.exit_code == 2, result.output
    assert text in result.output


# ---------------------------------------------------------------- acceptance 3: generated cases


def test_generated_cases_cover_every_kind_at_every_cp_and_are_valid_zigzag_rows():
    cases = generate_cases([2, 3, 4, 8], 56, seed=0)
    assert {(c.cp, c.kind) for c in cases} == {(cp, kind) for cp in (2, 3, 4, 8) for kind in KINDS}
    for case in cases:
        lengths = torch.tensor(case.segment_lengths)
        assert not bool((lengths % (2 * case.cp)).any()), case.name
        assert case.input_ids.numel() == case.total_tokens == case.vision_mask.numel()
        assert case.vision_embed_count == case.vision_tokens


def test_cp1_cases_include_odd_segments_and_rank_0_expects_every_row_in_order():
    """Issue 14 class 9: at cp 1 nothing is split, so no length rule applies; odd segments must be generated."""
    cases = generate_cases([1], 70, seed=0)
    odd = [c for c in cases if any(n % 2 for n in c.segment_lengths)]
    assert {c.kind for c in odd} >= {"empty-rank", "text-only", "single-segment", "many-short"}
    correct = impl("correct.py")
    for case in odd[:12]:
        result = run_case(correct, case)
        assert result.ok, result.summary
        assert result.ranks[0].expected == list(range(case.vision_tokens))  # one rank holds the row in order


def _chunk_of(case, position):
    cu = case.cu_seqlens
    segment = int(torch.searchsorted(cu[1:], torch.tensor(position), right=True))
    chunk_len = (int(cu[segment + 1]) - int(cu[segment])) // (2 * case.cp)
    return segment, (position - int(cu[segment])) // chunk_len


def test_crossing_cases_have_runs_across_rank_and_middle_chunk_boundaries():
    for case in (c for c in generate_cases([2, 3, 4, 8], 56, seed=1) if c.kind == "crossing"):
        mask = case.vision_mask.tolist()
        pairs = [(_chunk_of(case, p), _chunk_of(case, p + 1)) for p in range(len(mask) - 1) if mask[p] and mask[p + 1]]
        crossings = {(a[1], b[1]) for a, b in pairs if a[0] == b[0] and a[1] != b[1]}
        assert (case.cp - 1, case.cp) in crossings, case.name  # the middle: both chunks on rank cp-1
        assert any(a != case.cp - 1 for a, _ in crossings), case.name  # a boundary between two ranks


def test_empty_rank_text_only_video_single_and_many_short_cases():
    cases = generate_cases([2, 3, 4, 8], 140, seed=2)
    by_kind = {kind: [c for c in cases if c.kind == kind] for kind in KINDS}
    for case in by_kind["empty-rank"]:
        per_rank = case.local_masks().sum(dim=1)
        assert (per_rank == 0).any() and (per_rank > 0).any(), case.name
    for case in by_kind["text-only"]:
        segment = case.segment_of_positions()
        assert any(not case.vision_mask[segment == s].any() for s in range(case.num_segments)), case.name
    assert any(c.vision_tokens == 0 for c in by_kind["text-only"])  # sometimes a row without any vision
    for case in by_kind["video"]:
        assert (case.input_ids == VIDEO_PAD).any(), case.name
    assert any(c.logical_cu_seqlens is not None for c in by_kind["video"])  # padded segments
    assert all(c.num_segments == 1 for c in by_kind["single-segment"])
    for case in by_kind["many-short"]:
        assert case.num_segments >= 8 and max(case.segment_lengths) <= 4 * case.cp, case.name


def test_cases_are_seeded():
    def rows(seed):
        return [case.input_ids.tolist() for case in generate_cases([2, 3], 14, seed=seed)]

    assert rows(5) == rows(5)
    assert rows(5) != rows(6)


# ---------------------------------------------------------------- acceptance 2 + 7: published vectors

# Megatron-Bridge test_get_cp_local_vision_embed_indices_multiple_segments (reference §3.1)
BRIDGE_MULTI = ([0, 8, 16], [[1, 0, 1, 1, 0, 0, 1, 0], [1, 1, 0, 0, 1, 0, 1, 1]], 9, [[0, 3, 4, 8], [1, 2, 5, 6, 7]])
# ...allows_zero_vision_tokens: r0 empty, r1 gathered [[1, 1]]
BRIDGE_ZERO = ([0, 8], [[0, 0, 0, 0], [1, 0, 0, 1]], 2, [[], [0, 1]])
# ...forward_preserves_pre_sharded_packed_cp_layout: r0 mask [T, F, T, F], both ranks [[1, 1]]
BRIDGE_FORWARD = ([0, 8], [[1, 0, 1, 0], [1, 0, 0, 1]], 4, [[0, 3], [1, 2]])
# AReaL-derived oracle test (§3.3)
AREAL = ([0, 8, 16], [[0, 1, 0, 0, 0, 0, 1, 0], [1, 1, 1, 0, 0, 1, 1, 1]], 8, [[0, 7], [1, 2, 3, 4, 5, 6]])
# worked vision example (§3.5)
WORKED = ([0, 8, 24], [[0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]], 12,
          [[4, 5], [0, 1, 2, 3, 6, 7, 8, 9, 10, 11]])
VECTORS = [BRIDGE_MULTI, BRIDGE_ZERO, BRIDGE_FORWARD, AREAL, WORKED]


@pytest.mark.parametrize("cu, masks, count, rows", VECTORS)
@pytest.mark.parametrize("signature, function", [("default", "select_rows"),
                                                 ("megatron-bridge", "get_cp_local_vision_embed_indices")])
def test_correct_example_reproduces_the_published_vectors(cu, masks, count, rows, signature, function):
    case = case_from_local_masks(cu, masks, vision_embed_count=count)
    result = run_case(impl("correct.py", function), case, signature)
    assert [r.got for r in result.ranks] == rows
    assert [r.expected for r in result.ranks] == rows  # the oracle agrees with the published vectors
    assert result.verdict == PASS


def test_megatron_bridge_signature_passes_packed_seq_params():
    seen = {}

    def spy(vision_mask, packed_seq_params, *, vision_embed_count, cp_group, embed_device):
        seen[cp_group.rank()] = (vision_mask.shape, packed_seq_params, vision_embed_count, embed_device)
        return impl("correct.py", "get_cp_local_vision_embed_indices")(
            vision_mask, packed_seq_params, vision_embed_count=vision_embed_count, cp_group=cp_group,
            embed_device=embed_device)

    case = next(c for c in generate_cases([2], 7, seed=0) if c.kind == "video" and c.logical_cu_seqlens is not None)
    assert run_case(spy, case, "megatron-bridge").verdict == PASS
    shape, params, count, device = seen[1]
    assert shape == (1, case.total_tokens // 2) and count == case.vision_embed_count and device == torch.device("cpu")
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q_padded.tolist() == case.cu_seqlens.tolist()
    assert params.cu_seqlens_q.tolist() == case.logical_cu_seqlens.tolist() == params.cu_seqlens_kv.tolist()
    assert params.cu_seqlens_q.dtype == torch.int32
    assert params.max_seqlen_q == max(case.segment_lengths) == params.max_seqlen_kv


def test_count_mismatch_raises_on_all_ranks_together_with_the_upstream_text():
    cu, masks, _, _ = BRIDGE_MULTI
    case = case_from_local_masks(cu, masks, vision_embed_count=10)
    result = run_case(impl("correct.py", "get_cp_local_vision_embed_indices"), case, "megatron-bridge")
    assert result.verdict == EXCEPTION and not result.partial
    assert "all 2 ranks raised together" in result.summary
    upstream = "Packed CP ranks contain 9 vision tokens, but the vision encoder produced 10 embeddings."
    assert all(upstream in rank.message for rank in result.ranks)


# ---------------------------------------------------------------- acceptance 4 + 7: verdicts of the examples


def test_correct_example_passes_every_generated_case_in_both_signatures():
    for signature, function in (("default", "select_rows"), ("megatron-bridge", "get_cp_local_vision_embed_indices")):
        report = run_check(impl("correct.py", function), cases=28, signature=signature, shrink=False)
        assert report.ok, report.text()
        assert len(report.results) == 28 and report.uniformity.runs > 0


def test_early_return_diverges_naming_ranks_ops_and_lines():
    case = case_from_local_masks([0, 4], [[0, 0], [1, 0]])  # rank 0 holds no vision token
    start = time.monotonic()
    result = run_case(impl("early_return.py"), case, timeout=120.0)
    assert time.monotonic() - start < 60.0  # reported when visible, not after the (long) timeout, even under load
    assert result.verdict == DIVERGENCE
    lines = result.detail_lines()
    returned = line_of("early_return.py", "return torch.empty(0")
    gather = line_of("correct.py", "dist.all_gather(")
    assert f"rank 0: returned at {returned} after 0 collective(s)" in lines
    assert f"rank 1: waiting in all_gather([1, 2] int64) #0 at {gather}" in lines


def test_off_by_one_gives_wrong_rows_with_the_place():
    # one segment of 4 tokens, cp 2: the vision token is global 2 = rank 1's second chunk (chunk 2)
    case = case_from_local_masks([0, 4], [[0, 0], [0, 1]])
    result = run_case(impl("off_by_one.py"), case)
    assert result.verdict == WRONG_ROWS
    rank1 = result.ranks[1]
    assert rank1.expected == [0] and rank1.got == [1]  # inclusive prefix sum: starts at the next chunk's row
    assert (rank1.first_difference, rank1.segment, rank1.chunk) == (0, 0, 2)
    assert "local position 1, global position 2, segment 0 chunk 2: expected row 0, got 1" in rank1.message


def test_mirrored_chunks_reuse_chunk_r():
    case = case_from_local_masks([0, 4], [[0, 0], [1, 1]])  # global 1 (chunk 1) and 2 (chunk 2)
    result = run_case(impl("mirrored_chunks.py"), case)
    assert result.verdict == WRONG_ROWS
    assert result.ranks[1].expected == [0, 1] and result.ranks[1].got == [0, 0]
    assert result.ranks[0].verdict == PASS


def _torch_accepts_apply_keywords() -> bool:
    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, factor):
            return x * factor

        @staticmethod
        def backward(ctx, grad):
            return grad, None

    try:
        Twice.apply(torch.ones(1), factor=2)
    except TypeError:
        return False
    return True


def test_keyword_apply_raises_on_every_rank_with_the_old_torch_message():
    case = case_from_local_masks(*BRIDGE_MULTI[:2])
    result = run_case(impl("keyword_apply.py"), case)
    assert result.verdict == EXCEPTION and not result.partial
    site = line_of("keyword_apply.py", ".apply(counts, cp_group=cp_group)")
    for rank in result.ranks:
        assert "TypeError" in rank.message and "apply() takes no keyword arguments" in rank.message
        assert f"at {site} after 0 collective(s)" in rank.message
    relaxed = run_case(impl("keyword_apply.py"), case, strict_apply=False)
    assert relaxed.verdict == (PASS if _torch_accepts_apply_keywords() else EXCEPTION)
    assert torch.autograd.Function.apply.__func__.__qualname__ == "Function.apply"  # restored afterwards


# ---------------------------------------------------------------- acceptance 4: the other verdicts


def _head_chunk_only(vision_mask, cu_seqlens, *, vision_embed_count, cp_group):
    """Forgets the mirror chunk: only the rows of the tokens in the first local chunk."""
    rows = impl("correct.py")(vision_mask, cu_seqlens, vision_embed_count=vision_embed_count, cp_group=cp_group)
    chunk = (cu_seqlens[1] - cu_seqlens[0]) // (2 * cp_group.size())
    return rows[: int(vision_mask[:chunk].sum())]


def test_wrong_length_shows_expected_and_got():
    case = case_from_local_masks([0, 8], [[1, 0, 0, 1], [0, 1, 1, 0]])
    result = run_case(_head_chunk_only, case)
    assert result.verdict == WRONG_LENGTH
    assert result.ranks[0].expected == [0, 3] and result.ranks[0].got == [0]
    assert "wrong length: 1 rows for 2 local vision token(s); expected 0, 3, got 0" in result.ranks[0].message


def test_bad_return_names_the_type():
    def as_list(vision_mask, cu_seqlens, *, vision_embed_count, cp_group):
        return impl("correct.py")(vision_mask, cu_seqlens, vision_embed_count=vision_embed_count,
                                  cp_group=cp_group).tolist()

    result = run_case(as_list, case_from_local_masks(*BRIDGE_MULTI[:2]))
    assert result.verdict == BAD_RETURN
    assert result.ranks[0].message == "rank 0: returned a list, not a LongTensor of rows"


def test_exception_on_one_rank_says_the_other_would_hang():
    def fails_on_rank1(vision_mask, cu_seqlens, *, vision_embed_count, cp_group):
        if cp_group.rank() == 1:
            raise ValueError("rank-local assertion")
        return impl("correct.py")(vision_mask, cu_seqlens, vision_embed_count=vision_embed_count, cp_group=cp_group)

    result = run_case(fails_on_rank1, case_from_local_masks(*BRIDGE_MULTI[:2]))
    assert result.verdict == EXCEPTION and result.partial
    gather = line_of("correct.py", "dist.all_gather(")
    assert result.summary == ("only rank(s) 1 of 2 raised; in a real job the others would hang: rank 0 in "
                              f"all_gather([2, 2] int64) #0 at {gather}")
    assert ("rank 1: raised ValueError: rank-local assertion at tests/capability/test_check.py:"
            in result.ranks[1].message)


def test_different_shapes_are_divergence():
    def uneven(vision_mask, cu_seqlens, *, vision_embed_count, cp_group):
        mine = torch.zeros(2 + cp_group.rank(), dtype=torch.long)  # each rank sizes the buffers by itself
        dist.all_gather([torch.empty_like(mine) for _ in range(cp_group.size())], mine, group=cp_group)

    result = run_case(uneven, case_from_local_masks(*WORKED[:2]))
    assert result.verdict == DIVERGENCE
    assert "rank 0 called all_gather([2] int64)" in result.summary
    assert "rank 1 called all_gather([3] int64)" in result.summary


def test_a_hang_in_user_code_is_a_timeout_and_stops_the_run():
    def spins_on_rank1(vision_mask, cu_seqlens, *, vision_embed_count, cp_group):
        if cp_group.rank() == 1:
            while True:  # pure-Python loop: interrupted once the run has timed out
                pass
        return impl("correct.py")(vision_mask, cu_seqlens, vision_embed_count=vision_embed_count, cp_group=cp_group)

    start = time.monotonic()
    report = run_check(spins_on_rank1, cp=[2], cases=20, timeout=0.3, shrink=False)
    assert time.monotonic() - start < 4.0
    assert [r.verdict for r in report.results] == [TIMEOUT]
    assert "did not complete within 0.3 s" in report.results[0].summary
    assert any(line.startswith("rank 1: still running in its own code after 0 collective(s)")
               for line in report.results[0].detail_lines())
    assert "stopped after case 1 of 20: it timed out" in report.notes[0]
    deadline = time.monotonic() + 2.0
    while any(t.name.startswith("cpinspect-rank") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the spinning rank thread was not stopped"
        time.sleep(0.05)


# ---------------------------------------------------------------- acceptance 6: rank-uniform control flow


def test_rank_dependent_collectives_are_reported_when_no_case_diverged(tmp_path):
    # every rank holds vision tokens, so the early return is never taken and the case passes
    case = case_from_local_masks(*WORKED[:2], vision_embed_count=12)
    report = run_check(impl("early_return.py"), cp=[2], cases=0, batches=[_saved(case, tmp_path)], shrink=False)
    assert [r.verdict for r in report.results] == [PASS]
    assert not report.ok and report.verdict_counts() == {PASS: 1, RANK_DEPENDENT: 1}
    assert "ran without divergence" in report.uniformity.finding
    assert report.uniformity.witness.verdict == DIVERGENCE
    assert f"✗ {RANK_DEPENDENT}:" in report.text()


def test_a_raise_on_some_ranks_after_the_same_collectives_is_the_exception_finding(tmp_path):
    """Issue 14 class 9: moving the vision tokens off rank 0 makes only rank 0 raise, after the all-gather every
    rank entered: that is an exception on rank-local data, not rank-dependent collectives."""
    correct = impl("correct.py")

    def raises_when_empty(vision_mask, cu_seqlens, *, vision_embed_count, cp_group):
        rows = correct(vision_mask, cu_seqlens, vision_embed_count=vision_embed_count, cp_group=cp_group)
        if not vision_mask.any():
            raise IndexError("no vision token on this rank")
        return rows

    case = case_from_local_masks(*WORKED[:2], vision_embed_count=12)  # both ranks hold vision tokens: it passes
    report = run_check(raises_when_empty, cp=[2], cases=0, batches=[_saved(case, tmp_path)], shrink=False)
    assert [r.verdict for r in report.results] == [PASS]
    assert report.verdict_counts() == {PASS: 1, EXCEPTION: 1}
    assert report.uniformity.verdict == EXCEPTION and RANK_DEPENDENT not in report.text()
    assert "raised after the same 1 collective(s) as every other rank" in report.uniformity.finding
    witness = report.uniformity.witness
    raised = [r.rank for r in witness.ranks if r.status == "raised"]
    assert len(raised) == 1 and [c.op for c in witness.ranks[0].calls] == [c.op for c in witness.ranks[1].calls]
    assert "✗ exception: " in report.text()


def test_the_reason_for_skipping_the_uniformity_probe_is_the_true_one(tmp_path):
    correct = impl("correct.py")
    at_cp1 = run_check(correct, cp=[1], cases=7, shrink=False)
    assert at_cp1.ok and at_cp1.uniformity.runs == 0
    assert "rank-uniformity not checked (every case ran at cp 1, where one rank holds everything)" in at_cp1.text()
    # every token is a vision token: no variant can move them off a rank, though the case has cp 2 and vision
    crowded = case_from_local_masks([0, 8], [[1, 1, 1, 1], [1, 1, 1, 1]])
    full = run_check(correct, cp=[2], cases=0, batches=[_saved(crowded, tmp_path)], shrink=False)
    assert full.ok and full.uniformity.runs == 0
    assert "no clean case with cp > 1 and vision tokens" not in full.text()
    assert "no clean case's vision tokens could be moved" in full.text()
    # the time budget is spent before the probe: it says so, not that a clean case was lacking
    from cpinspect.check.signatures import get_signature
    from cpinspect.check.uniformity import check_uniformity

    clean = run_case(correct, case_from_local_masks(*WORKED[:2], vision_embed_count=12))
    assert clean.ok
    late = check_uniformity(correct, get_signature("default"), [clean], timeout=5.0, strict_apply=True,
                            deadline=time.monotonic() - 1.0)
    assert late.runs == 0 and late.skipped == "--max-time was reached after 0 perturbed run(s)"


def _saved(case, folder):
    from cpinspect.check.shrink import save_case

    return save_case(case, folder, "batch")


def test_uniform_data_dependent_collectives_are_not_flagged():
    def extra_barrier_when_crowded(vision_mask, cu_seqlens, *, vision_embed_count, cp_group):
        most = vision_mask.sum().view(1)
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=cp_group)
        if int(most) > 3:  # depends on data, but on data every rank now shares
            dist.barrier(group=cp_group)
        return impl("correct.py")(vision_mask, cu_seqlens, vision_embed_count=vision_embed_count, cp_group=cp_group)

    report = run_check(extra_barrier_when_crowded, cp=[2, 3], cases=14, shrink=False)
    assert report.ok, report.text()
    assert report.uniformity.runs >= 4


# ---------------------------------------------------------------- acceptance 9: the command and exit codes


def test_cli_exit_codes_for_each_example():
    assert cli(IMPLS / "correct.py:select_rows", "--cases", 28).exit_code == 0
    bridge = cli(IMPLS / "correct.py:get_cp_local_vision_embed_indices", "--signature", "megatron-bridge",
                 "--cases", 28)
    assert bridge.exit_code == 0, bridge.output
    assert "✓ all 28 case(s) match the oracle on every rank" in bridge.output


@pytest.mark.parametrize("name, verdict", [("early_return.py", DIVERGENCE), ("off_by_one.py", WRONG_ROWS),
                                           ("mirrored_chunks.py", WRONG_ROWS), ("keyword_apply.py", EXCEPTION)])
def test_cli_reports_each_buggy_example_and_exits_1(name, verdict, tmp_path):
    result = cli(IMPLS / f"{name}:select_rows", "--cp", "2,3", "--cases", 14, "--out", tmp_path)
    assert result.exit_code == 1, result.output
    assert f"✗ {verdict}:" in result.output
    assert "replay   cpinspect check" in result.output


def test_cli_batch_files_and_json(tmp_path):
    result = runner.invoke(app, ["check", f"{IMPLS / 'mirrored_chunks.py'}:select_rows", "--batch",
                                 str(ROOT / "examples" / "presharded_cp2"), "--cases", "0", "--json", "--no-shrink"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)  # stderr has the import note
    assert doc["cases"] == 1 and doc["ok"] is False and doc["verdicts"] == {WRONG_ROWS: 1}
    failing = doc["results"][0]
    assert failing["cp"] == 2 and failing["segments"] == [96, 48, 144, 48]
    rank0 = failing["ranks"][0]
    assert rank0["expected"][:9] == list(range(9))  # the README's rank 0 rows: 0-8, 57-75, 120-122
    assert rank0["expected"][9:] == list(range(57, 76)) + [120, 121, 122]


def test_input_error_in_a_batch_file_exits_2(tmp_path):
    torch.save({"input_ids": torch.zeros(1, 10, dtype=torch.long), "cu_seqlens": torch.tensor([0, 10])},
               tmp_path / "odd.pt")
    result = cli(IMPLS / "correct.py:select_rows", "--batch", tmp_path / "odd.pt", "--cp", "2", "--cases", 0)
    assert result.exit_code == 2
    assert "segment 0 has physical length 10, which is not divisible by 2*cp = 4" in result.output


def test_inputs_are_fresh_copies_for_every_rank():
    def scribbles(vision_mask, cu_seqlens, *, vision_embed_count, cp_group):
        rows = impl("correct.py")(vision_mask, cu_seqlens, vision_embed_count=vision_embed_count, cp_group=cp_group)
        vision_mask.fill_(True)
        cu_seqlens.fill_(0)
        return rows

    case = case_from_local_masks(*WORKED[:2])
    before = case.vision_mask.clone()
    assert run_case(scribbles, case).verdict == PASS
    assert torch.equal(case.vision_mask, before) and case.cu_seqlens.tolist() == [0, 8, 24]


def test_input_error_type_for_library_callers():
    with pytest.raises(InputError, match="unknown signature"):
        run_check(impl("correct.py"), cases=1, signature="nope")
