"""`cpinspect check --layout L`: cases cut by any named layout, judged by that layout's oracle.

Expected rows and local masks come from tests/literal.py (the layouts' definitions in plain lists),
never from cpinspect's oracle; the implementations below are written here for the purpose.
"""

import json
import shlex
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from cpinspect.check import load_function, run_case, run_check
from cpinspect.check.batch_cases import case_from_local_masks
from cpinspect.check.cases import generate_cases
from cpinspect.check.verdicts import PASS, WRONG_ROWS
from cpinspect.cli.app import app
from cpinspect.core.layout import LAYOUTS
from tests import literal

ZIGZAG_IMPL = "examples/impls/correct.py:select_rows"
CONTIGUOUS_SOURCE = '''
import torch
import torch.distributed as dist


def select_rows(vision_mask, cu_seqlens, *, vision_embed_count, cp_group):
    """Contiguous shares: rank r holds positions [r*T/cp, (r+1)*T/cp), so its rows start after the
    vision tokens of every lower rank (one all-gather of the local counts, on every rank)."""
    count = vision_mask.sum().reshape(1).to(torch.long)
    counts = [torch.empty_like(count) for _ in range(cp_group.size())]
    dist.all_gather(counts, count, group=cp_group)
    before = int(torch.cat(counts)[: cp_group.rank()].sum())
    return before + torch.arange(int(count))
'''


@pytest.fixture
def contiguous_impl(tmp_path: Path) -> str:
    path = tmp_path / "contiguous_rows.py"
    path.write_text(CONTIGUOUS_SOURCE)
    return f"{path}:select_rows"


def _receives(seen: dict[int, list[bool]]):
    """A selection that records the local mask each rank receives and returns no valid rows."""

    def select(vision_mask, cu_seqlens, *, vision_embed_count, cp_group):
        seen[cp_group.rank()] = vision_mask.tolist()
        dist.all_gather([torch.zeros(1) for _ in range(cp_group.size())], torch.zeros(1), group=cp_group)
        return torch.full((int(vision_mask.sum()),), -1, dtype=torch.long)

    return select


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cases_are_cut_and_judged_by_the_layouts_definition(layout: str) -> None:
    """Every rank receives the full mask at the layout's literal indices; the expected rows are the literal
    ranks of those positions among the row's vision tokens; the physical row fits the layout's rule."""
    for case in generate_cases([1, 2, 3, 4], 28, seed=5, layout=layout):
        cu = case.cu_seqlens.tolist()
        # at cp 1 nothing is split, whatever the layout (literal's head-tail assumes an even row)
        indices = literal.layout_indices(layout, cu, case.cp) if case.cp > 1 else [list(range(cu[-1]))]
        mask = case.vision_mask.tolist()
        seen: dict[int, list[bool]] = {}
        result = run_case(_receives(seen), case)
        assert case.layout == layout and (layout == "zigzag") == (layout not in case.describe())
        for rank in range(case.cp):
            assert seen[rank] == [mask[g] for g in indices[rank]], (case.name, rank)
            assert result.ranks[rank].expected == literal.expected_rows(mask, indices[rank]), (case.name, rank)
        if layout in ("zigzag", "per-document-head-tail"):  # at cp 1 nothing is split: no rule
            assert case.cp == 1 or all(n % (2 * case.cp) == 0 for n in case.segment_lengths), case.name
        elif layout == "contiguous":
            assert cu[-1] % case.cp == 0
        else:
            assert case.cp == 1 or cu[-1] % (2 * case.cp) == 0
        if case.logical_cu_seqlens is not None:  # padding is text, outside the logical lengths
            logical = case.logical_lengths
            pads = [p for s in range(case.num_segments) for p in range(cu[s] + logical[s], cu[s + 1])]
            assert not any(mask[p] for p in pads)


def test_free_segment_lengths_and_row_end_padding_under_contiguous_rules() -> None:
    """Outside the zigzag rule segments have any length and only the row's end is padded."""
    for layout in ("contiguous", "sequence-zigzag", "head-tail"):
        cases = [c for c in generate_cases([2, 3, 4], 42, seed=0, layout=layout)]
        assert any(any(n % (2 * c.cp) for n in c.segment_lengths) for c in cases)
        padded = [c for c in cases if c.logical_cu_seqlens is not None]
        assert padded and all(c.logical_cu_seqlens[:-1].tolist() == c.cu_seqlens[:-1].tolist()
                              for c in padded if c.kind != "video")


def test_a_contiguous_selection_passes_contiguous_and_fails_zigzag(contiguous_impl: str) -> None:
    fn = load_function(contiguous_impl)
    assert run_check(fn, cp=[2, 3, 4], cases=21, layout="contiguous", shrink=False).ok
    zigzag = run_check(fn, cp=[2, 3, 4], cases=21, shrink=False)
    assert not zigzag.ok and WRONG_ROWS in zigzag.verdict_counts()


def test_the_zigzag_example_passes_zigzag_and_fails_contiguous() -> None:
    fn = load_function(ZIGZAG_IMPL)
    assert run_check(fn, cp=[2, 3], cases=14, shrink=False).ok
    for layout in ("contiguous", "sequence-zigzag"):
        report = run_check(fn, cp=[2, 3], cases=14, layout=layout, shrink=False)
        assert not report.ok and WRONG_ROWS in report.verdict_counts(), layout


def test_vectors_in_another_layout_hand_worked() -> None:
    """cp 2, contiguous, T = 8: rank 0 holds 0..3, rank 1 holds 4..7; vision at 1, 2 and 5."""
    case = case_from_local_masks([0, 3, 8], [[0, 1, 1, 0], [0, 1, 0, 0]], layout="contiguous")
    assert torch.nonzero(case.vision_mask).view(-1).tolist() == [1, 2, 5]
    result = run_case(load_function(ZIGZAG_IMPL), case)
    assert [r.expected for r in result.ranks] == [[0, 1], [2]]
    seen: dict[int, list[bool]] = {}
    run_case(_receives(seen), case)
    assert seen == {0: [False, True, True, False], 1: [False, True, False, False]}


def test_cli_names_the_layout_and_replays_it(tmp_path: Path, contiguous_impl: str) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["check", contiguous_impl, "--layout", "contiguous", "--cp", "2,3", "--cases", "10",
                             "--no-color"])
    assert ok.exit_code == 0, ok.output
    assert "(signature default; layout contiguous; cp 2, 3; seed 0)" in ok.output
    out = tmp_path / "failures"
    bad = runner.invoke(app, ["check", ZIGZAG_IMPL, "--layout", "contiguous", "--cp", "2,3", "--cases", "10",
                              "--out", str(out), "--json"])
    assert bad.exit_code == 1, bad.output
    report = json.loads(bad.stdout)
    assert report["layout"] == "contiguous" and not report["ok"]
    assert {r["layout"] for r in report["results"] if r["verdict"] != PASS} == {"contiguous"}
    shrunk = report["shrunk"][0]
    assert "-contiguous-cp2,3-seed0" in shrunk["path"] and shrunk["case"]["layout"] == "contiguous"
    replay, expected = shrunk["replay"]
    assert "--layout contiguous" in replay and "--layout contiguous" in expected
    again = runner.invoke(app, shlex.split(replay)[1:] + ["--json"])
    assert again.exit_code == 1 and json.loads(again.stdout)["verdicts"] == {WRONG_ROWS: 1}
    shown = runner.invoke(app, shlex.split(expected)[1:] + ["--json"])
    assert shown.exit_code == 0, shown.output


def test_cli_refuses_a_layout_check_cannot_cut_by() -> None:
    result = CliRunner().invoke(app, ["check", ZIGZAG_IMPL, "--layout", "file", "--cases", "2"])
    assert result.exit_code == 2 and "--layout" in result.output and "Traceback" not in result.output
