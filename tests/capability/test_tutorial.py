"""docs/zigzag.md: every command it shows is run again and must print exactly what is shown.

The blocks are found by reading the markdown, so a command added or an output edited by hand is
caught too; `python docs/make_tutorial.py` is the only way to update them.
"""

import importlib.util
import re
import shlex
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from typer.testing import CliRunner

from cpinspect.cli.app import app

ROOT = Path(__file__).resolve().parents[2]
TUTORIAL = ROOT / "docs" / "zigzag.md"
PICTURE = ROOT / "docs" / "zigzag-cp4.svg"
BLOCK = re.compile(r"```console\n\$ (?P<command>[^\n]+)\n(?P<output>.*?)\n```", re.S)


def _make_tutorial():
    spec = importlib.util.spec_from_file_location("make_tutorial", ROOT / "docs" / "make_tutorial.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


MAKE = _make_tutorial()
BLOCKS = [(m["command"], m["output"]) for m in BLOCK.finditer(TUTORIAL.read_text(encoding="utf-8"))]


def shown_output(command: str) -> str:
    """What the command prints now, the way the tutorial shows it (trailing spaces dropped, exit code)."""
    words = shlex.split(command)
    assert words[0] == "cpinspect"
    result = CliRunner().invoke(app, words[1:], env=MAKE.ENV)
    lines = [line.rstrip() for line in result.output.rstrip("\n").split("\n")]
    if result.exit_code:
        lines.append(f"[exit code {result.exit_code}]")
    return "\n".join(lines)


def test_tutorial_has_the_promised_journey():
    text = TUTORIAL.read_text(encoding="utf-8")
    assert len(BLOCKS) >= 8
    first = text.index("## 1. Why a contiguous split is unbalanced")
    assert first < text.index("## 8. Why pre-sharded vision rows need a count all-gather")
    commands = [c for c, _ in BLOCKS]
    assert any("--layout contiguous" in c for c in commands)
    assert any("--vision" in c for c in commands)
    assert any(c.startswith("cpinspect simulate") and "--explain" in c for c in commands)


def test_prose_numbers_are_the_real_balance():
    text = TUTORIAL.read_text(encoding="utf-8")
    # 16 tokens, cp 2, contiguous: rank 0 holds queries 0..7 -> 1+...+8 = 36 of 16*17/2 = 136 pairs
    assert "Rank 0 computes 36 query-key pairs (26.5% of 136), rank 1 computes 100 (73.5%)" in text
    assert "Both ranks now compute 68 pairs" in text


def test_the_file_is_exactly_what_the_generator_writes(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert MAKE.render_tutorial() == TUTORIAL.read_text(encoding="utf-8")


def test_readme_picture_is_the_current_svg_export(monkeypatch):
    monkeypatch.chdir(ROOT)
    current = PICTURE.read_text(encoding="utf-8")
    assert ET.fromstring(current).tag.endswith("svg")
    assert MAKE.render_picture() == current
    assert "docs/zigzag-cp4.svg" in (ROOT / "README.md").read_text(encoding="utf-8")
