"""Every ``$ cpinspect ...`` block in README.md and docs/*.md is run again and must print what it shows.

A block is a fenced code block whose first line is ``$ cpinspect ...`` (``\\`` continues a line;
a trailing ``# N columns`` comment sets the terminal width, 80 otherwise). Lines are compared
after trailing spaces are stripped; a shown line ending in `` ...`` is abridged and only its start
must match; ``[exit code N]`` as the last shown line is the command's exit code.
"""

import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cpinspect.cli.app import app

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[a-z]*\n(?P<body>\$ cpinspect .*?)^```", re.S | re.M)
WIDTH = re.compile(r"\s+#\s*(\d+) columns\s*$")
DEFAULT_WIDTH = {"zigzag.md": 100}  # docs/make_tutorial.py renders at 100 columns


def transcripts() -> list[tuple[str, str, int, list[str]]]:
    found = []
    for document in DOCUMENTS:
        for match in FENCE.finditer(document.read_text(encoding="utf-8")):
            lines = match["body"].rstrip("\n").split("\n")
            command = lines.pop(0)[2:]
            while command.rstrip().endswith("\\"):
                command = command.rstrip()[:-1] + " " + lines.pop(0).strip()
            width = WIDTH.search(command)
            command = WIDTH.sub("", command) if width else command
            columns = int(width[1]) if width else DEFAULT_WIDTH.get(document.name, 80)
            found.append((f"{document.name}: {command}", command, columns, lines))
    return found


TRANSCRIPTS = transcripts()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A copy of the files the commands read, so what they write (check's cpinspect-failures/) stays out of the
    repository; a copy, not links, so that paths print as the documents show them."""
    root = tmp_path_factory.mktemp("transcripts")
    for entry in ("examples", "docs"):
        shutil.copytree(ROOT / entry, root / entry)
    return root


def test_the_documents_have_transcripts():
    names = {name.split(":")[0] for name, *_ in TRANSCRIPTS}
    assert {"README.md", "zigzag.md"} <= names


@pytest.mark.parametrize("command, width, shown", [t[1:] for t in TRANSCRIPTS], ids=[t[0] for t in TRANSCRIPTS])
def test_transcript_is_what_the_command_prints(command, width, shown, monkeypatch, workspace):
    monkeypatch.chdir(workspace)
    # a fresh process imports the user's modules anew: neither other tests' cached ones nor ours may leak
    for name in [n for n, m in sys.modules.items() if str(ROOT / "examples") in str(getattr(m, "__file__", ""))]:
        monkeypatch.delitem(sys.modules, name)
    before = set(sys.modules)
    try:
        _compare(command, width, shown)
    finally:
        for name in set(sys.modules) - before:
            if str(workspace) in str(getattr(sys.modules[name], "__file__", "")):
                del sys.modules[name]


def _compare(command: str, width: int, shown: list[str]) -> None:
    words = shlex.split(command)
    result = CliRunner().invoke(app, words[1:], env={"COLUMNS": str(width), "LINES": "50", "NO_COLOR": "1",
                                                     "TERM": "dumb"})
    printed = [line.rstrip() for line in result.output.rstrip("\n").split("\n")]
    if result.exit_code:
        printed.append(f"[exit code {result.exit_code}]")
    expected_code = re.fullmatch(r"\[exit code (\d+)\]", shown[-1]) if shown else None
    if expected_code is None and result.exit_code:
        printed.pop()  # the document does not show the exit code
    assert len(printed) == len(shown), f"{command}: {len(printed)} lines printed, {len(shown)} shown\n" + \
        "\n".join(printed)
    for number, (out, want) in enumerate(zip(printed, shown)):
        if want.endswith(" ..."):
            assert out.startswith(want[:-4]), f"line {number}: {out!r} does not start with {want[:-4]!r}"
        else:
            assert out == want, f"line {number}: printed {out!r}, the document shows {want!r}"
