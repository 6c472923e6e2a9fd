"""The malformed-input catalogue: every bad input exits 2 with its own one-paragraph message.

Each case builds one malformed input in a temporary folder and runs ``cpinspect diagnose`` on it
through the CLI. The message must name the problem (the phrase below), where it is and the fix,
on one line, without a traceback.
"""

import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from cpinspect.cli.app import app
from cpinspect.core import synth
from cpinspect.core.errors import InputError

runner = CliRunner()
Setup = Callable[[Path], list[str]]


def ids(n: int = 8) -> torch.Tensor:
    return torch.arange(1000, 1000 + n)


def save(folder: Path, name: str, data: dict) -> str:
    path = folder / name
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in data.items()}, str(path))
    else:
        torch.save(data, path)
    return str(path)


def one(data: dict, *extra: str) -> Setup:
    return lambda folder: [save(folder, "b.pt", data), "--cp", "2", *extra]


def rank_dir(first: dict, second: dict, names: tuple[str, str] = ("rank0.pt", "rank1.pt")) -> Setup:
    def setup(folder: Path) -> list[str]:
        save(folder, names[0], first)
        save(folder, names[1], second)
        return [str(folder)]
    return setup


def shards(cp: int = 2) -> list[dict]:
    return synth.shard_batch(synth.demo_batch_dict(), cp)


def demo_with(**changes) -> dict:
    batch = synth.demo_batch_dict()
    batch.update(changes)
    return batch


def pickled_payload(folder: Path) -> list[str]:
    marker = folder / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = folder / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"input_ids": Payload(), "cu_seqlens": torch.tensor([0, 8])}, handle)
    return [str(path), "--cp", "2"]


def truncated_pt(folder: Path) -> list[str]:
    path = folder / "t.pt"
    torch.save(synth.demo_batch_dict(), path)
    path.write_bytes(path.read_bytes()[:300])
    return [str(path), "--cp", "2"]


def corrupt_safetensors(folder: Path) -> list[str]:
    path = Path(save(folder, "c.safetensors", synth.demo_batch_dict()))
    path.write_bytes(b"\xff\xff\xff\xff\x00\x00\x00\x00{\"broken")
    return [str(path), "--cp", "2"]


def written(name: str, content: bytes) -> Setup:
    def setup(folder: Path) -> list[str]:
        (folder / name).write_bytes(content)
        return [str(folder / name), "--cp", "2"]
    return setup


def empty_dir(folder: Path) -> list[str]:
    (folder / "ranks").mkdir()
    (folder / "ranks" / "notes.txt").write_text("no rank files here")
    return [str(folder / "ranks")]


def missing_rank(folder: Path) -> list[str]:
    first, second = shards()
    save(folder, "rank0.pt", first)
    save(folder, "rank2.pt", second)
    return [str(folder)]


def duplicate_rank(folder: Path) -> list[str]:
    first, second = shards()
    save(folder, "rank0.pt", first)
    save(folder, "rank1.pt", second)
    save(folder, "rank1.safetensors", second)
    return [str(folder)]


def too_few_rank_files(folder: Path) -> list[str]:
    for rank, shard in enumerate(shards(4)[:2]):
        save(folder, f"rank{rank}.pt", shard)
    return [str(folder)]


def error_file_missing(folder: Path) -> list[str]:
    return [save(folder, "b.pt", synth.demo_batch_dict()), "--cp", "2", "--error-file", str(folder / "train.log")]


def both_errors(folder: Path) -> list[str]:
    log = folder / "train.log"
    log.write_text("TypeError: apply() takes no keyword arguments\n")
    return [save(folder, "b.pt", synth.demo_batch_dict()), "--cp", "2", "--error", "x", "--error-file", str(log)]


def short_segment(folder: Path) -> list[str]:
    batch = synth.build_batch([[("text", 40)], [("text", 6)]])
    return [save(folder, "b.pt", batch), "--cp", "4"]


PLAIN = {"input_ids": ids(), "cu_seqlens": torch.tensor([0, 8])}
CASES: dict[str, tuple[Setup, str]] = {
    "missing input_ids key": (one({"cu_seqlens": torch.tensor([0, 8])}), "the batch has no input_ids"),
    "missing cu_seqlens key": (one({"input_ids": ids()}), "the batch has no cu_seqlens"),
    "float input_ids": (one({**PLAIN, "input_ids": ids().float()}), "token ids must be integers"),
    "float cu_seqlens": (one({**PLAIN, "cu_seqlens": torch.tensor([0.0, 8.0])}), "boundaries must be integers"),
    "cu_seqlens not starting at 0": (one({**PLAIN, "cu_seqlens": torch.tensor([3, 8])}), "starts at 3, not 0"),
    "decreasing cu_seqlens": (one({**PLAIN, "cu_seqlens": torch.tensor([0, 6, 4, 8])}),
                              "decreases at segment 1: 6 -> 4"),
    "empty cu_seqlens": (one({**PLAIN, "cu_seqlens": torch.zeros(0, dtype=torch.int32)}), "has 0 entries"),
    "2-D cu_seqlens": (one({**PLAIN, "cu_seqlens": torch.tensor([[0, 8], [0, 8]])}), "but it must be 1-D"),
    "cu_seqlens end neither full nor pre-sharded": (
        one({**PLAIN, "cu_seqlens": torch.tensor([0, 4, 11])}),
        "cu_seqlens ends at 11, but the batch has a row of 8 tokens: that is neither a full row"),
    "negative ids": (one({**PLAIN, "input_ids": torch.tensor([5, -100, 7, 8])}), "negative token id (-100"),
    "out-of-vocab ids": (one({**PLAIN, "input_ids": torch.tensor([5, 6, 200000, 8, 9, 10, 11, 12])}),
                         "token id 200000 at position 2, beyond the 152064 rows"),
    "3-D ids": (one({**PLAIN, "input_ids": ids().view(1, 1, 8)}), "has 3 dimensions"),
    "empty row": (one({"input_ids": torch.zeros(0, dtype=torch.long), "cu_seqlens": torch.tensor([0, 0])}),
                  "holds no tokens"),
    "per-rank files of different lengths": (
        rank_dir({**PLAIN, "cu_seqlens": torch.tensor([0, 16])},
                 {"input_ids": ids(9), "cu_seqlens": torch.tensor([0, 16])}), "local rows of different lengths"),
    "per-rank files with different cu_seqlens": (
        rank_dir({**PLAIN, "cu_seqlens": torch.tensor([0, 16])},
                 {**PLAIN, "cu_seqlens": torch.tensor([0, 8, 16])}), "per-rank files disagree on cu_seqlens"),
    "missing rank file": (missing_rank, "rank file(s) for rank 1 are missing"),
    "duplicate rank": (duplicate_rank, "rank 1 appears twice"),
    "too few rank files for the cut": (too_few_rank_files, "2 rank files were given, but the rows were cut for cp=4"),
    "cp 0": (one(synth.demo_batch_dict(), "--cp", "0"), "cp is 0, but it must be at least 1"),
    "negative cp": (one(synth.demo_batch_dict(), "--cp", "-2"), "cp is -2, but it must be at least 1"),
    "cp larger than a segment allows": (short_segment, "cp=4 is larger than segment 1 allows: it has 6 token(s)"),
    "full row without --cp": (lambda folder: [save(folder, "b.pt", synth.demo_batch_dict())], "--cp is needed"),
    "grid row with a zero": (one(demo_with(image_grid_thw=torch.tensor([[1, 16, 16], [1, 0, 12], [1, 4, 4]]))),
                             "image_grid_thw row 1 is [1, 0, 12]: h is 0"),
    "grid row with a negative": (one(demo_with(video_grid_thw=torch.tensor([[2, 8, -8]]))),
                                 "video_grid_thw row 0 is [2, 8, -8]: w is negative (-8)"),
    "grid not divisible by the merge size": (one(demo_with(image_grid_thw=torch.tensor([[1, 16, 16], [1, 8, 12],
                                                                                        [1, 5, 4]]))),
                                             "image_grid_thw row 2 is [1, 5, 4]: h and w must be multiples of the "
                                             "spatial merge size 2"),
    "grid of the wrong shape": (one(demo_with(image_grid_thw=torch.tensor([[16, 16], [8, 12]]))),
                                "expected integer [N, 3] rows of (t, h, w)"),
    "vision_mask of another length": (one({**PLAIN, "vision_mask": torch.zeros(5, dtype=torch.bool)}),
                                      "vision_mask has 5 entries but input_ids has 8"),
    "truncated .pt": (truncated_pt, "the .pt file could not be read"),
    "corrupt .safetensors": (corrupt_safetensors, "the safetensors file could not be read"),
    ".pt holding pickled objects": (pickled_payload, "refused to load the file"),
    ".pt holding a list": (lambda folder: [str(_list_pt(folder)), "--cp", "2"], "the file holds a list, not a dict"),
    "unknown extension": (written("batch.npz", b"PK\x03\x04"), "unknown file extension '.npz'"),
    "directory without rank files": (empty_dir, "the directory holds no rank files"),
    "file that does not exist": (lambda folder: [str(folder / "nope.pt"), "--cp", "2"], "does not exist"),
    "error file that does not exist": (error_file_missing, "the error file"),
    "both --error and --error-file": (both_errors, "both --error and --error-file were given"),
    "--rank out of range": (one(synth.demo_batch_dict(), "--rank", "5"), "--rank 5 is out of range for cp=2"),
    "negative --embeds": (one(synth.demo_batch_dict(), "--embeds", "-1"), "--embeds is -1"),
    "unknown --layout": (one(synth.demo_batch_dict(), "--layout", "diagonal"), "unknown layout 'diagonal'"),
    "unknown --model": (one(synth.demo_batch_dict(), "--model", "llava"), "unknown model preset 'llava'"),
}


def _list_pt(folder: Path) -> Path:
    path = folder / "list.pt"
    torch.save([torch.zeros(3)], path)
    return path


def test_the_catalogue_is_large_and_every_message_is_its_own():
    assert len(CASES) >= 25
    assert len({text for _, text in CASES.values()}) == len(CASES)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("name", list(CASES))
def test_malformed_input_exits_2_with_one_paragraph(name, tmp_path):
    setup, text = CASES[name]
    result = runner.invoke(app, ["diagnose", *setup(tmp_path), "--no-color"], env={"COLUMNS": "80"})
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output  # one paragraph, however narrow the terminal
    message = lines[0]
    assert message.startswith("error: ") and text in message, message
    assert "Where: " in message and "Fix: " in message
    assert "<dict>" not in message  # the place is the user's file, not an internal name
    assert "Traceback" not in result.output
    assert not (tmp_path / "pwned").exists()


def test_debug_shows_the_traceback_instead(tmp_path):
    result = runner.invoke(app, ["diagnose", str(tmp_path / "nope.pt"), "--cp", "2", "--debug"])
    assert isinstance(result.exception, InputError) and "does not exist" in str(result.exception)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_payload_never_runs(tmp_path):
    args = pickled_payload(tmp_path)
    result = runner.invoke(app, ["diagnose", *args])
    assert result.exit_code == 2 and "nothing from the file was executed" in result.output
    assert not (tmp_path / "pwned").exists()
