"""Capture context managers (jobs/hooks.py) on a real tiny transformers Qwen2-VL and a Bridge-signature model.

Each simulated rank runs its own model on its zigzag share (tests/literal.py) inside the context
manager; ``cpinspect analyze`` then reads what was written. An unmodified HF model scatters the
first image rows into every rank's placeholders: right at cp 1, wrong on rank 1 at cp 2.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cpinspect.cli.app import app
from cpinspect.groups.simulated import execute_spmd
from cpinspect.jobs import capture
from cpinspect.jobs.hooks import capture_bridge, capture_hf
from tests import literal

transformers = pytest.importorskip("transformers")
runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
IMG, VS, VE = 151655, 151652, 151653
GRID = torch.tensor([[1, 4, 4], [1, 4, 8]])


def _row():
    ids = [1000, 1001, VS] + [IMG] * 4 + [VE] + [1002] * 4 + [VS] + [IMG] * 8 + [VE] + [1003] * 3
    ids += [1004] * ((-len(ids)) % 8)
    return ids


def _qwen2vl():
    """The same tiny Qwen2-VL the torchrun example builds (loaded by path: examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("torchrun_capture_hf", ROOT / "examples" / "torchrun_capture_hf.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example.tiny_qwen2vl()


def _qwen3vl():
    config = transformers.Qwen3VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         head_dim=16, num_key_value_heads=1, vocab_size=151680,
                         rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                           deepstack_visual_indexes=[0], num_position_embeddings=64))
    torch.manual_seed(0)
    return transformers.Qwen3VLForConditionalGeneration(config).eval()


MODELS = {"qwen2-vl": (_qwen2vl, 14), "qwen3-vl": (_qwen3vl, 16)}


def _hf_rank(group, directory, ids, cu, name):
    build, patch = MODELS[name]
    model = build()
    held = literal.zigzag_indices(cu, group.size())[group.rank()]
    local = torch.tensor([ids[g] for g in held]).view(1, -1)
    pixels = torch.randn(int(GRID.prod(dim=1).sum()), 3 * 2 * patch * patch)
    original = model.forward
    with capture_hf(model, directory, cp_group=group, cu_seqlens=torch.tensor(cu), enabled=True) as files:
        try:
            with torch.no_grad():
                model(input_ids=local, pixel_values=pixels, image_grid_thw=GRID,
                      mm_token_type_ids=(local == IMG).long())
        except ValueError as exc:  # HF refuses when a rank's placeholders are not all the rows
            assert "do not match" in str(exc) or "match" in str(exc)
    assert model.forward == original and len(files) == 1
    return files[0]


@pytest.mark.parametrize("cp", [1, 2])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_hf_capture_under_the_simulated_group(tmp_path, cp, name):
    ids = _row()
    cu = [0, len(ids)]
    states, failure = execute_spmd(cp, _hf_rank, tmp_path, ids, cu, name, timeout=120.0)
    assert failure is None, str(failure)
    mask = [t == IMG for t in ids]
    for rank in range(cp):
        got = capture.read(tmp_path / capture.file_name(0, rank))
        held = literal.zigzag_indices(cu, cp)[rank]
        assert got.tensors["input_ids"].reshape(-1).tolist() == [ids[g] for g in held]
        assert got.tensors["vision_mask"].tolist() == [mask[g] for g in held]
        assert got.tensors["selected_rows"].tolist() == list(range(sum(mask[g] for g in held)))
        assert int(got.tensors["vision_embed_count"][0]) == sum(mask)
    result = runner.invoke(app, ["analyze", str(tmp_path), "--json"])
    doc = json.loads(result.stdout)
    oracle_agrees = all(literal.expected_rows(mask, held) == list(range(len(literal.expected_rows(mask, held))))
                        for held in literal.zigzag_indices(cu, cp))
    assert oracle_agrees == (cp == 1)
    assert doc["ok"] is oracle_agrees and result.exit_code == (0 if oracle_agrees else 1)


class BridgeQwen3VL:
    """A stand-in with Megatron-Bridge Qwen3VLModel.forward's signature."""

    def __init__(self):
        self.calls = 0

    def forward(self, input_ids, position_ids=None, attention_mask=None, labels=None, inference_params=None,
                packed_seq_params=None, extra_block_kwargs=None, pixel_values=None, pixel_values_videos=None,
                image_grid_thw=None, video_grid_thw=None, **kwargs):
        self.calls += 1
        return input_ids.sum()

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


class Psp:
    def __init__(self, cu, cu_padded):
        self.cu_seqlens_q, self.cu_seqlens_q_padded = cu, cu_padded


@pytest.mark.parametrize("wrong", [False, True])
def test_bridge_capture_records_the_callers_selection(tmp_path, wrong):
    ids = _row()
    cu = [0, len(ids)]
    mask = [t == IMG for t in ids]

    def rank(group):
        held = literal.zigzag_indices(cu, group.size())[group.rank()]
        rows = literal.expected_rows(mask, held)
        if wrong and group.rank() == 1:
            rows = rows[::-1]
        model = BridgeQwen3VL()
        local = torch.tensor([ids[g] for g in held]).view(1, -1)
        with capture_bridge(model, tmp_path, cp_group=group, enabled=True,
                            selected_rows=lambda call: torch.tensor(rows)) as files:
            model(local, packed_seq_params=Psp(torch.tensor(cu), torch.tensor(cu)), image_grid_thw=GRID)
        assert model.calls == 1 and len(files) == 1 and "forward" not in vars(model)

    states, failure = execute_spmd(2, rank, timeout=60.0)
    assert failure is None, str(failure)
    result = runner.invoke(app, ["analyze", str(tmp_path), "--json"])
    assert json.loads(result.stdout)["ok"] is (not wrong) and result.exit_code == (1 if wrong else 0)
