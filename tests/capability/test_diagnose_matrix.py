"""The cross-matrix over examples/broken: each case's error confirms its code on its own batch only.

Every case's error text is diagnosed against every case's batch (and the correct bundled
example, and a correct Qwen3-Omni batch from the generator): the error's code may be confirmed
only on the batch it came from. A hypothesis that confirms on a correct batch or on another
class's batch is a false verdict.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from cpinspect.core.tokens import token_config
from cpinspect.diagnose.api import diagnose_batch

ROOT = Path(__file__).resolve().parents[2]
BROKEN = ROOT / "examples" / "broken"
CASES = sorted(p.name for p in BROKEN.iterdir() if (p / "case.json").exists())
CORRECT = "correct"
CORRECT_OMNI = "correct-omni"  # a consistent Qwen3-Omni batch: images, video, audio with audio_feature_lengths
CORRECTS = (CORRECT, CORRECT_OMNI)
# The error alone is the evidence: a keyword to Function.apply involves no batch; "N tokens, M embeddings" on a
# batch that holds exactly N placeholders says the encoder made M rows for them, whatever the batch's own count.
BATCH_FREE = {"APPLY_KWARG", "EMBED_COUNT_MISMATCH"}


def _spec(case: str) -> dict:
    return json.loads((BROKEN / case / "case.json").read_text())


def _options(args: list[str]) -> dict:
    options: dict = {}
    rest = list(args)
    while rest:
        flag = rest.pop(0)
        if flag == "--sequence-parallel":  # the one bare flag the cases use
            options["sequence_parallel"] = True
            continue
        value = rest.pop(0)
        if flag == "--model":
            options["tokens"] = token_config(value)
        elif flag == "--layout":
            options["layout"] = value
        elif flag == "--rank":
            options["rank"] = int(value)
        elif flag == "--embeds":
            options["embeds"] = int(value)
        elif flag == "--tp":
            options["tp"] = int(value)
        elif flag == "--rope":
            options["tokens"] = token_config(options.get("tokens", token_config()).model, rope=value)
    return options


def _omni_batch() -> dict:
    spec = importlib.util.spec_from_file_location("make_broken", ROOT / "examples" / "make_broken.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    first, _, last = module.OMNI_SEGMENTS  # segment 1 moved: not the cp_local case's own (correct) batch
    return module.omni_batch((first, (("text", 30), ("audio", [173]), ("text", 9), ("audio", [480]), ("text", 30)),
                              last))


def _batch(case: str) -> tuple[Path | dict, int, dict]:
    if case == CORRECT:
        return ROOT / "examples" / "qwen3vl_packed.pt", 2, {}
    if case == CORRECT_OMNI:
        return _omni_batch(), 2, {"tokens": token_config("qwen3-omni")}
    spec = _spec(case)
    directory = BROKEN / case
    path = directory / "batch.pt" if (directory / "batch.pt").exists() else directory
    return path, spec["cp"], _options(spec["args"])


@pytest.fixture(scope="module")
def correct_1d(tmp_path_factory):
    """The 1-D RoPE example's rank files with the right positions: each token's offset in its segment, by hand."""
    import torch

    folder = tmp_path_factory.mktemp("correct_1d")
    for rank in range(2):
        shard = torch.load(BROKEN / "rope_segment_offset_missing_1d" / f"rank{rank}.pt", weights_only=True)
        cu = shard["cu_seqlens_padded"].tolist()
        held = [g for s in range(len(cu) - 1) for c in (rank, 3 - rank)  # zigzag at cp 2: chunks r and 3 - r
                for g in range(cu[s] + c * (cu[s + 1] - cu[s]) // 4, cu[s] + (c + 1) * (cu[s + 1] - cu[s]) // 4)]
        right = torch.tensor([[g - max(c for c in cu[:-1] if c <= g) for g in held]])
        assert not torch.equal(right, shard["position_ids"])  # the example's positions are the wrong ones
        shard["position_ids"] = right
        torch.save(shard, folder / f"rank{rank}.pt")
    return folder


@pytest.mark.parametrize("error_case", CASES)
def test_an_error_confirms_its_code_only_on_its_own_batch(error_case, correct_1d):
    spec = _spec(error_case)
    code = spec["code"]
    text = (BROKEN / error_case / spec["error_file"]).read_text()
    for batch_case in [*CORRECTS, "correct_1d", *CASES]:
        path, cp, options = (correct_1d, 2, {}) if batch_case == "correct_1d" else _batch(batch_case)
        if batch_case != error_case:
            options.pop("rank", None)
        report = diagnose_batch(path, cp, error_text=text, **options)
        confirmed = {f.code for f in report.findings if f.status == "confirmed"}
        if batch_case == error_case:
            assert confirmed == {code}, (batch_case, confirmed)
        elif code not in BATCH_FREE:
            own = {_spec(batch_case)["code"]} if batch_case not in (*CORRECTS, "correct_1d") else set()
            assert code not in confirmed - own, (error_case, batch_case, confirmed)


@pytest.mark.parametrize("case", [*CORRECTS, *CASES])
def test_without_an_error_only_the_batch_own_code_can_be_confirmed(case):
    path, cp, options = _batch(case)
    report = diagnose_batch(path, cp, **options)
    confirmed = {f.code for f in report.findings if f.status == "confirmed"}
    own = {_spec(case)["code"]} if case not in CORRECTS else set()
    assert confirmed <= own, (case, confirmed)
    if case in CORRECTS:
        assert report.exit_code == 0


def test_the_class_6_and_7_examples_are_in_the_matrix_with_their_literal_numbers():
    """Issue 14 classes 6 and 7: the cases the matrix iterates, and the numbers their errors were built from."""
    import torch

    assert {"cp_split_missing", "sp_split_missing", "vision_dp_placeholder"} <= set(CASES)
    cp_total = int(torch.load(BROKEN / "cp_split_missing" / "batch.pt", weights_only=True)["cu_seqlens_padded"][-1])
    sp_total = int(torch.load(BROKEN / "sp_split_missing" / "batch.pt", weights_only=True)["cu_seqlens_padded"][-1])
    assert (cp_total, sp_total) == (12288, 8192)  # cp 2 x tp 4: 12288 / 4 = 3072, / 8 = 1536; 8192 / 2 = 4096
    assert "Expected size 3072 but got size 1536" in (BROKEN / "cp_split_missing" / "error.txt").read_text()
    assert "Expected size 4096 but got size 1024" in (BROKEN / "sp_split_missing" / "error.txt").read_text()
    report = diagnose_batch(BROKEN / "vision_dp_placeholder" / "batch.pt", 4,
                            error_text=(BROKEN / "vision_dp_placeholder" / "error.txt").read_text())
    cause = next(f for f in report.findings if f.status == "confirmed")
    # two images (4x4 and 4x8 patches: 4 + 8 rows) on ranks 0 and 1; ranks 2, 3 each add one 2x2-patch row
    assert cause.code == "VISION_DP_PLACEHOLDER" and "rank(s) 2, 3 hold none" in cause.message
    assert "12 real rows + 2 placeholder row(s) = 14" in cause.message
    # the simulation's info note of the same code is replaced by the cause, not shown twice
    assert [f.code for f in report.findings].count("VISION_DP_PLACEHOLDER") == 1


def test_rope_1d_checks_the_1d_examples_as_1d_positions(correct_1d):
    """--rope 1d: the right 1-D positions give no position finding; the #5243 example keeps its cause."""
    one_d = token_config("qwen3-vl", rope="1d")
    report = diagnose_batch(correct_1d, 2, tokens=one_d)
    assert not any("ROPE" in f.code for f in report.findings) and report.exit_code == 0
    without = diagnose_batch(correct_1d, 2)
    assert any(f.code == "MROPE_MISMATCH" and "pass --rope 1d" in f.message for f in without.findings)
    broken = diagnose_batch(BROKEN / "rope_segment_offset_missing_1d", 2, tokens=one_d)
    confirmed = [f.code for f in broken.findings if f.status == "confirmed"]
    assert confirmed == ["ROPE_SEGMENT_OFFSET_MISSING"]
    assert not any(f.code in ("ROPE_MISMATCH", "MROPE_MISMATCH") for f in broken.findings)  # folded into the cause
