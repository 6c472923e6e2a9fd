"""The check report as data (lines with kinds) and its rich view: same plain text, colours by kind."""

import io

from rich.console import Console

from cpinspect.check.report import ReportLine
from cpinspect.views.check import physical_lines, render_report


def test_each_kind_starts_its_plain_line_with_its_mark_or_indent():
    kinds = ["title", "pass", "fail", "detail", "body", "note"]
    assert [ReportLine(kind, "x").plain for kind in kinds] == ["x", "✓ x", "✗ x", "  x", "    x", "note: x"]


def test_a_message_with_line_breaks_prints_as_the_plain_text_cuts_it():
    lines = [ReportLine("title", "a"), ReportLine("body", "b\r\nc"), ReportLine("detail", "d\n"),
             ReportLine("note", "e")]
    assert list(physical_lines(lines)) == [("title", "a"), ("body", "    b"), ("body", "c"), ("detail", "  d"),
                                           ("detail", ""), ("note", "note: e")]
    assert [text for _, text in physical_lines(lines)] == "\n".join(line.plain for line in lines).splitlines()


def _printed(lines, **console):
    out = io.StringIO()
    render_report(lines, Console(file=out, width=20, **console))
    return out.getvalue()


def test_the_view_colours_by_kind_and_never_wraps():
    replay = "replay   cpinspect check f.py:fn --batch failures/f.safetensors --cp 2 --cases 0"
    lines = [ReportLine("fail", "wrong-rows: 1 case(s)"), ReportLine("detail", replay), ReportLine("pass", "ok")]
    assert _printed(lines, color_system=None) == f"✗ wrong-rows: 1 case(s)\n  {replay}\n✓ ok\n"
    coloured = _printed(lines, force_terminal=True, color_system="standard")
    assert "\x1b[1;31m✗ wrong-rows: 1 case(s)\x1b[0m" in coloured  # bold red
    assert f"\x1b[2m  {replay}\x1b[0m" in coloured  # dim, on one line although wider than the console
    assert "\x1b[1;32m✓ ok\x1b[0m" in coloured  # bold green
