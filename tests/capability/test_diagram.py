"""``cpinspect layout``: the picture's geometry, its text, the vision overlay, JSON and export.

Geometry is checked against tests/literal.py (the layout written out as lists) and the published
vectors of the reference (§1.6); the vision overlay against the literal row ranks.
"""

import html
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from cpinspect.cli.app import app
from cpinspect.core.layout import LAYOUTS, SEARCHED_LAYOUTS, make_layout
from cpinspect.core.layout_report import segment_cells
from cpinspect.core.synth import demo_batch_dict
from cpinspect.core.vision_items import row_items
from cpinspect.views.layout import (
    fit_widths,
    layout_diagram,
    local_boxes,
    vision_prefix,
    vision_strip,
)
from tests.literal import expected_rows, layout_indices, zigzag_indices

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
runner = CliRunner()
PLAIN = {"COLUMNS": "100", "NO_COLOR": "1"}


def run(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env or PLAIN)


def literal_holdings(kind, cu, cp):
    return layout_indices(kind, cu, cp)


def plain_text(renderable, width):
    console = Console(width=width, color_system=None, file=None, record=True, highlight=False)
    with console.capture() as capture:
        console.print(renderable)
    return capture.get()


CASES = [([0, 8, 24], 2), ([0, 16, 48], 4), ([0, 8, 8, 40], 2), ([0, 32], 8), ([0, 12, 18], 3), ([0, 6], 1)]


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("cu, cp", CASES)
def test_segment_cells_tile_each_segment_and_belong_to_the_rank_that_holds_them(kind, cu, cp):
    layout = make_layout(torch.tensor(cu), cp, kind)
    owner_of = {token: rank for rank, held in enumerate(literal_holdings(kind, cu, cp)) for token in held}
    for segment, cells in enumerate(segment_cells(layout)):
        covered = [t for c in cells for t in range(c.start, c.end)]
        assert covered == list(range(cu[segment], cu[segment + 1]))
        for cell in cells:
            assert {owner_of[t] for t in range(cell.start, cell.end)} == {cell.rank}


@pytest.mark.parametrize("cu, cp", [c for c in CASES if c[1] > 1])
def test_zigzag_cells_are_the_2cp_chunks_in_global_order(cu, cp):
    for segment, cells in enumerate(segment_cells(make_layout(torch.tensor(cu), cp))):
        length = cu[segment + 1] - cu[segment]
        if not length:
            assert cells == []
            continue
        size = length // (2 * cp)
        assert [(c.chunk, c.start, c.end) for c in cells] == [
            (k, cu[segment] + k * size, cu[segment] + (k + 1) * size) for k in range(2 * cp)]
        assert [c.rank for c in cells] == [min(k, 2 * cp - 1 - k) for k in range(2 * cp)]


@pytest.mark.parametrize("cu, cp", CASES)
def test_local_row_is_chunk_r_then_its_mirror_for_every_segment(cu, cp):
    layout = make_layout(torch.tensor(cu), cp)
    literal = zigzag_indices(cu, cp)
    for rank in range(cp):
        boxes = local_boxes(layout, rank)
        assert [t for b in boxes for t in range(b.start, b.end)] == literal[rank]


def test_published_vectors_through_the_json_of_the_command():
    """Reference §1.6: cu [0, 8, 24] under cp 2 and cp 4."""
    two = json.loads(run("layout", "--cp", 2, "--seqlens", "8,16", "--json").output)
    assert [r["global_indices"] for r in two["ranks"]] == [
        [0, 1, 6, 7, 8, 9, 10, 11, 20, 21, 22, 23], [2, 3, 4, 5, 12, 13, 14, 15, 16, 17, 18, 19]]
    four = json.loads(run("layout", "--cp", 4, "--seqlens", "8,16", "--json").output)
    assert [r["global_indices"] for r in four["ranks"]] == [
        [0, 7, 8, 9, 22, 23], [1, 6, 10, 11, 20, 21], [2, 5, 12, 13, 18, 19], [3, 4, 14, 15, 16, 17]]
    whole = json.loads(run("layout", "--cp", 2, "--seqlens", "8,16", "--layout", "sequence-zigzag", "--json").output)
    assert [r["global_indices"] for r in whole["ranks"]] == [[*range(6), *range(18, 24)], list(range(6, 18))]


def test_json_has_exactly_the_documented_schema():
    result = run("layout", "--cp", 2, "--seqlens", "16", "--json")
    assert result.exit_code == 0
    doc = json.loads(result.output)
    assert set(doc) == {"cp", "layout", "segments", "ranks", "balance"}
    assert doc["cp"] == 2 and doc["layout"] == "zigzag"
    (segment,) = doc["segments"]
    assert set(segment) == {"segment", "start", "length", "chunk_len", "chunks"}
    assert (segment["segment"], segment["start"], segment["length"], segment["chunk_len"]) == (0, 0, 16, 4)
    assert segment["chunks"] == [{"chunk": 0, "rank": 0, "start": 0, "end": 4}, {"chunk": 1, "rank": 1, "start": 4,
                                 "end": 8}, {"chunk": 2, "rank": 1, "start": 8, "end": 12},
                                 {"chunk": 3, "rank": 0, "start": 12, "end": 16}]
    assert [set(r) for r in doc["ranks"]] == [{"rank", "global_indices"}] * 2
    assert set(doc["balance"]) == set(LAYOUTS)
    assert all(set(b) == {"work", "imbalance"} for b in doc["balance"].values())
    assert doc["balance"]["contiguous"]["work"] == [36, 100]
    assert doc["balance"]["zigzag"] == {"work": [68, 68], "imbalance": 1.0}


def test_json_of_contiguous_clips_pieces_to_segments():
    doc = json.loads(run("layout", "--cp", 2, "--seqlens", "10,6", "--layout", "contiguous", "--json").output)
    assert [[(c["rank"], c["start"], c["end"]) for c in s["chunks"]] for s in doc["segments"]] == [
        [(0, 0, 8), (1, 8, 10)], [(1, 10, 16)]]
    assert set(doc["balance"]) == {"contiguous", "sequence-zigzag", "head-tail"}  # zigzag cannot cut 10 in 4


def _cell_labels(line):
    return [part.strip() for part in line.split("│")[1:-1]]


def test_diagram_text_labels_every_chunk_with_rank_and_range_and_marks_local_offsets():
    text = run("layout", "--cp", 4, "--seqlens", "16,32", "--no-color").output
    lines = text.splitlines()
    heading = lines.index("segment 1 · tokens 16-47 · 32 tokens = 8 chunks of 4")
    assert _cell_labels(lines[heading + 1]) == [f"c{k} r{min(k, 7 - k)}" for k in range(8)]
    assert _cell_labels(lines[heading + 2]) == [f"{16 + 4 * k}-{19 + 4 * k}" for k in range(8)]
    rank2 = next(i for i, line in enumerate(lines) if line.startswith("rank 2 "))
    assert _cell_labels(lines[rank2]) == ["s0 c2", "s0 c5", "s1 c2", "s1 c5"]
    assert _cell_labels(lines[rank2 + 1]) == ["4-5", "10-11", "24-27", "36-39"]
    ruler = next(line for line in lines if "▲0" in line)
    assert ["".join(m) for m in re.findall(r"▲(\d+)|(\d+)▲", ruler)] == ["0", "4", "12"]
    assert "local offsets cu[i]/cp: s0 at 0, s1 at 4" in text


def test_ruler_marks_sit_under_the_segment_boundaries_of_the_local_row():
    lines = run("layout", "--cp", 2, "--seqlens", "8,16", "--no-color").output.splitlines()
    row = next(line for line in lines if line.startswith("rank 0 "))
    ruler = next(line for line in lines if "▲0" in line)
    bars = [i for i, ch in enumerate(row) if ch == "│"]
    assert ruler.index("▲0") == bars[0]
    assert ruler.index("▲4") == bars[2]  # segment 1 starts after rank 0's two chunks of segment 0
    assert ruler.rindex("▲") == bars[-1]  # the end of the local row, 12 tokens


@pytest.mark.parametrize("width", [40, 60, 80, 120])
@pytest.mark.parametrize("cu, cp", [([0, 8, 4096], 2), ([0, 64, 4096], 8), ([0, 32, 64], 16), ([0, 24], 1),
                                     ([0, *range(8, 8 * 41, 8)], 4)])
def test_every_line_fits_the_width(width, cu, cp):
    for kind in LAYOUTS:
        text = plain_text(layout_diagram(make_layout(torch.tensor(cu), cp, kind), width, full=True), width)
        assert max(len(line) for line in text.splitlines()) <= width, (kind, cu, cp)


def test_long_segments_are_drawn_proportionally():
    lines = run("layout", "--cp", 2, "--seqlens", "16,32", env={"COLUMNS": "120", "NO_COLOR": "1"}).output.splitlines()
    short = lines[lines.index("segment 0 · tokens 0-15 · 16 tokens = 4 chunks of 4") + 1]
    long = lines[lines.index("segment 1 · tokens 16-47 · 32 tokens = 4 chunks of 8") + 1]
    assert len(long.rstrip()) - 7 == pytest.approx(2 * (len(short.rstrip()) - 7), abs=4)


def test_without_colour_many_ranks_are_told_apart_by_their_letters_and_the_legend_is_exact():
    text = run("layout", "--cp", 16, "--seqlens", "32", "--no-color").output
    cells = text.splitlines()[text.splitlines().index("segment 0 · tokens 0-31 · 32 tokens = 32 chunks of 1") + 1]
    assert _cell_labels(cells) == list("0123456789ABCDEF") + list("FEDCBA9876543210")
    assert "c0 0 · c1 1 ·" in text and "c31 31" in text


def _lab(color):
    """CIE L*a*b* of an sRGB hex colour (D65), to measure how far apart two colours look."""
    def linear(c):
        return ((c + 0.055) / 1.055) ** 2.4 if c > 0.04045 else c / 12.92

    r, g, b = (linear(int(color[i:i + 2], 16) / 255) for i in (1, 3, 5))
    x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047
    y = 0.2126 * r + 0.7152 * g + 0.0722 * b
    z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883

    def f(v):
        return v ** (1 / 3) if v > 0.008856 else 7.787 * v + 16 / 116

    return 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))


def test_sixteen_rank_colours_are_clearly_apart_and_their_labels_readable():
    import itertools
    import math

    from cpinspect.views.layout import cell_style

    backgrounds = [cell_style(rank).split(" on ")[1] for rank in range(16)]
    closest = min(math.dist(_lab(a), _lab(b)) for a, b in itertools.combinations(backgrounds, 2))
    assert closest > 20  # CIE76 distance: about 2.3 is "just noticeable"
    for rank in range(16):
        text, background = cell_style(rank).split(" on ")
        luminance = ((_lab(background)[0] + 16) / 116) ** 3  # relative luminance Y back from L*
        contrast = {"black": (luminance + 0.05) / 0.05, "white": 1.05 / (luminance + 0.05)}
        assert contrast[text] >= max(contrast.values()) - 0.2, (rank, background, contrast)
        assert contrast[text] > 3.0


def test_fit_widths_is_proportional_respects_minimums_and_the_budget():
    assert fit_widths([10, 20, 30], [1, 1, 1], 60) == [10, 20, 30]
    assert fit_widths([1, 999], [7, 7], 60) == [7, 53]
    assert fit_widths([4, 4], [7, 7], 10) is None
    assert fit_widths([10, 20], [1, 1], 100, scale=1.0) == [10, 20]


def test_vision_strip_marks_full_partial_and_empty_columns():
    mask = torch.tensor([0, 0, 1, 1, 1, 1, 0, 1], dtype=torch.bool)
    vision = vision_prefix(mask)
    assert vision_strip(vision, 0, 8, 4) == "·██▒"
    assert vision_strip(vision, 2, 6, 8) == "████████"
    assert vision_strip(vision, 0, 2, 3) == "···"


def test_vision_items_follow_the_grids_of_the_demo_batch():
    raw = demo_batch_dict()
    ids = raw["input_ids"].view(-1)
    mask = (ids == 151655) | (ids == 151656)
    items = row_items(ids, mask, raw["cu_seqlens_padded"].long(), image_token_id=151655, video_token_id=151656,
                         image_grid=raw["image_grid_thw"], video_grid=raw["video_grid_thw"])
    # segment 0: 14 text + vision_start, then 16*16/4 = 64 image tokens; segment 2 starts at 144: 20 text,
    # two video frames of 3 stamp + start + 16 tokens + end; 5 text + start + 24 image tokens; segment 3 at 288.
    assert [(i.name, i.first_token, i.last_token, i.first_row, i.end_row) for i in items] == [
        ("image 0", 15, 78, 0, 64), ("video 0", 168, 204, 64, 96), ("image 1", 212, 235, 96, 120),
        ("image 2", 297, 300, 120, 124)]


def test_vision_overlay_lists_each_ranks_rows_as_the_literal_definition_gives_them():
    result = run("layout", "--cp", 2, EXAMPLES / "qwen3vl_packed.pt", "--vision", "--no-color")
    assert result.exit_code == 0, result.output
    raw = demo_batch_dict()
    ids = raw["input_ids"].view(-1).tolist()
    mask = [t in (151655, 151656) for t in ids]
    cu = raw["cu_seqlens_padded"].tolist()
    for rank, held in enumerate(zigzag_indices(cu, 2)):
        rows = expected_rows(mask, held)
        line = next(x for x in result.output.splitlines() if x.lstrip().startswith(f"{rank}  rank {rank}: "))
        shown = [int(v) for part in re.findall(r"(\d+(?:-\d+)?) \(s\d c\d\)", line)
                 for v in _expand(part)]
        assert shown == rows
    assert "not contiguous: rows 9-56 are in s0 c1, s0 c2 (rank 1)" in result.output
    assert "image 0 │ 15-78" in result.output
    assert "·········█████" in result.output  # segment 0 chunk 0: tokens 15-23 of 0-23 are vision


def _expand(part):
    first, _, last = part.partition("-")
    return range(int(first), int(last or first) + 1)


def test_compare_draws_all_three_layouts_and_one_balance_table():
    text = run("layout", "--cp", 4, "--seqlens", "64", "--compare", "--no-color").output
    for kind in SEARCHED_LAYOUTS:
        assert f"{kind} layout · cp 4" in text
    assert text.count("causal attention work per rank") == 1
    torch_style = run("layout", "--cp", 4, "--seqlens", "64", "--compare", "--layout", "head-tail", "--no-color")
    assert "head-tail layout · cp 4" in torch_style.output and "zigzag layout · cp 4" in torch_style.output
    # contiguous: rank 3 holds queries 48..63, i.e. 49+...+64 = 904 pairs of 64*65/2 = 2080; mean 520
    assert re.search(r"max/mean │ +1\.00 │ +1\.00 │ +1\.74 │", text)
    assert "904   43.5%" in text


def test_svg_and_html_hold_the_same_picture_as_the_terminal(tmp_path):
    svg, page = tmp_path / "z.svg", tmp_path / "z.html"
    result = run("layout", "--cp", 4, "--seqlens", "16,32", "--svg", svg, "--html", page)
    assert result.exit_code == 0, result.output
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    svg_text = "".join(root.itertext()).replace("\xa0", " ")
    body = html.unescape(re.sub(r"<[^>]+>", "", page.read_text().split("<pre", 1)[1].split(">", 1)[1]))
    printed = result.output.split("wrote")[0]
    assert body.strip().splitlines() == [line for line in printed.strip().splitlines()]
    for label in ("c7 r0", "44-47", "s1 c5", "▲4", "1.92"):
        assert label in svg_text and label in body
    assert "#1f77b4" in svg.read_text()  # rank 0's colour survives the export


@pytest.mark.parametrize("args, text", [
    (["--seqlens", "8,16", EXAMPLES / "qwen3vl_packed.pt"], "both --seqlens and a batch"),
    (["--seqlens", "8,16", "--vision"], "--vision needs a batch"),
    (["--seqlens", "8,,16"], "--seqlens entry 1 is ''"),
    (["--seqlens", "8,-16"], "--seqlens entry 1 is '-16'"),
    (["--seqlens", "12,20", "--cp", 4], "segment 0 has physical length 12"),
    (["--seqlens", "16", "--layout", "stripes"], "unknown layout"),
    (["--seqlens", "16", "--svg", "/nonexistent-dir/z.svg"], "cannot write /nonexistent-dir/z.svg"),
])
def test_bad_input_exits_2_with_one_paragraph(args, text):
    result = run("layout", *args)
    assert result.exit_code == 2, result.output
    assert text in result.output
    assert "Traceback" not in result.output
    assert result.output.count("\n") == 1


def test_pad_rounds_segments_up_and_says_so():
    result = run("layout", "--cp", 4, "--seqlens", "12,20", "--pad", "--json")
    doc = json.loads(result.output)
    assert [s["length"] for s in doc["segments"]] == [16, 24]
    text = run("layout", "--cp", 4, "--seqlens", "12,20", "--pad", "--no-color").output
    assert "padded by --pad to 16,24" in text


def test_without_input_the_demo_batch_is_used_and_named():
    result = run("layout", "--cp", 2, "--no-color")
    assert result.exit_code == 0
    assert "built-in demo batch" in result.output and "cu_seqlens [0, 96, 144, 288, 336]" in result.output
