"""`cpinspect check --layout hybrid`: every segment its own local cp (a divisor of the case's cp).

Local masks and expected rows come from tests/literal.py's hybrid definition (``hybrid_indices``), never
from cpinspect's oracle; the hybrid-aware selection below is written here for the purpose.
"""

import json
import shlex
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cpinspect.check import load_function, run_case, run_check
from cpinspect.check.cases import generate_cases
from cpinspect.check.shrink import shrink_case, with_cp
from cpinspect.check.verdicts import PASS, WRONG_ROWS
from cpinspect.cli.app import app
from tests import literal
from tests.capability.test_check_layouts import _receives

ZIGZAG_IMPL = "examples/impls/correct.py:select_rows"


def _valid_hybrid(case) -> list[list[int]]:
    """The literal per-rank indices of a case, after checking it is a hybrid row the definition accepts."""
    cu, sizes = case.cu_seqlens.tolist(), case.segment_cp.tolist()
    assert case.layout == "hybrid" and len(sizes) == case.num_segments, case.name
    assert all(case.cp % c == 0 for c in sizes), (case.name, sizes)
    assert all(n % (2 * c if c > 1 else 1) == 0 for n, c in zip(case.segment_lengths, sizes)), case.name
    indices = literal.hybrid_indices(cu, case.cp, sizes)
    assert len({len(held) for held in indices}) == 1, (case.name, [len(h) for h in indices])  # equal shares
    return indices


def hybrid_rows(group, vision_mask, cu_seqlens_padded, local_cp_size, vision_embed_count):
    """Hybrid-aware: all-gather the local masks, place them at the definition's indices, rank the vision tokens."""
    cp, rank = group.size(), group.rank()
    indices = literal.hybrid_indices(cu_seqlens_padded.tolist(), cp, local_cp_size.tolist())
    masks = [torch.empty_like(vision_mask) for _ in range(cp)]
    dist.all_gather(masks, vision_mask.contiguous(), group=group)
    full = torch.zeros(int(cu_seqlens_padded[-1]), dtype=torch.long)
    for held, mask in zip(indices, masks):
        full[torch.tensor(held, dtype=torch.long)] = mask.to(torch.long)
    rows = torch.cumsum(full, 0) - 1
    mine = torch.tensor(indices[rank], dtype=torch.long)[vision_mask.to(torch.bool)]
    return rows[mine]


def test_every_rank_receives_the_literal_hybrid_masks_and_rows() -> None:
    cases = generate_cases(list(range(1, 9)), 24, seed=3, layout="hybrid")
    for case in cases:
        indices = _valid_hybrid(case)
        mask = case.vision_mask.tolist()
        seen: dict[int, list[bool]] = {}
        result = run_case(_receives(seen), case)
        assert f"local cp {case.segment_cp[0]}" in case.describe()
        for rank in range(case.cp):
            assert seen[rank] == [mask[g] for g in indices[rank]], (case.name, rank)
            assert result.ranks[rank].expected == literal.expected_rows(mask, indices[rank]), (case.name, rank)
        if case.kind == "empty-rank" and case.cp > 1:  # emptied by the hybrid cut: some rank gathers nothing
            assert any(not any(seen[rank]) for rank in range(case.cp)), case.name
    mixed = [c for c in cases if c.cp > 1 and bool((c.segment_cp < c.cp).any()) and bool((c.segment_cp > 1).any())]
    assert len(mixed) >= 5  # the cases do mix sizes, not only the whole group or single ranks


def test_hybrid_cases_are_the_zigzag_cases_plus_pad_sequences() -> None:
    """The local cp draws come after the zigzag case's own draws: the same row, pad sequences appended."""
    for zig, hyb in zip(generate_cases([2, 4, 6], 14, seed=1), generate_cases([2, 4, 6], 14, seed=1, layout="hybrid")):
        total = zig.total_tokens
        same = hyb.vision_mask[:total] == zig.vision_mask  # empty-rank: the hybrid cut's ranks are emptied
        assert same.all() or zig.kind == "empty-rank"
        assert torch.equal(hyb.input_ids[:total][same], zig.input_ids[same])
        assert hyb.cu_seqlens[: zig.num_segments + 1].tolist() == zig.cu_seqlens.tolist()
        assert not hyb.vision_mask[total:].any() and hyb.segment_cp[zig.num_segments:].tolist() == [1] * (
            hyb.num_segments - zig.num_segments)


def test_a_hybrid_aware_selection_passes_and_the_zigzag_example_fails_where_c_is_below_cp() -> None:
    assert run_check(hybrid_rows, cp=[1, 2, 3, 4, 8], cases=20, layout="hybrid", signature="generic", shrink=False).ok
    report = run_check(load_function(ZIGZAG_IMPL), cp=[1, 2, 3, 4, 8], cases=20, layout="hybrid", shrink=False)
    failed = [r for r in report.results if r.verdict != PASS]
    assert failed and WRONG_ROWS in report.verdict_counts()
    assert all(bool((r.case.segment_cp < r.case.cp).any()) for r in failed)
    whole = [r for r in report.results if bool((r.case.segment_cp == r.case.cp).all())]
    assert whole and all(r.verdict == PASS for r in whole)  # every segment on the whole group: zigzag itself


def test_shrinking_keeps_a_valid_hybrid_case() -> None:
    fn = load_function(ZIGZAG_IMPL)
    case = next(c for c in generate_cases([8], 6, seed=0, layout="hybrid") if run_case(fn, c).verdict == WRONG_ROWS)
    shrunk = shrink_case(case, lambda c: run_case(fn, c).verdict == WRONG_ROWS, max_seconds=10).case
    _valid_hybrid(shrunk)
    assert shrunk.size_key() < case.size_key()
    for cp in (1, 2, 4):  # a smaller cp clamps each c to gcd(c, cp)
        smaller = with_cp(case, cp)
        _valid_hybrid(smaller)
        assert set(smaller.segment_cp.tolist()) <= {c for c in (1, 2, 4, 8) if c <= cp}


def test_cli_saves_local_cp_size_and_replays(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "failures"
    bad = runner.invoke(app, ["check", ZIGZAG_IMPL, "--layout", "hybrid", "--cp", "2,4", "--cases", "8",
                              "--out", str(out), "--json"])
    assert bad.exit_code == 1, bad.output
    report = json.loads(bad.stdout)
    failed = [r for r in report["results"] if r["verdict"] != PASS]
    assert failed and all(len(r["local_cp_size"]) == len(r["segments"]) for r in failed)
    shrunk = report["shrunk"][0]
    saved = load_file(shrunk["path"])
    cu = saved["cu_seqlens_padded" if "cu_seqlens_padded" in saved else "cu_seqlens"].tolist()
    assert len(saved["local_cp_size"].tolist()) == len(cu) - 1
    replay, expected = shrunk["replay"]
    assert "--layout hybrid" in replay
    again = runner.invoke(app, shlex.split(replay)[1:] + ["--json"])
    assert again.exit_code == 1 and json.loads(again.stdout)["verdicts"] == {WRONG_ROWS: 1}
    shown = runner.invoke(app, shlex.split(expected)[1:] + ["--json"])
    assert shown.exit_code == 0, shown.output
    # a file with local_cp_size under another layout, and hybrid without it: exit 2, never cut silently
    other = runner.invoke(app, ["check", ZIGZAG_IMPL, "--batch", shrunk["path"], "--cases", "0", "--cp", "2"])
    assert other.exit_code == 2 and "local_cp_size" in other.output and "Traceback" not in other.output
    plain = tmp_path / "plain.safetensors"
    save_file({"input_ids": torch.zeros(1, 8, dtype=torch.long), "cu_seqlens": torch.tensor([0, 8], dtype=torch.int32)},
              str(plain))
    missing = runner.invoke(app, ["check", ZIGZAG_IMPL, "--batch", str(plain), "--cases", "0", "--layout", "hybrid"])
    assert missing.exit_code == 2 and "local_cp_size" in missing.output and "Traceback" not in missing.output
