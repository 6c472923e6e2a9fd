"""`simulate --positions --rope 1d`: 1-D positions per rank, each token's offset in its segment (plain Python)."""

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from cpinspect.cli.app import app

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "broken" / "rope_segment_offset_missing_1d"


def test_json_positions_are_the_segment_offsets_at_each_global_index():
    result = CliRunner().invoke(app, ["simulate", "--cp", "2", "--positions", "--rope", "1d", "--json", str(EXAMPLE)])
    document = json.loads(result.output)
    raw = torch.load(EXAMPLE / "rank0.pt", weights_only=True)
    cu = (raw["cu_seqlens_padded"] if "cu_seqlens_padded" in raw else raw["cu_seqlens"]).tolist()
    assert cu[-1] == document["tokens"]
    assert document["positions"]["rope"] == "1d"
    for rank in document["ranks"]:
        want = []
        for g in rank["global_indices"]:
            segment = max(s for s in range(len(cu) - 1) if cu[s] <= g)
            want.append(g - cu[segment])
        assert rank["positions"] == [want]


def test_view_is_titled_1d_and_shows_single_values():
    result = CliRunner().invoke(app, ["simulate", "--cp", "2", "--positions", "--rope", "1d", "--no-color",
                                      str(EXAMPLE)])
    text = " ".join(result.output.split())
    assert "1-D RoPE positions (--rope 1d" in text and "mRoPE positions" not in text
    assert "ch 0 [0-3] 0 → 3" in text  # segment 0, chunk 0 on rank 0: offsets 0..3, no (t,h,w) triple
