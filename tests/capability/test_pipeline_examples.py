"""The committed pipeline examples equal examples/make_pipeline_examples.py's output, and each one
shows exactly its finding code through the CLI."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cpinspect.cli.app import app

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _generator():
    spec = importlib.util.spec_from_file_location("make_pipeline_examples", EXAMPLES / "make_pipeline_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATOR = _generator()
FILES = GENERATOR.example_files()


@pytest.mark.parametrize("name", sorted(FILES))
def test_committed_file_equals_generator_output(name):
    expected = FILES[name]
    committed = torch.load(EXAMPLES / name, weights_only=True)
    assert sorted(committed) == sorted(expected)
    for key, value in expected.items():
        assert committed[key].dtype == value.dtype, key
        assert torch.equal(committed[key], value), key


def test_no_stray_files_under_pipeline():
    on_disk = {str(p.relative_to(EXAMPLES)) for p in (EXAMPLES / "pipeline").rglob("*") if p.is_file()}
    assert on_disk == set(FILES)


@pytest.mark.parametrize("name", sorted(GENERATOR.COMMANDS))
def test_example_shows_exactly_its_finding(name):
    args, code = GENERATOR.COMMANDS[name]
    out = CliRunner().invoke(app, ["simulate", str(EXAMPLES / name), *args, "--json"])
    assert out.exit_code == 1, out.output
    doc = json.loads(out.output)
    problems = {f["code"] for f in doc["findings"] if f["severity"] in ("error", "warning")}
    assert problems == {code}


def test_every_new_finding_code_has_an_example():
    codes = {code for _, code in GENERATOR.COMMANDS.values()}
    assert codes == {"MROPE_NOT_PER_SEGMENT", "MROPE_WRONG_SLICE", "MROPE_MISMATCH", "VISION_DP_ORDER",
                     "VISION_DP_EMPTY_RANK_SKIPS_COLLECTIVE", "DEEPSTACK_NOT_SELECTED"}
