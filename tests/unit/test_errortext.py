"""Error texts: every recognised form gives its numbers; logs give their last recognised line.

The messages are the ones quoted in the public issues the reference (§6) lists, verbatim.
"""

import pytest

from cpinspect.core.errors import InputError
from cpinspect.diagnose.errortext import KINDS, parse_error_text, parse_line, read_error_log


@pytest.mark.parametrize("text, kind, numbers", [
    ("RuntimeError: shape mismatch: value tensor of shape [192, 2048] cannot be broadcast to indexing result of "
     "shape [96, 2048]", "scatter_shape", {"rows": 192, "tokens": 96, "value_shape": [192, 2048]}),
    ("shape mismatch: value tensor of shape [3, 5391] cannot be broadcast to indexing result of shape [3, 2048]",
     "position_shape", {"value_length": 5391, "index_length": 2048, "mismatch_dim": 1}),
    ("ValueError: Image features and image tokens do not match: tokens: 2174, features 6175",
     "feature_count", {"tokens": 2174, "rows": 6175}),
    ("ValueError: Image features and image tokens do not match: tokens: 79752, features 80436",
     "feature_count", {"tokens": 79752, "rows": 80436}),
    ("ValueError: Video features and video tokens do not match: tokens: 720, features 360",
     "feature_count", {"tokens": 720, "rows": 360}),
    ("ValueError: Image features and image tokens do not match, tokens: 12, features: 9",
     "feature_count", {"tokens": 12, "rows": 9}),
    ("ValueError: Videos features and video tokens do not match: tokens=5 features=7",
     "feature_count", {"tokens": 5, "rows": 7}),
    ("ValueError: Packed CP ranks contain 12 vision tokens, but the vision encoder produced 9 embeddings.",
     "gathered_count", {"tokens": 12, "rows": 9}),
    ("ValueError: Mismatch between local vision token count and local vision embedding rows: expected=6, got=8.",
     "local_rows", {"tokens": 6, "rows": 8}),
    ("RuntimeError: Sizes of tensors must match except in dimension 0. Expected size 3904 but got size 1952 for "
     "tensor number 1 in the list.", "cat_sizes", {"expected": 3904, "got": 1952, "dim": 0}),
    ("ValueError: Packed sequence length 4551 must be divisible by 2 * CP size 1", "not_divisible",
     {"length": 4551, "cp": 1}),
    ("TypeError: apply() takes no keyword arguments", "apply_kwarg", {}),
    ("RuntimeError: The expanded size of the tensor (2) must match the existing size (0) at non-singleton dimension 0."
     "  Target sizes: [2].  Tensor sizes: [0]", "expanded_size", {"target": 2, "existing": 0, "dim": 0}),
])
def test_each_form_gives_its_numbers(text, kind, numbers):
    observed = parse_error_text(text)
    assert observed is not None and observed.kind == kind
    for name, value in numbers.items():
        assert observed.numbers[name] == value, name


def test_every_kind_is_covered_by_the_table_above():
    from tests.unit.test_errortext_forms import FORMS

    table = {kind for _, kind, _ in FORMS} | {"scatter_shape", "feature_count", "local_rows", "apply_kwarg",
                                                "position_shape"}
    assert set(KINDS) <= table


def test_video_form_is_marked_video_and_counts_scope():
    video = parse_error_text("Video features and video tokens do not match: tokens: 139, features 256")
    bridge = parse_error_text("Packed CP ranks contain 3 vision tokens, but the vision encoder produced 4 embeddings.")
    assert video.modality == "video" and video.scope == "rank"
    assert bridge.scope == "all ranks" and bridge.modality is None


def test_unrecognised_text_gives_none():
    assert parse_error_text("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB") is None
    assert parse_error_text("") is None


def test_torchrun_prefix_gives_the_rank_and_ansi_is_ignored():
    line = "\x1b[31m[rank3]: ValueError: Image features and image tokens do not match: tokens: 5, features 9\x1b[0m"
    observed = parse_line(line)
    assert observed.rank == 3 and observed.numbers == {"tokens": 5, "rows": 9}
    assert parse_line("[default1]:TypeError: apply() takes no keyword arguments").rank == 1


def test_pasted_traceback_uses_the_last_error_line():
    text = ("Traceback (most recent call last):\n  File \"model.py\", line 3, in forward\n"
            "[rank0]: shape mismatch: value tensor of shape [12, 8] cannot be broadcast to indexing result of shape "
            "[2, 8]\n[rank1]: shape mismatch: value tensor of shape [12, 8] cannot be broadcast to indexing result of "
            "shape [10, 8]\n")
    observed = parse_error_text(text)
    assert (observed.rank, observed.numbers["tokens"], observed.line_number) == (1, 10, 4)


def test_long_log_is_streamed_and_the_last_matching_line_wins(tmp_path):
    log = tmp_path / "train.log"
    noise = "[rank0]: step {i} | loss 1.0 | lr 1e-5 | tokens: 4096, features of the step\n"
    with open(log, "w") as handle:
        handle.write("[rank0]: ValueError: Image features and image tokens do not match: tokens: 1, features 2\n")
        for i in range(200_000):
            handle.write(noise.format(i=i))
        handle.write("[rank1]: ValueError: Packed CP ranks contain 7 vision tokens, but the vision encoder produced "
                     "8 embeddings.\n")
        handle.write("W1126 some warning after the failure\n")
    observed = read_error_log(log)
    assert observed.kind == "gathered_count" and observed.numbers == {"tokens": 7, "rows": 8}
    assert observed.rank == 1 and observed.line_number == 200_002


def test_log_without_a_known_error_gives_none(tmp_path):
    log = tmp_path / "ok.log"
    log.write_text("all fine\nstep 2\n")
    assert read_error_log(log) is None


def test_log_file_problems_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_error_log(tmp_path / "missing.log")
    with pytest.raises(InputError, match="is a directory"):
        read_error_log(tmp_path)


def test_to_dict_carries_the_numbers_and_the_line():
    observed = parse_error_text("[rank2]: Mismatch between local vision token count and local vision embedding rows: "
                                "expected=6, got=8.")
    assert observed.to_dict() == {"kind": "local_rows", "scope": "rank", "tokens": 6, "rows": 8, "rank": 2,
                                  "line": "Mismatch between local vision token count and local vision embedding "
                                          "rows: expected=6, got=8"}
