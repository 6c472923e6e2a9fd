"""``simulate --explain``: seven numbered steps whose numbers match the literal definition.

Expected values come from tests/literal.py (counts and rows from the words of the definition) and
from the worked vision example of the reference (§3.5), never from the code under test.
"""

import re
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from typer.testing import CliRunner

from cpinspect.cli.app import app
from cpinspect.core.ranges import format_ranges
from cpinspect.core.synth import demo_batch, demo_batch_dict
from cpinspect.simulation.explain import naive_scatter_message
from cpinspect.simulation.run import simulate
from cpinspect.views.explain import render_explain
from tests.literal import expected_rows, local_counts, zigzag_indices

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
IMAGE = 151655


def explain_text(result, rank=0, width=100):
    console = Console(width=width, color_system=None, highlight=False)
    with console.capture() as capture:
        render_explain(result, console, rank=rank)
    return capture.get()


def demo_literal():
    raw = demo_batch_dict()
    ids = raw["input_ids"].view(-1).tolist()
    return [t in (IMAGE, IMAGE + 1) for t in ids], raw["cu_seqlens_padded"].tolist()


def test_steps_are_numbered_one_to_seven_in_order():
    text = explain_text(simulate(demo_batch(), 2))
    numbers = [int(m) for m in re.findall(r"^(\d)\. ", text, flags=re.M)]
    assert numbers == [1, 2, 3, 4, 5, 6, 7]
    for title in ("Local vision mask", "Count vision tokens per chunk", "All-gather the counts",
                  "Rebuild the [4, 4] table", "Offsets", "Rank 0's rows", "Why not scatter every row"):
        assert title in text


def test_counts_sent_table_offsets_and_rows_are_the_literal_ones():
    mask, cu = demo_literal()
    cp = 2
    text = explain_text(simulate(demo_batch(), cp), rank=1)
    counts = [local_counts(cu, cp, rank, mask) for rank in range(cp)]
    assert f"local_counts [S, 2] = [4, 2]: {counts[1]}" in text
    for rank in range(cp):
        assert f"rank {rank} sent {counts[rank]}" in text
    table = [[counts[min(c, 2 * cp - 1 - c)][s][0 if c < cp else 1] for c in range(2 * cp)] for s in range(len(cu) - 1)]
    flat = [v for row in table for v in row]
    offsets = [sum(flat[:i]) for i in range(len(flat))]
    step4 = text.split("4. Rebuild")[1].split("5. Offsets")[0]
    step5 = text.split("5. Offsets")[1].split("6. Rank")[0]
    assert _table_numbers(step4) == table
    assert _table_numbers(step5) == [offsets[s * 4:(s + 1) * 4] for s in range(len(cu) - 1)]
    rows = expected_rows(mask, zigzag_indices(cu, cp)[1])
    assert f"rows = {format_ranges(torch.tensor(rows))}" in text
    assert f"({len(rows)} rows for {len(rows)} vision tokens; ✓ matches the oracle)" in text


def _table_numbers(block):
    lines = [line for line in block.splitlines() if re.match(r"\s*│\s*\d+ │", line)]
    return [[int(v) for v in re.findall(r"\d+", line.split("│", 2)[2])] for line in lines]


def test_marks_this_ranks_chunks_in_the_tables():
    text = explain_text(simulate(demo_batch(), 2), rank=0)
    step4 = text.split("4. Rebuild")[1].split("5. Offsets")[0]
    assert "│   0 │  [9] │ 24 │ 24 │ [7] │" in step4


def test_naive_scatter_fails_with_pytorchs_message_and_the_ranks_shapes():
    """Reference §3.5: cu [0, 8, 24], cp 2, image tokens at 2-5 and 10-17 -> rank 0 holds 2 of 12."""
    ids = torch.full((24,), 7)
    ids[2:6] = IMAGE
    ids[10:18] = IMAGE
    result = simulate_dict({"input_ids": ids, "cu_seqlens": torch.tensor([0, 8, 24])}, 2)
    assert result.ranks[0].selected_rows.tolist() == [4, 5]
    text = explain_text(result, rank=0)
    assert ("RuntimeError: shape mismatch: value tensor of shape [12, 4] cannot be broadcast to indexing result of "
            "shape [2, 4]") in " ".join(text.split())
    assert "local_counts [S, 2] = [2, 2]: [[0, 0], [2, 0]]" in text
    assert "rows = 4-5" in text


def simulate_dict(raw, cp, **kwargs):
    from cpinspect.core.loading import load_batch

    return simulate(load_batch(raw), cp, **kwargs)


def test_naive_scatter_message_is_none_when_the_rank_holds_every_row():
    mask = torch.tensor([False, True, True, False])
    assert naive_scatter_message(mask, 2) is None
    assert naive_scatter_message(mask, 3) == ("RuntimeError: shape mismatch: value tensor of shape [3, 4] cannot be "
                                              "broadcast to indexing result of shape [2, 4]")


def test_a_rank_without_vision_tokens_still_joins_the_all_gather():
    text = " ".join(explain_text(simulate(demo_batch(), 4), rank=0).split())
    assert "None of them is a vision token." in text
    assert "rank 0 sent [[0, 0], [0, 0], [0, 0], [0, 0]]" in text
    assert "value tensor of shape [124, 4] cannot be broadcast to indexing result of shape [0, 4]" in text
    assert "still had to join the all-gather" in text


def test_why_the_gather_names_the_counts_the_rank_cannot_see():
    text = " ".join(explain_text(simulate(demo_batch(), 2), rank=0).split())
    # s0 c3 starts after chunk 0 (9, own) and chunks 1, 2 (24 + 24, rank 1): offset 57
    assert "the offset 57 of s0 c3 is 9 from this rank's own chunks + 48 from s0 c1 (rank 1), s0 c2 (rank 1)" in text
    assert "vision_embeds[0:31] has the right shape but puts 22 of 31 rows in the wrong place" in text


def test_single_rank_and_contiguous_slices_are_explained_as_fitting():
    one = " ".join(explain_text(simulate(demo_batch(), 1)).split())
    assert "Here it would happen to work: rank 0 holds all 124 vision tokens" in one
    contiguous = " ".join(explain_text(simulate(demo_batch(), 2, "contiguous"), rank=1).split())
    assert "A contiguous slice of rows 64-123 would be right here" in contiguous
    assert "local_counts [1] (one piece): [60]" in contiguous


def test_a_rank_without_a_selection_says_why_instead_of_steps():
    result = simulate(demo_batch(), 2)
    broken = replace(result, ranks=[replace(result.ranks[0], selection=None), result.ranks[1]])
    text = explain_text(broken)
    assert "Rank 0 produced no selection to explain: the rank did not finish" in text
    assert "1. Local" not in text


def test_cli_explain_walks_the_chosen_rank_of_a_presharded_batch():
    result = CliRunner().invoke(app, ["simulate", "--cp", "2", str(EXAMPLES / "presharded_cp2"), "--explain",
                                      "--rank", "1", "--no-color"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    assert "How rank 1 selects its vision rows (zigzag layout, cp 2)" in result.output
    assert "rows = 9-56, 76-119, 123" in result.output


def test_the_natural_order_table_names_its_cells_by_layout():
    """Only per-document zigzag has one row per segment; the others lay the whole row's chunks or pieces out in
    one row, which used to be labelled "seg 0" and "per segment × chunk" (a row of 4 segments read as one)."""
    cases = (("zigzag", "per segment × chunk", "0"), ("sequence-zigzag", "per chunk of the row", "chunks"),
             ("contiguous", "per piece", "pieces"))
    for layout, cells, row in cases:
        text = explain_text(simulate(demo_batch(), 2, layout))
        table = text[text.index("4. Rebuild"):text.index("5. Offsets")]
        assert f"vision tokens {cells} (" in " ".join(table.split()), layout
        first_row = next(line for line in table.splitlines() if "│" in line)
        assert first_row.split("│")[1].strip() == row, layout
        assert ("seg" in table) == (layout == "zigzag"), layout
