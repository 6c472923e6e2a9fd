"""The three selection schemes through the simulated group: identical (oracle) rows on every rank, and the
collectives and bytes each one moves."""

import json

import pytest
import torch
from typer.testing import CliRunner

from cpinspect.cli.app import app
from cpinspect.core import synth
from cpinspect.core.batch import PackedBatch
from cpinspect.core.layout import LAYOUTS
from cpinspect.core.loading import load_batch
from cpinspect.simulation.run import simulate
from cpinspect.simulation.schemes import SCHEMES, run_scheme
from tests.literal import expected_rows, layout_indices


def literal_rows(batch: dict, kind: str, cp: int) -> list[list[int]]:
    tokens = synth.token_config()
    ids = batch["input_ids"].view(-1).tolist()
    mask = [i in (tokens.image_token_id, tokens.video_token_id) for i in ids]
    return [expected_rows(mask, held) for held in layout_indices(kind, batch["cu_seqlens"].tolist(), cp)]


@pytest.mark.parametrize("seed", range(16))
def test_every_scheme_gives_every_rank_the_oracles_rows_on_random_batches(seed):
    cp = 1 + seed % 8
    kind = LAYOUTS[seed % len(LAYOUTS)]
    batch = synth.random_batch(seed, cp)
    loaded: PackedBatch = load_batch(batch)
    result = simulate(loaded, cp, kind)
    want = literal_rows(batch, kind, cp)
    total = int(batch["cu_seqlens"][-1])
    for scheme in SCHEMES:
        run = run_scheme(result, scheme)
        assert run.failure is None
        assert [row.tolist() for row in run.rows] == want, scheme
        assert run.all_ok
        for rank in range(cp):
            ops = [(c.op, c.shapes, c.dtypes) for c in run.calls[rank]]
            if scheme == "count":  # one fixed-shape gather of this rank's per-piece counts
                assert ops == [("all_gather_into_tensor", ((result.layout.pieces_per_rank,),), ("int64",))]
                assert run.bytes_sent(rank) == 8 * result.layout.pieces_per_rank
            elif scheme == "token-ids":  # one gather of the rank's T/cp token ids
                assert ops == [("all_gather", ((total // cp,),), ("int64",))]
                assert run.bytes_sent(rank) == 8 * total // cp
                assert run.bytes_received(rank, cp) == 8 * total // cp * (cp - 1)
            else:
                assert ops == [] and run.bytes_sent(rank) == 0


def test_simulate_scheme_all_reports_collectives_and_bytes():
    runner = CliRunner()
    result = runner.invoke(app, ["simulate", "--cp", "4", "--scheme", "all", "--json"])
    assert result.exit_code == 0, result.output
    schemes = {s["scheme"]: s for s in json.loads(result.output)["schemes"]}
    assert list(schemes) == list(SCHEMES) and all(s["ok"] for s in schemes.values())
    assert schemes["token-ids"]["ranks"][0]["collectives"] == ["all_gather([84] int64)"]  # 336 tokens / 4
    assert schemes["token-ids"]["ranks"][0]["bytes_received"] == 84 * 8 * 3
    assert schemes["full-row"]["ranks"][0]["collectives"] == []
    text = runner.invoke(app, ["simulate", "--cp", "4", "--scheme", "token-ids", "--no-color"]).output
    assert "selection schemes" in text and "672 B / 2,016 B" in text


def test_unknown_scheme_exits_2():
    result = CliRunner().invoke(app, ["simulate", "--cp", "2", "--scheme", "gather-everything"])
    assert result.exit_code == 2
    assert "unknown scheme 'gather-everything'" in result.output


def test_a_scheme_that_disagrees_with_the_oracle_is_reported(monkeypatch):
    from cpinspect.simulation import schemes

    batch = load_batch(synth.random_batch(3, 2))
    result = simulate(batch, 2)
    # a wrong program: ranks its placeholders among its own local tokens only (no exchange)
    monkeypatch.setattr(schemes, "full_row_program", lambda group, ids, idx, tokens: torch.nonzero(
        schemes.placeholder_mask(ids[idx[group.rank()]], tokens)).view(-1))
    run = schemes.run_scheme(result, "full-row")
    assert run.ok[0] == torch.equal(run.rows[0], result.ranks[0].expected_rows)
    assert not run.all_ok
