"""simulate and layout accept every layout: --json global indices equal the definition's, rows the oracle's."""

import json

import pytest
import torch
from typer.testing import CliRunner

from cpinspect.cli.app import app
from cpinspect.core import synth
from cpinspect.core.layout import LAYOUTS
from tests.literal import expected_rows, layout_indices

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("seed", range(3))
def test_simulate_json_holds_the_definitions_indices_and_the_literal_rows(tmp_path, kind, seed):
    cp = 1 + (seed * 3 + LAYOUTS.index(kind)) % 8
    batch = synth.random_batch(seed, cp)
    path = tmp_path / "batch.pt"
    torch.save(batch, path)
    result = run("simulate", path, "--cp", cp, "--layout", kind, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    cu = batch["cu_seqlens"].tolist()
    mask = [i in (synth.token_config().image_token_id, synth.token_config().video_token_id)
            for i in batch["input_ids"].view(-1).tolist()]
    held = layout_indices(kind, cu, cp)
    assert doc["layout"] == kind and doc["ok"] is True
    assert [r["global_indices"] for r in doc["ranks"]] == held
    assert [r["selected_rows"] for r in doc["ranks"]] == [expected_rows(mask, h) for h in held]


@pytest.mark.parametrize("kind", LAYOUTS)
def test_layout_draws_every_layout(kind):
    result = run("layout", "--seqlens", "8,24", "--cp", 2, "--layout", kind, "--no-color")
    assert result.exit_code == 0, result.output
    assert f"{kind} layout" in result.output


def test_layout_from_file_runs_any_permutation_through_the_selection(tmp_path):
    batch = synth.random_batch(4, 3)
    total = int(batch["cu_seqlens"][-1])
    permutation = torch.randperm(total, generator=torch.Generator().manual_seed(1)).view(3, -1)
    torch.save(batch, tmp_path / "batch.pt")
    torch.save({"global_indices": list(permutation)}, tmp_path / "map.pt")
    result = run("simulate", tmp_path / "batch.pt", "--cp", 3, "--layout-from", tmp_path / "map.pt", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    ids = batch["input_ids"].view(-1).tolist()
    tokens = synth.token_config()
    mask = [i in (tokens.image_token_id, tokens.video_token_id) for i in ids]
    assert doc["layout"] == "file"
    assert [r["global_indices"] for r in doc["ranks"]] == permutation.tolist()
    assert [r["selected_rows"] for r in doc["ranks"]] == [expected_rows(mask, h) for h in permutation.tolist()]


@pytest.mark.parametrize(("entry", "cp", "words"), [
    ([torch.tensor([0, 1]), torch.tensor([1, 2, 3])], 2, "shares of different lengths"),
    (torch.tensor([[0, 1, 2, 3], [3, 4, 5, 6]]), 2, "not a permutation"),
    (torch.arange(8).view(2, 4), 4, "but --cp is 4"),
])
def test_bad_layout_files_exit_2_with_one_paragraph(tmp_path, entry, cp, words):
    batch = {"input_ids": torch.full((1, 8), 100), "cu_seqlens": torch.tensor([0, 8], dtype=torch.int32)}
    torch.save(batch, tmp_path / "batch.pt")
    torch.save({"global_indices": entry}, tmp_path / "map.pt")
    result = run("simulate", tmp_path / "batch.pt", "--cp", cp, "--layout-from", tmp_path / "map.pt")
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split())
    assert "Traceback" not in result.output
