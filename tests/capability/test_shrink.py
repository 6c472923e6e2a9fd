"""Shrinking failures to a smallest batch that `cpinspect simulate` loads, and replaying them."""

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cpinspect.check import load_function, run_case, run_check
from cpinspect.check.batch_cases import case_from_local_masks
from cpinspect.check.cases import Case, generate_cases
from cpinspect.check.shrink import candidates, replay_commands, save_case, shrink_case, with_cp
from cpinspect.check.verdicts import DIVERGENCE, WRONG_ROWS
from cpinspect.cli.app import app
from cpinspect.core.loading import load_batch

IMPLS = Path(__file__).resolve().parents[2] / "examples" / "impls"
runner = CliRunner()


def impl(name: str):
    return load_function(f"{IMPLS / name}:select_rows")


def fails(fn, verdict):
    return lambda case: run_case(fn, case).verdict == verdict


def test_early_return_shrinks_to_the_smallest_deadlock(tmp_path):
    # smallest possible: 2 ranks (cp 1 has no peer to wait for), one segment of 2*cp = 4 tokens,
    # one vision token (so one rank has some and the other none)
    report = run_check(impl("early_return.py"), cp=[4, 8], cases=8, seed=3, save_dir=tmp_path)
    shrunk = next(s for s in report.shrunk if s.verdict == DIVERGENCE)
    case = shrunk.result.case
    assert shrunk.original.cp in (4, 8) and shrunk.original.total_tokens > 4
    assert (case.cp, case.segment_lengths, case.vision_tokens) == (2, [4], 1)
    assert shrunk.result.verdict == DIVERGENCE


def test_saved_batch_loads_in_simulate_and_the_replay_fails_the_same_way(tmp_path):
    report = run_check(impl("early_return.py"), cp=[2, 3], cases=14, save_dir=tmp_path / "out")
    shrunk = next(s for s in report.shrunk if s.verdict == DIVERGENCE)
    assert shrunk.path.parent == tmp_path / "out" and shrunk.path.suffix == ".safetensors"
    batch = load_batch(shrunk.path)
    assert batch.cu_seqlens.tolist() == [0, 4] and batch.vision_embed_count == 1
    assert int(batch.rows[0].eq(151655).sum()) == 1
    replay, expected = shrunk.commands
    simulated = runner.invoke(app, shlex.split(expected)[1:] + ["--no-color"])
    assert simulated.exit_code == 0, simulated.output  # the batch itself is fine: simulate shows the answer
    replayed = runner.invoke(app, shlex.split(replay)[1:] + ["--no-color", "--out", str(tmp_path / "again")])
    assert replayed.exit_code == 1
    assert "✗ divergence: 1 case(s)" in replayed.output


def test_a_failure_needing_two_segments_keeps_two():
    def one_sequence(vision_mask, cu_seqlens, *, vision_embed_count, cp_group):
        """Treats the packed row as one sequence (the per-sequence layout): right for one segment only."""
        whole = torch.stack([cu_seqlens[0], cu_seqlens[-1]])
        return impl("correct.py")(vision_mask, whole, vision_embed_count=vision_embed_count, cp_group=cp_group)

    case = next(c for c in generate_cases([2], 42, seed=0) if c.num_segments >= 3
                and run_case(one_sequence, c).verdict == WRONG_ROWS)
    result = shrink_case(case, fails(one_sequence, WRONG_ROWS), min_cp=2)
    assert result.case.num_segments == 2 and result.case.segment_lengths == [4, 4]
    assert run_case(one_sequence, result.case).verdict == WRONG_ROWS


def test_shrinking_reaches_cp_1_only_when_asked():
    case = next(c for c in generate_cases([8], 7, seed=0) if c.kind == "single-segment")
    off_by_one = impl("off_by_one.py")
    to_two = shrink_case(case, fails(off_by_one, WRONG_ROWS), min_cp=2).case
    to_one = shrink_case(case, fails(off_by_one, WRONG_ROWS), min_cp=1).case
    assert (to_two.cp, to_two.segment_lengths, to_two.vision_tokens) == (2, [4], 1)
    # cp 1 needs no divisibility: one token that is a vision token already gets row 1 instead of 0
    assert (to_one.cp, to_one.segment_lengths, to_one.vision_tokens) == (1, [1], 1)
    assert run_case(off_by_one, to_one).ranks[0].got == [1]


def test_padding_is_dropped_when_the_failure_does_not_need_it():
    case = next(c for c in generate_cases([2], 28, seed=0) if c.logical_cu_seqlens is not None)
    result = shrink_case(case, fails(impl("mirrored_chunks.py"), WRONG_ROWS), min_cp=2)
    assert result.case.logical_cu_seqlens is None


def test_every_candidate_is_a_valid_smaller_zigzag_row():
    for case in generate_cases([2, 3, 4], 21, seed=4)[::2]:
        for candidate in list(candidates(case, min_cp=1))[:40]:
            lengths = torch.tensor(candidate.segment_lengths)
            assert candidate.cp <= case.cp and candidate.total_tokens <= case.total_tokens
            assert candidate.cp == 1 or not bool((lengths % (2 * candidate.cp)).any())
            assert candidate.num_segments <= case.num_segments and (lengths >= 0).all()
            surplus = case.vision_embed_count - case.vision_tokens
            assert candidate.vision_embed_count - candidate.vision_tokens == surplus
            if candidate.logical_cu_seqlens is not None:
                logical = candidate.logical_cu_seqlens
                assert ((logical[1:] - logical[:-1]) <= lengths).all()


def test_with_cp_trims_each_segment_to_the_new_multiple():
    case = case_from_local_masks([0, 12, 24], [[1, 0, 0, 0, 0, 0, 0, 0], [0] * 8, [0] * 7 + [1]])
    smaller = with_cp(case, 2)
    assert smaller.cp == 2 and smaller.segment_lengths == [12, 12]
    kept = with_cp(Case(**{**case.__dict__, "cu_seqlens": torch.tensor([0, 10, 24])}), 2)
    assert kept.segment_lengths == [8, 12]


def test_budget_bounds_the_number_of_runs():
    case = next(c for c in generate_cases([8], 7, seed=0) if c.kind == "many-short")
    calls = []

    def always(candidate):
        calls.append(candidate)
        return True

    assert shrink_case(case, always, max_attempts=5).attempts == 5 and len(calls) == 5


def test_saved_batch_keeps_padding_and_an_explicit_mask(tmp_path):
    case = next(c for c in generate_cases([2], 28, seed=0) if c.logical_cu_seqlens is not None)
    explicit = Case(**{**case.__dict__, "explicit_mask": True})
    batch = load_batch(save_case(explicit, tmp_path, "padded"))
    assert batch.cu_seqlens.tolist() == case.cu_seqlens.tolist()
    assert batch.logical_cu_seqlens.tolist() == case.logical_cu_seqlens.tolist()
    assert batch.vision_mask[0].tolist() == case.vision_mask.tolist()
    assert batch.rows[0].tolist() == case.input_ids.tolist()


def test_replay_commands_quote_and_carry_options():
    replay, expected = replay_commands("my model.py:select_rows", Path("out dir/f.safetensors"), 3, "megatron-bridge",
                                       ["--model", "qwen2-vl"], ["--allow-apply-keywords"])
    assert replay == ("cpinspect check 'my model.py:select_rows' --batch 'out dir/f.safetensors' --cp 3 --cases 0 "
                      "--signature megatron-bridge --model qwen2-vl --allow-apply-keywords")
    assert expected == "cpinspect simulate --cp 3 'out dir/f.safetensors' --model qwen2-vl"


def test_custom_placeholder_ids_replay_with_their_flags(tmp_path):
    from cpinspect.core.tokens import token_config

    tokens = token_config(image_token_id=5000, video_token_id=5001)
    report = run_check(impl("mirrored_chunks.py"), cp=[2], cases=7, tokens=tokens, save_dir=tmp_path,
                       replay_flags=["--image-token-id", "5000", "--video-token-id", "5001"])
    shrunk = report.shrunk[0]
    batch = load_batch(shrunk.path)
    assert batch.vision_mask is None  # the ids alone say where the vision tokens are
    assert int(batch.rows[0].eq(5000).sum()) == shrunk.result.case.vision_tokens > 0
    replay, expected = shrunk.commands
    assert replay.endswith("--image-token-id 5000 --video-token-id 5001")
    replayed = runner.invoke(app, shlex.split(replay)[1:] + ["--no-color", "--out", str(tmp_path / "again")])
    assert replayed.exit_code == 1 and "✗ wrong-rows: 1 case(s)" in replayed.output


def test_a_run_with_another_seed_or_cp_keeps_the_earlier_failure_file(tmp_path):
    first = run_check(impl("mirrored_chunks.py"), cp=[2], cases=7, seed=0, save_dir=tmp_path).shrunk[0].path
    saved = first.read_bytes()
    other_seed = run_check(impl("mirrored_chunks.py"), cp=[2], cases=7, seed=1, save_dir=tmp_path).shrunk[0].path
    other_cp = run_check(impl("mirrored_chunks.py"), cp=[2, 3], cases=7, seed=0, save_dir=tmp_path).shrunk[0].path
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "mirrored_chunks.select_rows-wrong-rows-cp2,3-seed0.safetensors",
        "mirrored_chunks.select_rows-wrong-rows-cp2-seed0.safetensors",
        "mirrored_chunks.select_rows-wrong-rows-cp2-seed1.safetensors",
    ]
    assert {first, other_seed, other_cp} == set(tmp_path.iterdir())
    assert first.read_bytes() == saved  # untouched by the later runs


def _saved_and_replay(output: str) -> tuple[str, str]:
    lines = [line.strip() for line in output.splitlines()]
    saved = next(line for line in lines if line.startswith("saved "))
    replay = next(line for line in lines if line.startswith("replay "))
    return saved.split(None, 1)[1], replay.split(None, 1)[1]


def test_the_replay_command_keeps_a_given_out_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = f"{IMPLS / 'off_by_one.py'}:select_rows"
    mine = tmp_path / "my failures"
    run = runner.invoke(app, ["check", target, "--cp", "2", "--cases", "7", "--out", str(mine), "--no-color"])
    assert run.exit_code == 1, run.output
    saved, replay = _saved_and_replay(run.output)
    assert Path(saved).parent == mine
    assert replay.endswith(f" --out {shlex.quote(str(mine))}")
    replayed = runner.invoke(app, shlex.split(replay)[1:] + ["--no-color"])
    assert replayed.exit_code == 1 and "✗ wrong-rows: 1 case(s)" in replayed.output
    again, _ = _saved_and_replay(replayed.output)
    assert Path(again).parent == mine and not (tmp_path / "cpinspect-failures").exists()


def test_the_replay_command_of_the_default_folder_has_no_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = runner.invoke(app, ["check", f"{IMPLS / 'off_by_one.py'}:select_rows", "--cp", "2", "--cases", "7",
                              "--no-color"])
    assert run.exit_code == 1, run.output
    saved, replay = _saved_and_replay(run.output)
    assert saved == "cpinspect-failures/off_by_one.select_rows-wrong-rows-cp2-seed0.safetensors"
    assert (tmp_path / saved).is_file() and "--out" not in replay


def test_the_default_failure_folder_is_git_ignored():
    root = IMPLS.parent.parent
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    probe = subprocess.run(["git", "check-ignore", "-q", "cpinspect-failures/f.safetensors"], cwd=root)
    assert probe.returncode == 0  # 1 would mean: not ignored
