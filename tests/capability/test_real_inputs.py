"""The input forms stacks hand the model (examples/real/), through the CLI, against the literal oracle.

The equivalent THD row is built here from the generator's plain sample lists, by hand: each sample
padded with zeros to a multiple of the alignment (24 in the Bridge files, 2*cp when cpinspect
packs a padded Hugging Face batch), then tests/literal.py's zigzag indices and expected rows.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cpinspect.cli.app import app
from cpinspect.core.files import read_file
from cpinspect.core.nested import flatten
from tests.literal import expected_rows, zigzag_indices

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
REAL = EXAMPLES / "real"
IMAGE_PAD = 151655
runner = CliRunner()


def _generator():
    spec = importlib.util.spec_from_file_location("make_real_inputs", EXAMPLES / "make_real_inputs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


GEN = _generator()
SAMPLES = GEN.samples()


def _thd(seqs, multiple, fill=None):
    row, cu = [], [0]
    for seq in seqs:
        pad = (-len(seq)) % multiple
        row += list(seq) + ([0] * pad if fill is None else [fill(i) for i in range(len(seq), len(seq) + pad)])
        cu.append(len(row))
    return row, cu


def _equivalent(name, cp):
    if name.startswith("hf_padded"):
        return _thd(SAMPLES, 2 * cp)
    if name == "hf_flattened.pt":
        return _thd(SAMPLES, 24, fill=lambda i: 1000 + i)
    return _thd(SAMPLES, 24)


def _simulate(args):
    result = runner.invoke(app, ["simulate", *args, "--json"])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


FORMS = ["bridge_psp_padded.pt", "bridge_psp_unpadded.pt", "verl_nested.pt", "hf_padded_right.pt",
         "hf_padded_left.pt", "hf_flattened.pt"]


@pytest.mark.parametrize("cp", [2, 3, 4])
@pytest.mark.parametrize("name", FORMS)
def test_each_form_simulates_like_the_oracle_on_the_equivalent_thd_row(name, cp):
    code, doc = _simulate([str(REAL / name), "--cp", str(cp)])
    row, cu = _equivalent(name, cp)
    mask = [tok == IMAGE_PAD for tok in row]
    held = zigzag_indices(cu, cp)
    assert code == 0 and doc["ok"] and doc["tokens"] == len(row)
    for rank in doc["ranks"]:
        assert rank["global_indices"] == held[rank["rank"]]
        assert rank["selected_rows"] == expected_rows(mask, held[rank["rank"]])
    assert sorted(r for rank in doc["ranks"] for r in rank["selected_rows"]) == list(range(sum(mask)))


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_valid_only_example_is_explained(cp):
    code, doc = _simulate([str(REAL / "valid_only.pt"), "--cp", str(cp)])
    assert code == 1 and doc["findings"][0]["code"] == "VALID_ONLY_ROW"
    valid = len([t for s in SAMPLES for t in s])
    _, cu = _thd(SAMPLES, 24)
    for chunk in doc["chunks"]:
        size = (cu[chunk["segment"] + 1] - cu[chunk["segment"]]) // (2 * cp)
        start = cu[chunk["segment"]] + chunk["chunk"] * size
        assert chunk["got"] == len(range(valid)[start:start + size])


def test_committed_examples_equal_the_generator():
    hf = importlib.util.find_spec("PIL") is not None
    expected = GEN.example_files(hf=hf)
    for name, data in expected.items():
        committed, _ = flatten(read_file(REAL / name))
        want, _ = flatten(data)
        assert sorted(committed) == sorted(want), name
        for path, value in want.items():
            if isinstance(value, torch.Tensor):
                assert committed[path].dtype == value.dtype and torch.equal(committed[path], value), (name, path)
            else:
                assert committed[path] == value, (name, path)


def test_info_json_names_the_form_and_the_field_paths():
    result = runner.invoke(app, ["info", str(REAL / "bridge_psp_padded.pt"), "--json"])
    doc = json.loads(result.stdout)
    assert doc["input_form"].startswith("Megatron-Bridge dict with PackedSeqParams at packed_seq_params (padded")
    assert doc["field_paths"]["cu_seqlens"] == "packed_seq_params.cu_seqlens_q_padded"
    assert doc["field_paths"]["logical_cu_seqlens"] == "packed_seq_params.cu_seqlens_q"
    assert doc["containers"]["packed_seq_params"] == "megatron.core.packed_seq_params.PackedSeqParams"
    unpadded = json.loads(runner.invoke(app, ["info", str(REAL / "bridge_psp_unpadded.pt"), "--json"]).stdout)
    assert "unpadded" in unpadded["input_form"]
    assert unpadded["field_paths"]["cu_seqlens"] == "packed_seq_params.cu_seqlens_q"
    hf = json.loads(runner.invoke(app, ["info", str(REAL / "hf_padded_left.pt"), "--json", "--cp", "2"]).stdout)
    assert hf["input_form"] == "Hugging Face padded (left); full THD row"
    assert hf["notes"][0]["code"] == "PACKED_FROM_PADDED"
    assert hf["segment_lengths"] == [len(s) + (-len(s)) % 4 for s in SAMPLES]
    valid = json.loads(runner.invoke(app, ["info", str(REAL / "valid_only.pt"), "--json"]).stdout)
    assert valid["input_form"] == "valid-tokens-only row under padded boundaries"


def test_dotted_key_on_the_command_line():
    code, doc = _simulate([str(REAL / "verl_nested.pt"), "--cp", "2", "--key",
                           "image_grid_thw=multi_modal_inputs.image_grid_thw", "--key", "input_ids=batch.input_ids"])
    assert code == 0 and doc["images"] == 3


def test_malicious_stand_in_payload_through_the_cli(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    module = sys.modules.setdefault(GEN.PSP_MODULE, type(sys)("megatron.core.packed_seq_params"))
    for parent in ("megatron", "megatron.core"):
        sys.modules.setdefault(parent, type(sys)(parent))
    module.PackedSeqParams = GEN.PackedSeqParams
    try:
        torch.save({"input_ids": torch.arange(8), "packed_seq_params": GEN.PackedSeqParams(
            cu_seqlens_q=torch.tensor([0, 8]), max_seqlen_q=Payload())}, tmp_path / "evil.pt")
    finally:
        for name in (GEN.PSP_MODULE, "megatron.core", "megatron"):
            sys.modules.pop(name, None)
    result = runner.invoke(app, ["simulate", str(tmp_path / "evil.pt"), "--cp", "2"])
    assert result.exit_code == 2 and "Traceback" not in result.output and "\x1b" not in result.output
    assert "refused to load the file" in result.output and "system" in result.output
    assert not marker.exists()


def test_valid_only_row_through_simulate(tmp_path):
    torch.save({"input_ids": torch.arange(10, 17), "cu_seqlens": torch.tensor([0, 5, 7]),
                "cu_seqlens_padded": torch.tensor([0, 8, 12])}, tmp_path / "vo.pt")
    result = runner.invoke(app, ["simulate", str(tmp_path / "vo.pt"), "--cp", "2", "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["findings"][0]["code"] == "VALID_ONLY_ROW"
    assert "The expanded size of the tensor (1) must match the existing size (0)" in doc["findings"][0]["message"]
    empty = sorted((c["rank"], c["segment"], c["chunk"]) for c in doc["chunks"] if c["got"] == 0)
    assert empty == [(0, 1, 0), (0, 1, 3), (1, 1, 1), (1, 1, 2)]


def test_check_batch_packs_a_padded_batch_for_every_requested_cp():
    from cpinspect.cli.app import app

    target = str(EXAMPLES / "impls" / "correct.py") + ":select_rows"
    result = CliRunner().invoke(app, ["check", target, "--cases", "0", "--cp", "2,3,4", "--batch",
                                      str(REAL / "hf_padded_right.pt"), "--no-color"])
    assert result.exit_code == 0, result.output
    assert "all 3 case(s) match the oracle on every rank" in result.output  # one case per cp: none skipped
