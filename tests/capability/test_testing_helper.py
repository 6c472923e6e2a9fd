"""`cpinspect.testing.assert_selection_matches`: the check inside a user's own pytest suite."""

from pathlib import Path

import pytest

from cpinspect.check import load_function
from cpinspect.core.errors import InputError
from cpinspect.testing import assert_selection_matches
from tests.capability.test_check import _torch_accepts_apply_keywords

IMPLS = Path(__file__).resolve().parents[2] / "examples" / "impls"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "qwen3vl_packed.pt"


def impl(name: str, function: str = "select_rows"):
    return load_function(f"{IMPLS / name}:{function}")


def test_a_correct_function_passes_and_returns_the_report():
    report = assert_selection_matches(impl("correct.py"), cp=[2, 4], cases=28, seed=0)
    assert report.ok and len(report.results) == 28
    assert {r.case.cp for r in report.results} == {2, 4}


def test_megatron_bridge_signature_and_a_single_cp():
    fn = impl("correct.py", "get_cp_local_vision_embed_indices")
    report = assert_selection_matches(fn, cp=3, cases=14, seed=1, signature="megatron-bridge")
    assert {r.case.cp for r in report.results} == {3}


def test_batches_are_checked_too():
    report = assert_selection_matches(impl("correct.py"), cp=[2], cases=0, batches=[EXAMPLE])
    assert [r.case.name for r in report.results] == [f"{EXAMPLE} at cp 2"]


def test_the_layout_reaches_the_check(tmp_path):
    """The zigzag example passes zigzag cases and fails the same cases cut contiguously."""
    assert assert_selection_matches(impl("correct.py"), cp=[2], cases=7, layout="zigzag").ok
    with pytest.raises(AssertionError, match="layout contiguous"):
        assert_selection_matches(impl("correct.py"), cp=[2], cases=7, layout="contiguous", save_dir=tmp_path)


def test_a_deadlock_raises_assertion_error_with_the_report_and_a_replayable_file(tmp_path):
    with pytest.raises(AssertionError) as info:
        assert_selection_matches(impl("early_return.py"), cp=[2, 3], cases=14, seed=0, save_dir=tmp_path)
    message = str(info.value)
    assert "✗ divergence:" in message and "rank-dependent-collectives" in message
    assert "returned at examples/impls/early_return.py:" in message
    assert "smallest failing batch" in message and "cp 2, 1 segment(s) [4], 4 tokens, 1 vision" in message
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert "early_return.select_rows-divergence-cp2,3-seed0.safetensors" in saved
    assert f"--batch {tmp_path}" in message  # the replay command points at the saved file


def test_wrong_rows_report_expected_and_got():
    with pytest.raises(AssertionError, match=r"✗ wrong-rows: .*\n(.*\n)*.*rank 1: wrong rows: expected 0, got 1"):
        assert_selection_matches(impl("off_by_one.py"), cp=[2], cases=7)


def test_a_function_with_the_other_signature_fails_loudly():
    with pytest.raises(AssertionError, match="unexpected keyword argument 'embed_device'") as info:
        assert_selection_matches(impl("correct.py"), cp=[2], cases=7, signature="megatron-bridge")
    assert "does the function take the 'megatron-bridge' signature?" in str(info.value)


def test_unknown_signature_is_an_input_error():
    with pytest.raises(InputError, match="unknown signature 'nemo'"):
        assert_selection_matches(impl("correct.py"), cp=[2], cases=1, signature="nemo")


def test_keyword_apply_fails_unless_allowed():
    with pytest.raises(AssertionError, match="apply\\(\\) takes no keyword arguments"):
        assert_selection_matches(impl("keyword_apply.py"), cp=[2], cases=7)
    if not _torch_accepts_apply_keywords():
        pytest.skip("this torch rejects apply() keywords itself")
    assert assert_selection_matches(impl("keyword_apply.py"), cp=[2], cases=7, allow_apply_keywords=True).ok
