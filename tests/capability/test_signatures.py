"""check's signatures: Bridge's padded and unpadded PackedSeqParams, slime/miles/AReaL's physical-cu, and the
signature inferred from parameter names (exit 2 before any case runs when none fits).

The selection functions below are small implementations written for these tests (not cpinspect's code)."""

import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from cpinspect.check import run_check
from cpinspect.check.cases import generate_cases
from cpinspect.check.signatures import infer_signature
from cpinspect.cli.app import app
from cpinspect.core.errors import InputError


def zigzag_rows(local_mask: torch.Tensor, cu: torch.Tensor, group) -> torch.Tensor:
    """Rows of this rank's vision tokens: count per held chunk, all-gather, offsets in natural chunk order."""
    cp, rank = group.size(), group.rank()
    mask = local_mask.reshape(-1).to(torch.bool)
    if cp == 1:
        return torch.arange(int(mask.sum()))
    chunk = ((cu[1:] - cu[:-1]) // (2 * cp)).long().repeat_interleave(2)  # [2S]: head, tail per segment
    ends = torch.cumsum(chunk, 0)
    running = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(mask.long(), 0)])
    counts = running[ends] - running[ends - chunk]
    gathered = [torch.empty_like(counts) for _ in range(cp)]
    dist.all_gather(gathered, counts, group=group)
    table = torch.zeros(chunk.numel() // 2, 2 * cp, dtype=torch.long)
    for q, got in enumerate(gathered):
        table[:, q], table[:, 2 * cp - 1 - q] = got[0::2], got[1::2]
    offsets = (torch.cumsum(table.view(-1), 0) - table.view(-1)).view(table.shape)
    mine = torch.stack([offsets[:, rank], offsets[:, 2 * cp - 1 - rank]], 1).view(-1)  # [2S] in local order
    piece = torch.searchsorted(ends, torch.arange(mask.numel()), right=True)
    held = torch.nonzero(mask).view(-1)
    return mine[piece[held]] + running[held] - running[(ends - chunk)[piece[held]]]


def bridge_with_fallback(vision_mask, packed_seq_params, *, vision_embed_count, cp_group, embed_device):
    cu = packed_seq_params.cu_seqlens_q_padded
    cu = packed_seq_params.cu_seqlens_q if cu is None else cu
    return zigzag_rows(vision_mask, cu, cp_group).to(embed_device)


def bridge_padded_only(vision_mask, packed_seq_params, *, vision_embed_count, cp_group, embed_device):
    return zigzag_rows(vision_mask, packed_seq_params.cu_seqlens_q_padded, cp_group).to(embed_device)


def physical_cu_by_counts(input_ids, packed_seq_params, *, image_token_id, vision_embed_count, cp_group):
    assert packed_seq_params.cu_seqlens_q_padded is None
    return zigzag_rows(input_ids == image_token_id, packed_seq_params.cu_seqlens_q, cp_group)


def physical_cu_by_token_ids(input_ids, packed_seq_params, *, image_token_id, vision_embed_count, cp_group):
    """slime #2251: all-gather the ids, rebuild the row with each rank's local indices, rank the placeholders."""
    cp, rank = cp_group.size(), cp_group.rank()
    cu = packed_seq_params.cu_seqlens_q.long()
    ids = input_ids.reshape(-1)
    gathered = [torch.empty_like(ids) for _ in range(cp)]
    dist.all_gather(gathered, ids, group=cp_group)
    local_indices = []
    for q in range(cp):  # get_packed_cp_local_indices, from the definition of the zigzag split
        held = []
        for s in range(cu.numel() - 1):
            start, length = int(cu[s]), int(cu[s + 1] - cu[s])
            if cp == 1:
                held.append(torch.arange(start, start + length))
                continue
            c = length // (2 * cp)
            held += [torch.arange(start + q * c, start + (q + 1) * c),
                     torch.arange(start + (2 * cp - 1 - q) * c, start + (2 * cp - q) * c)]
        local_indices.append(torch.cat(held) if held else torch.zeros(0, dtype=torch.long))
    full = torch.empty(int(cu[-1]), dtype=ids.dtype)
    for q in range(cp):
        full[local_indices[q]] = gathered[q]
    row_of = torch.cumsum((full == image_token_id).long(), 0) - 1
    mine = local_indices[rank]
    return row_of[mine[full[mine] == image_token_id]]


@pytest.mark.parametrize("fn", [physical_cu_by_counts, physical_cu_by_token_ids])
def test_faithful_physical_cu_implementations_pass_every_case(fn):
    report = run_check(fn, cp=[1, 2, 3, 4, 8], cases=60, signature="physical-cu", shrink=False)
    assert report.ok, [r.summary for r in report.results if r.verdict != "pass"][:3]
    assert len(report.results) == 60


def test_bridge_generates_unpadded_params_so_a_function_ignoring_them_is_caught():
    cases = generate_cases([2, 3, 4], 40, 0)
    assert any(c.logical_cu_seqlens is None for c in cases) and any(c.logical_cu_seqlens is not None for c in cases)
    good = run_check(bridge_with_fallback, cp=[2, 3, 4], cases=40, signature="megatron-bridge", shrink=False)
    assert good.ok
    bad = run_check(bridge_padded_only, cp=[2, 3, 4], cases=40, signature="megatron-bridge", shrink=False)
    assert not bad.ok
    failed = [r for r in bad.results if r.verdict != "pass"]
    assert failed and all(r.case.logical_cu_seqlens is None for r in failed)  # exactly the unpadded batches fail


@pytest.mark.parametrize("fn, name", [(bridge_with_fallback, "megatron-bridge"),
                                      (physical_cu_by_counts, "physical-cu"),
                                      (lambda vision_mask, cu_seqlens, *, vision_embed_count, cp_group: None,
                                       "default")])
def test_signature_is_inferred_from_parameter_names(fn, name):
    assert infer_signature(fn).name == name


def test_parameters_that_fit_no_signature_stop_before_any_case_runs():
    calls = []

    def odd(hidden_states, grid_thw, group):
        calls.append(1)

    with pytest.raises(InputError) as error:
        run_check(odd, cp=[2], cases=5, signature=None)
    assert "(hidden_states, grid_thw, group)" in error.value.what and "fit no signature" in error.value.what
    assert calls == []


def test_cli_exits_2_before_any_case_for_a_signature_the_function_cannot_take():
    runner = CliRunner()
    result = runner.invoke(app, ["check", "examples/impls/correct.py:select_rows", "--signature", "megatron-bridge",
                                 "--cases", "3"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "cannot take the 'megatron-bridge' call" in text and "fit --signature default" in text
    inferred = runner.invoke(app, ["check", "examples/impls/correct.py:get_cp_local_vision_embed_indices",
                                   "--cases", "5", "--json"])
    assert inferred.exit_code == 0, inferred.output
    assert '"signature": "megatron-bridge"' in inferred.output
