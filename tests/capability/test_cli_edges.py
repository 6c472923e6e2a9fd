"""The CLI's edges (issue 19, items 4, 6, 9 and 10): usage errors, huge numbers, closed pipes, user imports.

Every expected number here is computed another way: causal work with Python integers summed from
the definition (query at offset k attends to k + 1 keys), ranks' positions from tests/literal.py.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cpinspect.cli.app import app
from tests import literal

ROOT = Path(__file__).resolve().parents[2]
ENV = {"NO_COLOR": "1", "COLUMNS": "80", "TERM": "dumb"}


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


def assert_plain_usage_error(result, *, mentions):
    """Exit 2, one what/where/fix paragraph, no usage box, no ANSI, no traceback, no 'internal error'."""
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert text.startswith("error: ") and "\n" not in text, text
    assert "Where: " in text and "Fix: " in text and mentions in text, text
    for bad in ("╭", "│", "Usage:", "\x1b", "Traceback", "internal error"):
        assert bad not in text, text


@pytest.mark.parametrize("args, mentions", [
    (["simulate", "--cp", "0"], "--cp"),
    (["layout", "--cp", "0"], "--cp"),
    (["simulate", "--rank", "-1"], "--rank"),
    (["simulate", "--cp", "two"], "--cp"),
    (["layout", "--rank", "1"], "No such option: --rank"),
    (["simulate", "--cp", str(10**30)], "--cp"),
    (["simulate", "--image-token-id", str(2**70)], "--image-token-id"),
    (["diagnose", "--video-token-id", "-5"], "--video-token-id"),
    (["nonsense"], "No such command"),
])
def test_usage_errors_are_one_plain_paragraph(args, mentions):
    assert_plain_usage_error(run(*args), mentions=mentions)


def causal_work(start: int, end: int, segment_start: int) -> int:
    """Python-int sum of (offset + 1) over the queries [start, end) of one segment, by the formula for
    a sum of consecutive integers (the definition, summed in closed form with exact Python ints)."""
    first, last = start - segment_start + 1, end - segment_start
    return (first + last) * (last - first + 1) // 2


def test_layout_of_four_billion_tokens_prints_exact_work():
    total, cp = 4_000_000_000, 2
    result = run("layout", "--seqlens", total, "--cp", cp, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    chunk = total // (2 * cp)
    zigzag = [causal_work(r * chunk, (r + 1) * chunk, 0) + causal_work((3 - r) * chunk, (4 - r) * chunk, 0)
              for r in range(cp)]
    contiguous = [causal_work(r * total // cp, (r + 1) * total // cp, 0) for r in range(cp)]
    assert doc["balance"]["zigzag"]["work"] == zigzag
    assert doc["balance"]["sequence-zigzag"]["work"] == zigzag
    assert doc["balance"]["contiguous"]["work"] == contiguous
    assert sum(zigzag) == total * (total + 1) // 2 > 2**62
    assert doc["balance"]["contiguous"]["imbalance"] == pytest.approx(max(contiguous) * cp / sum(contiguous))
    # 4e9 indices would be 32 GB: the ranks list their pieces instead, and the document says so
    assert "global_indices_omitted" in doc
    assert doc["ranks"][0]["pieces"] == [[0, chunk], [3 * chunk, 4 * chunk]]
    text = run("layout", "--seqlens", total, "--cp", cp)
    assert text.exit_code == 0 and "-" + "3" not in text.output.split("causal attention")[1].split("%")[0]
    assert f"{sum(zigzag):,}" in text.output.replace("\n", "").replace("│", "").replace(" ", "")


@pytest.mark.parametrize("args, mentions", [
    (["--seqlens", 2**32], "4,294,967,295"),
    (["--seqlens", f"{2**31},{2**31}"], "4,294,967,295"),
    (["--seqlens", 10**40], "--seqlens"),
    (["--seqlens", ",".join(["2097152"] * 5), "--cp", 2**20], "pieces"),
])
def test_layout_beyond_the_stated_limits_is_exit_2(args, mentions):
    result = run("layout", *args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and mentions in result.output and "internal" not in result.output


def test_layout_at_a_large_cp_draws_what_a_terminal_shows_and_json_has_everything():
    cp, length = 4096, 8192
    start = time.monotonic()
    drawn = run("layout", "--seqlens", length, "--cp", cp)
    assert drawn.exit_code == 0, drawn.output
    assert len(drawn.output.splitlines()) < 150
    assert "16 of 4,096 ranks listed" in drawn.output.replace("\n", " ")
    assert "the chunks of 4,080 ranks (ranks 8-4087) are not drawn" in drawn.output.replace("\n", " ")
    doc = json.loads(run("layout", "--seqlens", length, "--cp", cp, "--json").output)
    held = literal.zigzag_indices([0, length], cp)
    assert [r["global_indices"] for r in doc["ranks"]] == held
    assert doc["balance"]["zigzag"]["work"] == [sum(g + 1 for g in mine) for mine in held]
    assert time.monotonic() - start < 30.0  # linear: a few seconds; it was quadratic in cp


def pipe_exit(args, read_bytes):
    """Run the real console script, read ``read_bytes`` of stdout, close the pipe; (exit code, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "COLUMNS": "80"}
    process = subprocess.Popen([sys.executable, "-m", "cpinspect", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env, cwd=ROOT)
    process.stdout.read(read_bytes)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    return process.wait(timeout=120), stderr


def test_a_closed_pipe_is_a_quiet_exit_not_an_inconsistency_or_a_bug():
    code, stderr = pipe_exit(["layout", "--seqlens", "65536", "--cp", "8", "--json"], 100)  # 500 kB of JSON
    assert (code, stderr) == (141, "")
    code, stderr = pipe_exit(["simulate", "examples/qwen3vl_packed.pt", "--full"], 50)
    assert (code, stderr) == (141, "")


def test_check_says_it_imports_the_users_module_before_running_it(tmp_path):
    user = tmp_path / "user_select.py"
    source = (ROOT / "examples" / "impls" / "correct.py").read_text()
    user.write_text(source + "\nprint('USER TOP LEVEL RAN')\n")
    result = run("check", f"{user}:select_rows", "--cp", "2", "--cases", "2", "--no-shrink")
    assert result.exit_code == 0, result.output
    notice = f"note: importing {user} runs its top-level code, as Python's import does (check only code you trust)"
    lines = result.output.splitlines()
    assert lines.count(notice) == 1
    assert lines.index(notice) < lines.index("USER TOP LEVEL RAN")


@pytest.mark.parametrize("command", [["simulate", "--cp", "2"], ["info"], ["diagnose", "--cp", "2"],
                                     ["layout", "--cp", "2"], ["explore", "--cp", "2", "-o", "{out}"]])
def test_every_command_that_loads_a_batch_honours_max_bytes(command, tmp_path):
    from cpinspect.cli.app import app

    words = [w.replace("{out}", str(tmp_path / "page.html")) for w in command]
    result = CliRunner().invoke(app, [*words, str(ROOT / "examples" / "qwen3vl_packed.pt"), "--max-bytes", "100"])
    assert result.exit_code == 2, result.output
    assert "above the limit of 100 bytes" in " ".join(result.output.split())
