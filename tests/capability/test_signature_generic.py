"""check's generic signature ``fn(group, **batch)``: the rank's group first, then the batch fields the function
names (or all, through ``**batch``). A correct implementation in each form passes every case; a buggy one that
reads the logical ``cu_seqlens`` where the physical ``cu_seqlens_padded`` is meant is caught on exactly the
padded cases; inference picks the generic signature only for such parameters, and the three older signatures
are inferred as before. The selection functions here are written for these tests (not cpinspect's code); the
oracle is check's own independent one (core/oracle), which the other signature tests rely on too."""

import pytest
import torch
from typer.testing import CliRunner

from cpinspect.check import run_check
from cpinspect.check.cases import generate_cases
from cpinspect.check.signatures import infer_signature
from cpinspect.cli.app import app
from cpinspect.core.errors import InputError
from tests.capability.test_signatures import bridge_with_fallback, physical_cu_by_counts, zigzag_rows


def rows_by_named_fields(group, *, vision_mask, cu_seqlens_padded):
    return zigzag_rows(vision_mask, cu_seqlens_padded, group)


def rows_from_the_whole_batch(cp_group, **batch):
    assert batch["input_ids"].shape == (1, batch["vision_mask"].numel())  # [1, local_T], as in a batch file
    assert batch["cu_seqlens"].dtype == batch["cu_seqlens_padded"].dtype == torch.int32
    return zigzag_rows(batch["input_ids"] == batch["image_token_id"], batch["cu_seqlens_padded"], cp_group)


def rows_from_logical_boundaries(group, **batch):  # the bug: the logical boundaries are not what CP cut
    return zigzag_rows(batch["vision_mask"], batch["cu_seqlens"], group)


CPS = [1, 2, 3, 4, 8]


@pytest.mark.parametrize("fn", [rows_by_named_fields, rows_from_the_whole_batch])
def test_correct_generic_implementations_pass_every_case(fn):
    assert infer_signature(fn).name == "generic"
    report = run_check(fn, cp=CPS, cases=60, signature=None, shrink=False)
    assert report.ok, [r.summary for r in report.results if r.verdict != "pass"][:3]
    assert len(report.results) == 60


def test_a_generic_implementation_reading_the_logical_boundaries_fails_exactly_the_padded_cases():
    cases = generate_cases(CPS, 60, 0)
    padded = [c for c in cases if c.logical_cu_seqlens is not None]
    assert padded and len(padded) < len(cases)
    report = run_check(rows_from_logical_boundaries, cp=CPS, cases=60, signature="generic", shrink=False)
    assert not report.ok
    failed = [r for r in report.results if r.verdict != "pass"]
    assert failed and all(r.case.logical_cu_seqlens is not None for r in failed)
    assert all(r.verdict in ("wrong-rows", "wrong-length", "exception") for r in failed)


@pytest.mark.parametrize("fn, name", [
    (bridge_with_fallback, "megatron-bridge"), (physical_cu_by_counts, "physical-cu"),
    (lambda vision_mask, cu_seqlens, *, vision_embed_count, cp_group: None, "default"),
    (lambda group, *args, **batch: None, "generic"),  # binds the default call too: the first name decides
    (lambda pg, input_ids, image_token_id, extra=None: None, "generic"),
])
def test_inference_is_unambiguous_and_keeps_the_older_signatures(fn, name):
    assert infer_signature(fn).name == name


@pytest.mark.parametrize("params", ["group, hidden_states", "vision_mask, group", "group, *, cu_seqlens, grid_thw"])
def test_parameters_outside_the_batch_fields_fit_no_signature_before_any_case_runs(params):
    calls = []
    namespace = {"calls": calls}
    exec(f"def program({params}):\n    calls.append(1)\n", namespace)  # noqa: S102 - builds the parameter lists
    with pytest.raises(InputError) as error:
        run_check(namespace["program"], cp=[2], cases=5, signature=None)
    assert f"({params.replace('*, ', '')})" in error.value.what and "fit no signature" in error.value.what
    assert "generic: fn(group, **batch)" in error.value.fix
    assert calls == []


def test_cli_runs_a_generic_function_and_exits_2_for_a_generic_call_it_cannot_take(tmp_path):
    source = tmp_path / "mine.py"
    source.write_text(
        "from tests.capability.test_signatures import zigzag_rows\n\n\n"
        "def select(group, *, vision_mask, cu_seqlens_padded):\n"
        "    return zigzag_rows(vision_mask, cu_seqlens_padded, group)\n\n\n"
        "def not_generic(vision_mask, cu_seqlens, *, vision_embed_count, cp_group):\n"
        "    return zigzag_rows(vision_mask, cu_seqlens, cp_group)\n")
    runner = CliRunner()
    good = runner.invoke(app, ["check", f"{source}:select", "--cases", "8", "--json"])
    assert good.exit_code == 0, good.output
    assert '"signature": "generic"' in good.output
    refused = runner.invoke(app, ["check", f"{source}:not_generic", "--signature", "generic", "--cases", "3"])
    assert refused.exit_code == 2, refused.output
    text = " ".join(refused.output.split())
    assert "cannot take the 'generic' call" in text and "fit --signature default" in text
